"""Training throughput benchmark (used by `asr bench train`)."""

from __future__ import annotations

import csv
import os
import platform
import socket
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from asr.model import ModelConfig
from asr.phones import PHONE_TOKENS

from .augment import NO_AUGMENT, AugmentConfig
from .trainer import TrainConfig, train

LOG_FILE = "log.txt"


@dataclass(frozen=True)
class ThroughputOptions:
    manifest: str
    steps: int = 20
    batch_frames: int = 30_000  # padded 10 ms frames per batch and process
    model: ModelConfig = ModelConfig(hidden_size=224, num_layers=4)
    device: str = "auto"
    cache_dir: str = "cache"
    amp: bool = True
    augment: bool = True
    processes: int = 1  # data-parallel processes on this machine (gloo on the CPU, NCCL on GPUs)
    threads: int = 0  # torch threads per process (0: torch's default)
    phone_loss: str = ""  # "ctc" or "crf": also a phone output layer trained with that loss ("": characters only)

    def __post_init__(self) -> None:
        if self.processes < 1 or self.threads < 0 or self.batch_frames < 1:
            raise ValueError("processes and batch_frames must be at least 1, threads at least 0")
        if self.phone_loss not in ("", "ctc", "crf"):
            raise ValueError("phone_loss must be '', 'ctc' or 'crf'")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(rank: int, options: ThroughputOptions, out: str, port: int) -> None:
    """One process of the benchmark: the real training loop for options.steps steps, metrics in out/metrics.csv."""
    if options.processes > 1:
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(options.processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    if options.threads:
        torch.set_num_threads(options.threads)
    phones = {"phone_loss": options.phone_loss} if options.phone_loss else {}
    config = TrainConfig(
        train_manifests=(options.manifest,),
        output_dir=out,
        model=replace(options.model, phone_vocab_size=len(PHONE_TOKENS)) if phones else options.model,
        **phones,
        epochs=1000,
        batch_frames=options.batch_frames,
        max_steps=options.steps,
        checkpoint_every=10**9,
        cache_dir=options.cache_dir,
        device=options.device,
        amp=options.amp,
        augment=AugmentConfig() if options.augment else NO_AUGMENT,
        progress=False,
    )
    try:
        # The run's own log (rank 0): it says which precision the trainer chose (on a CPU, by timing both).
        with (Path(out) / LOG_FILE).open("a") as handle:
            train(config, log=lambda msg: print(msg, file=handle, flush=True) if rank == 0 else None)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def training_throughput(options: ThroughputOptions) -> dict:
    """Run the real training loop; report audio seconds per wall second (all processes together) after warm-up."""
    options = replace(options, steps=max(options.steps, 20))
    with tempfile.TemporaryDirectory() as out:
        if options.processes == 1:
            _run(0, options, out, 0)
        else:
            torch.multiprocessing.spawn(_run, args=(options, out, _free_port()), nprocs=options.processes)
        with (Path(out) / "metrics.csv").open() as handle:
            rows = [r for r in csv.DictReader(handle) if r["split"] == "train"]
        precision = next(
            (line.split()[2] for line in (Path(out) / LOG_FILE).read_text().splitlines() if line.startswith("computing in ")), "unknown"
        )
    windows = [float(r["audio_sec_per_sec"]) for r in rows[1:]]  # the first window includes warm-up
    device = options.device if options.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    threads = options.threads or torch.get_num_threads()
    return {
        "audio_sec_per_wall_sec": round(sum(windows) / len(windows), 1),
        "steps": options.steps,
        "batch_frames": options.batch_frames,
        "processes": options.processes,
        "model": options.model.to_dict(),
        "augmentation": options.augment,
        "phone_loss": options.phone_loss or "none",
        "precision": precision,
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"cpu ({options.processes} x {threads} threads, {platform.machine()})",
        "date": time.strftime("%Y-%m-%d"),
    }
