"""The batch run on a Ray cluster (optional: ``pip install 'bilstm-asr[ray]'``).

Ray Data runs ``transcribe_to_files`` in a pool of actors. Each actor loads the recogniser once and declares the CPUs
and memory it needs, so that Ray places actors by them; only paths go through Ray, never audio. Every input comes
back as a status row (an error row when it could not be read); Ray retries the work of an actor that was lost.
The output folder must be one that every node of the cluster sees (a shared file system).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from .batch import BatchInput, StatusRow, TranscribeFunction, transcribe_to_files
from .errors import CommandError

RAY_INSTALL = "pip install 'bilstm-asr[ray]'"
ACTOR_MEMORY_BYTES = 1_200_000_000  # a recogniser with the bundled model, LM, LSTM LM and punctuator, decoding


class RayUnavailable(CommandError):
    """Ray is not installed, or the cluster cannot be reached."""


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is the extra's other half
    except ImportError as error:
        raise RayUnavailable(f"--ray needs Ray Data ({error}): {RAY_INSTALL}") from None
    return ray


class _TranscribeActor:
    """One actor of the pool: loads the recogniser once, then writes one input's outputs per call."""

    def __init__(self, load: Callable[[], TranscribeFunction], out_dir: str, formats: list[str]) -> None:
        self.transcribe = load()
        self.out_dir, self.formats = Path(out_dir), formats

    def __call__(self, batch: dict) -> dict:
        rows = [
            transcribe_to_files(self.transcribe, BatchInput(str(source), str(name)), self.out_dir, self.formats).to_json()
            for source, name in zip(batch["source"], batch["name"])
        ]
        return {"row": rows}


def ray_rows(
    inputs: list[BatchInput],
    out_dir: Path,
    formats: list[str],
    load: Callable[[], TranscribeFunction],
    actors: int,
    cpus_per_actor: float,
    address: str | None = None,
) -> Iterator[StatusRow]:
    """Transcribe ``inputs`` on Ray (``address``: a running cluster, "auto", or None for a local one started here),
    yielding each input's status row as it is done. ``load`` (picklable) makes an actor's transcribe function."""
    ray = _import_ray()
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise RayUnavailable(f"cannot start or reach the Ray cluster {address or '(local)'}: {error}") from None
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its progress and plan lines; our summary says what matters
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    items = [{"source": item.source, "name": item.name} for item in inputs]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    results = dataset.map_batches(
        _TranscribeActor,
        fn_constructor_args=(load, str(out_dir), list(formats)),
        batch_size=1,
        batch_format="numpy",
        concurrency=actors,
        num_cpus=cpus_per_actor,
        memory=ACTOR_MEMORY_BYTES,
    )
    for record in results.iter_rows():
        yield StatusRow(**json.loads(record["row"]))
