"""Offline speed and memory benchmark (used by `asr bench offline`)."""

from __future__ import annotations

import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from .audio import SAMPLE_RATE
from .recognizer import Recognizer


def _manifest_audio(path: Path) -> list[Path]:
    with path.open(encoding="utf-8") as handle:
        return [(path.resolve().parent / json.loads(line)["audio"]).resolve() for line in handle if line.strip()]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def offline_benchmark(recognizer: Recognizer, inputs: list[str]) -> dict:
    """Real-time factor (wall / audio seconds) over the inputs, and the process's peak memory (long recordings of speech:
    ``asr bench long``). When the recogniser punctuates, the time that takes is also given on its own
    (``punctuation_seconds``, included in the wall time)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        files.extend(_manifest_audio(path) if path.suffix == ".jsonl" else [path])
    if not files:
        raise ValueError("no audio to benchmark")
    recognizer.transcribe(np.zeros(SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)  # warm-up (librosa JIT, allocator)
    punctuator = recognizer.punctuator if recognizer.options.punctuate else None
    audio_seconds = wall = punctuating = 0.0
    for path in files:
        start = time.perf_counter()
        result = recognizer.transcribe(path, punctuate=False)  # what transcribe() does, with its two steps timed apart
        recognised = time.perf_counter()
        if punctuator is not None:
            punctuator.punctuate_transcript(result)
        punctuating += time.perf_counter() - recognised
        wall += time.perf_counter() - start
        audio_seconds += result.duration
    report = {
        "files": len(files),
        "audio_seconds": round(audio_seconds, 1),
        "wall_seconds": round(wall, 2),
        "rtf": round(wall / audio_seconds, 4),
        "torch_threads": torch.get_num_threads(),
        "model_parameters": sum(p.numel() for p in recognizer.model.parameters()),
        "chunk_frames": recognizer.model.config.chunk_frames,
        "lookahead_frames": recognizer.model.config.lookahead_frames,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if punctuator is not None:
        report |= {"punctuation_seconds": round(punctuating, 3), "punctuation_share": round(punctuating / wall, 4)}
    report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return report
