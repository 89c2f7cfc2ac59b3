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


# The parts of `Recognizer.transcribe` that `asr bench profile` times: (part, class, method) wrapped while it runs.
PROFILED_PARTS = (
    ("features", "asr.features.StreamingFeatures", "accept"),
    ("acoustic model", "asr.encoder.ChunkedEncoder", "_run"),
    ("search", "asr.lm.BeamSearchDecoder", "step"),
    ("finals (N-best, reranking, LSTM LM)", "asr.lm.BeamSearchDecoder", "best"),
    ("punctuation", "asr.punctuation.Punctuator", "punctuate_transcript"),
)


class _PartTimer:
    """Wraps methods of classes so that each call's wall time adds to its part; ``restore`` puts them back."""

    def __init__(self, parts=PROFILED_PARTS) -> None:
        import importlib

        self.seconds = {name: 0.0 for name, _, _ in parts}
        self.calls = dict.fromkeys(self.seconds, 0)
        self._originals = []
        for name, path, method in parts:
            module, cls_name = path.rsplit(".", 1)
            cls = getattr(importlib.import_module(module), cls_name)
            original = getattr(cls, method)
            self._originals.append((cls, method, original))
            setattr(cls, method, self._timed(name, original))

    def _timed(self, name: str, original):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return timed

    def restore(self) -> None:
        for cls, method, original in self._originals:
            setattr(cls, method, original)


def profile_transcription(recognizer: Recognizer, path: str) -> dict:
    """Where `transcribe(path)` spends its time: wall seconds per part (``PROFILED_PARTS``; "other" is reading and
    resampling the audio, segmenting and the rest), after one warm-up call on the same file."""
    recognizer.transcribe(path)
    timer = _PartTimer()
    try:
        start = time.perf_counter()
        result = recognizer.transcribe(path)
        wall = time.perf_counter() - start
    finally:
        timer.restore()
    parts = [
        {"part": name, "seconds": round(seconds, 3), "share": round(seconds / wall, 3), "calls": timer.calls[name]}
        for name, seconds in timer.seconds.items()
    ]
    other = wall - sum(timer.seconds.values())
    parts.append({"part": "other (audio reading, segmenting)", "seconds": round(other, 3), "share": round(other / wall, 3), "calls": 0})
    return {
        "file": str(path),
        "audio_seconds": result.duration,
        "wall_seconds": round(wall, 3),
        "rtf": round(wall / max(result.duration, 1e-9), 4),
        "decoder": recognizer.decoder_name,
        "torch_threads": torch.get_num_threads(),
        "parts": parts,
    }


def profile_table(report: dict) -> str:
    """The profile as a text table."""
    lines = [f"{report['file']}: {report['audio_seconds']:.1f} s of audio in {report['wall_seconds']:.2f} s (RTF {report['rtf']})"]
    lines += [f"{'part':38s} {'seconds':>8s} {'share':>7s} {'calls':>7s}"]
    lines += [f"{p['part']:38s} {p['seconds']:8.3f} {100 * p['share']:6.1f}% {p['calls']:7d}" for p in report["parts"]]
    return "\n".join(lines)
