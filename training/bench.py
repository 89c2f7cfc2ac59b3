"""Training throughput benchmark (used by `asr bench train`)."""

from __future__ import annotations

import csv
import platform
import tempfile
import time
from pathlib import Path

import torch

from asr.model import ModelConfig

from .augment import NO_AUGMENT, AugmentConfig
from .precision import training_precision
from .trainer import TrainConfig, train


def training_throughput(
    manifest: str,
    steps: int,
    batch_frames: int,
    hidden_size: int,
    num_layers: int,
    device: str,
    cache_dir: str,
    chunk_frames: int,
    lookahead_frames: int,
    amp: bool = True,
    augment: bool = True,
) -> dict:
    """Run the real training loop for ``steps`` steps; report audio seconds per wall second after warm-up."""
    steps = max(steps, 20)
    model = ModelConfig(hidden_size=hidden_size, num_layers=num_layers, chunk_frames=chunk_frames, lookahead_frames=lookahead_frames)
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            train_manifests=(manifest,),
            output_dir=out,
            model=model,
            epochs=1000,
            batch_frames=batch_frames,
            max_steps=steps,
            checkpoint_every=10**9,
            cache_dir=cache_dir,
            device=device,
            amp=amp,
            augment=AugmentConfig() if augment else NO_AUGMENT,
            progress=False,
        )
        train(config, log=lambda _msg: None)
        with (Path(out) / "metrics.csv").open() as handle:
            rows = [r for r in csv.DictReader(handle) if r["split"] == "train"]
    windows = [float(r["audio_sec_per_sec"]) for r in rows[1:]]  # the first window includes warm-up
    resolved = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "audio_sec_per_wall_sec": round(sum(windows) / len(windows), 1),
        "steps": steps,
        "batch_frames": batch_frames,
        "model": model.to_dict(),
        "augmentation": augment,
        "precision": training_precision(torch.device(resolved), amp).name,
        "device": torch.cuda.get_device_name()
        if resolved.startswith("cuda")
        else f"cpu ({torch.get_num_threads()} threads, {platform.machine()})",
        "date": time.strftime("%Y-%m-%d"),
    }
