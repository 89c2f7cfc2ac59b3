"""Batch transcription of many files into an output folder: resumable, shardable, one status row per input.

Each input's outputs have a fixed path under the output folder (its path relative to the folder or manifest it came
from, with the format's extension). Outputs are written to a temporary file and renamed, so a file that exists is
whole; an input whose outputs all exist is done, and running the same command again transcribes only the rest.
``Shard`` splits the sorted input list among processes or machines (a Slurm array, a Kubernetes indexed job);
``transcribe_to_files`` is the one per-file function that threads, processes and Ray actors all run.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .audio import AUDIO_SUFFIXES, AudioError, audio_duration
from .decoding import Transcript
from .formats import format_transcript

STATUS_FILE = "status.jsonl"
MANIFEST_SUFFIX = ".jsonl"
STDIN = "-"


class BatchError(ValueError):
    """Inputs or options that a batch run cannot start with (a missing manifest, outputs that collide, ...)."""


@dataclass(frozen=True)
class Shard:
    """This process's part of the inputs: those whose index in the sorted list is ``index`` mod ``count``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise BatchError(f"a shard is K/N with 0 <= K < N, got {self.index}/{self.count}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'K/N' -> Shard(K, N)."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise BatchError(f"--shard takes K/N (e.g. 0/4), got {text!r}") from None
        return cls(index, count)

    def select(self, inputs: list[BatchInput]) -> list[BatchInput]:
        """The inputs of this shard, in the order given; the index is taken in the list sorted by source path."""
        ranked = sorted(range(len(inputs)), key=lambda i: (inputs[i].source, inputs[i].name))
        mine = {i for rank, i in enumerate(ranked) if rank % self.count == self.index}
        return [item for i, item in enumerate(inputs) if i in mine]

    def status_name(self) -> str:
        """The status file of this shard: shards on many machines never append to one file."""
        return STATUS_FILE if self.count == 1 else f"status.shard-{self.index}-of-{self.count}.jsonl"


@dataclass(frozen=True)
class BatchInput:
    """One audio input: ``source`` the path to read ("-": standard input), ``name`` its output path without the
    format's extension, relative to the output folder."""

    source: str
    name: str

    def outputs(self, out_dir: Path, formats: Iterable[str]) -> list[Path]:
        return [out_dir / f"{self.name}.{fmt}" for fmt in formats]


def collect_inputs(paths: Iterable[str]) -> tuple[list[BatchInput], list[str]]:
    """Files, folders (searched recursively for audio) and JSONL manifests (their ``audio`` entries) -> inputs, and
    the paths that do not exist. A manifest that cannot be read raises BatchError."""
    found: list[BatchInput] = []
    missing: list[str] = []
    for raw in paths:
        path = Path(raw)
        if raw == STDIN:
            found.append(BatchInput(STDIN, "stdin"))
        elif path.is_dir():
            for file in sorted(path.rglob("*")):
                # a dangling link is listed too: it becomes an error row, not a file silently left out
                if (file.is_file() or file.is_symlink()) and file.suffix.lower() in AUDIO_SUFFIXES:
                    found.append(BatchInput(str(file), file.relative_to(path).with_suffix("").as_posix()))
        elif path.is_file() and path.suffix == MANIFEST_SUFFIX:
            found.extend(_manifest_inputs(path))
        elif path.exists():
            found.append(BatchInput(raw, path.with_suffix("").name))
        else:
            missing.append(raw)
    return found, missing


def _manifest_inputs(manifest: Path) -> list[BatchInput]:
    """A manifest's audio files, named by their path relative to the manifest's folder (an absolute path, or one
    that leaves the folder, by its whole resolved path)."""
    inputs = []
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise BatchError(f"cannot read manifest {manifest}: {error}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            audio = json.loads(line)["audio"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise BatchError(f"{manifest}:{number}: not a manifest line with an 'audio' field") from None
        path = Path(audio)
        if path.is_absolute() or ".." in path.parts:  # named by its whole path, which no other file shares
            path = (manifest.parent / path).resolve()
            inputs.append(BatchInput(str(path), Path(*path.parts[1:]).with_suffix("").as_posix()))
        else:
            inputs.append(BatchInput(str(manifest.parent / path), path.with_suffix("").as_posix()))
    return inputs


def check_unique_outputs(inputs: list[BatchInput]) -> None:
    """Raise BatchError when two inputs would write the same output file."""
    seen: dict[str, str] = {}
    for item in inputs:
        other = seen.setdefault(item.name, item.source)
        if other != item.source:
            raise BatchError(f"{other} and {item.source} would both be written as {item.name}.*; give their folder instead")


@dataclass
class StatusRow:
    """What became of one input: its outputs, or the error that stopped it."""

    input: str
    outputs: list[str] = field(default_factory=list)
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


class StatusLog:
    """Appends status rows to a JSONL file (thread-safe), one line written and flushed per input."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, row: StatusRow) -> None:
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            handle.write(row.to_json() + "\n")


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place: ``path`` is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def pending_inputs(inputs: list[BatchInput], out_dir: Path, formats: list[str], overwrite: bool) -> tuple[list[BatchInput], int]:
    """The inputs still to transcribe (all with ``overwrite``; standard input always), and how many were skipped as done."""
    if overwrite:
        return list(inputs), 0
    pending = [item for item in inputs if item.source == STDIN or not all(p.is_file() for p in item.outputs(out_dir, formats))]
    return pending, len(inputs) - len(pending)


TranscribeFunction = Callable[[str], Transcript]
READ_ERRORS = (AudioError, RuntimeError, ValueError, MemoryError, OSError)


def transcribe_to_files(transcribe: TranscribeFunction, item: BatchInput, out_dir: Path, formats: list[str]) -> StatusRow:
    """Transcribe one input and write its outputs (each renamed into place); an unreadable input gives an error row."""
    started = time.perf_counter()
    row = StatusRow(item.source)
    try:
        transcript = transcribe(item.source)
        texts = [format_transcript(transcript, fmt, item.source) for fmt in formats]
        for path, text in zip(item.outputs(out_dir, formats), texts):
            write_atomically(path, text)
            row.outputs.append(str(path))
        row.audio_seconds = round(transcript.duration, 3)
    except READ_ERRORS as error:
        row.error = str(error) or type(error).__name__
        row.audio_seconds = round(audio_duration(item.source) or 0.0, 3) if item.source != STDIN else 0.0
    row.wall_seconds = round(time.perf_counter() - started, 3)
    return row


@dataclass
class RunSummary:
    """Totals of a batch run: files done, skipped (already done), failed; audio and wall seconds."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0

    def add(self, row: StatusRow) -> None:
        if row.error is None:
            self.done += 1
            self.audio_seconds += row.audio_seconds
        else:
            self.failed += 1

    def text(self) -> str:
        rtf = self.wall_seconds / self.audio_seconds if self.audio_seconds else 0.0
        return (
            f"{self.done} done, {self.skipped} skipped (already done), {self.failed} failed; "
            f"{self.audio_seconds / 3600:.3f} h of audio in {self.wall_seconds:.1f} s (real-time factor {rtf:.3f})"
        )


@dataclass(frozen=True)
class RecognizerLoader:
    """Makes a transcribe function in the process that calls it (picklable: Ray actors load their own recogniser)."""

    model: str | None
    device: str | None
    options: object  # asr.recognizer.DecodeOptions (imported lazily: loading torch is the caller's choice)
    threads: int = 0

    def __call__(self) -> TranscribeFunction:
        import torch

        from .recognizer import load_model

        if self.threads:
            torch.set_num_threads(self.threads)
        recognizer = load_model(self.model, self.device, self.options)
        if recognizer.options.punctuate:
            recognizer.punctuator  # noqa: B018 - loaded now: a broken file fails here, not once per input
        return recognizer.transcribe


class WorkerSetupError(ValueError):
    """A worker process could not load its recogniser (a bad model or LM file): the run stops."""


_worker_transcribe: TranscribeFunction | None = None
_worker_error: str | None = None


def _start_worker(loader: RecognizerLoader) -> None:
    global _worker_transcribe, _worker_error
    try:
        _worker_transcribe = loader()
    except Exception as error:  # reported by the first input this worker is given
        _worker_error = f"{type(error).__name__}: {error}" if not isinstance(error, ValueError | OSError) else str(error)


def _worker_row(item: BatchInput, out_dir: Path, formats: list[str], stdin_file: str | None) -> StatusRow:
    if _worker_transcribe is None:
        raise WorkerSetupError(_worker_error or "the worker has no recogniser")
    return transcribe_to_files(lambda source: _worker_transcribe(stdin_file if source == STDIN else source), item, out_dir, formats)


def process_rows(
    pending: list[BatchInput], out_dir: Path, formats: list[str], loader: RecognizerLoader, jobs: int, stdin_file: str | None = None
) -> Iterable[StatusRow]:
    """Status rows of ``pending`` as they finish, from ``jobs`` worker processes that each load the recogniser once
    (processes, not threads: decoding holds Python's interpreter lock, so threads of one process do not scale)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    from .errors import CommandError

    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited torch threads or locks
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker, initargs=(loader,)) as pool:
        futures = [pool.submit(_worker_row, item, out_dir, formats, stdin_file) for item in pending]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BrokenProcessPool:
            raise CommandError("a worker process died (out of memory?); run the same command again to finish the rest") from None
        finally:
            for future in futures:
                future.cancel()
