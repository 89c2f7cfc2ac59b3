"""Long-recording benchmark (used by `asr bench long`): one file of real speech, minutes to hours long, against the
same utterances transcribed as separate files.

A manifest's utterances are written back to back, cycling through them, with 0.3-1.2 s pauses of quiet noise between
them (seeded), into one 16 kHz WAV per length. Each transcription runs in a fresh process, so that its peak resident
memory is its own; the wall time is that of ``Recognizer.transcribe`` alone, the model already loaded.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from asr.audio import SAMPLE_RATE, load_audio

from .manifest import read_manifest
from .metrics import error_rates

PAUSE_RANGE = (0.3, 1.2)  # seconds of quiet between utterances
PAUSE_NOISE = 1e-3  # amplitude of the pauses' noise (about -60 dBFS: a quiet room through a microphone)


@dataclass(frozen=True)
class LongBenchOptions:
    manifest: str
    minutes: tuple[float, ...] = (1, 10, 60, 120)
    model_args: tuple[str, ...] = ()  # `asr transcribe` model and decoding options, e.g. ("--decoder", "greedy")
    threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.minutes or min(self.minutes) <= 0:
            raise ValueError("minutes must be positive")
        if self.threads < 1:
            raise ValueError("threads must be at least 1")


def write_recording(audio_files: list[Path], minutes: float, path: Path, seed: int = 0) -> int:
    """Write utterances back to back (cycling) with quiet pauses into a 16 kHz WAV of at least ``minutes``; returns
    how many utterances it holds (file i is ``audio_files[i % len(audio_files)]``)."""
    rng = np.random.default_rng(seed)
    target = minutes * 60 * SAMPLE_RATE
    written = count = 0
    with sf.SoundFile(path, "w", SAMPLE_RATE, 1, "PCM_16") as out:
        while written < target:
            pause = (rng.standard_normal(int(rng.uniform(*PAUSE_RANGE) * SAMPLE_RATE)) * PAUSE_NOISE).astype(np.float32)
            speech = load_audio(audio_files[count % len(audio_files)])
            out.write(np.concatenate([pause, speech]))
            written += len(pause) + len(speech)
            count += 1
    return count


def _run_child(mode: str, inputs: list[str], options: LongBenchOptions) -> dict:
    """Transcribe in a fresh process; its JSON report plus its peak resident memory."""
    command = [sys.executable, "-m", "training.long_bench", mode, json.dumps(inputs), str(options.threads), *options.model_args]
    process = subprocess.run(command, capture_output=True, text=True)
    if process.returncode:
        raise RuntimeError(f"transcription process failed ({process.returncode}): {process.stderr.strip()[-2000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def long_benchmark(options: LongBenchOptions, log=print) -> dict:
    """RTF, peak memory and WER of each recording length, and of the separate files."""
    utterances = read_manifest(options.manifest)
    if not utterances:
        raise ValueError(f"{options.manifest} has no utterances")
    files = [Path(u.audio) for u in utterances]
    texts = [u.text for u in utterances]
    log(f"separate files: {len(files)} utterances")
    separate = _run_child("separate", [str(f) for f in files], options)
    report = {
        "manifest": options.manifest,
        "model_args": list(options.model_args),
        "threads": options.threads,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%d"),
        "separate": {
            "audio_seconds": round(separate["audio_seconds"], 1),
            "rtf": round(separate["wall_seconds"] / separate["audio_seconds"], 4),
            "peak_rss_mb": separate["peak_rss_mb"],
            "wer": _wer(texts, separate["texts"]),
        },
        "recordings": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for minutes in options.minutes:
            path = Path(tmp) / f"long-{minutes:g}min.wav"
            count = write_recording(files, minutes, path, options.seed)
            log(f"{minutes:g} minutes: {count} utterances")
            result = _run_child("long", [str(path)], options)
            path.unlink()
            reference = " ".join(texts[i % len(texts)] for i in range(count))
            separate_text = " ".join(separate["texts"][i % len(texts)] for i in range(count))
            report["recordings"].append(
                {
                    "minutes": minutes,
                    "audio_seconds": round(result["audio_seconds"], 1),
                    "wall_seconds": round(result["wall_seconds"], 1),
                    "rtf": round(result["wall_seconds"] / result["audio_seconds"], 4),
                    "peak_rss_mb": result["peak_rss_mb"],
                    "segments": result["segments"],
                    "wer": _wer([reference], result["texts"]),
                    "wer_separate_files": _wer([reference], [separate_text]),
                }
            )
            log(json.dumps(report["recordings"][-1]))
    return report


def _wer(references: list[str], hypotheses: list[str]) -> float:
    return round(100 * error_rates(references, hypotheses)["wer"], 2)


def _child(mode: str, inputs: list[str], threads: int, model_args: list[str]) -> dict:
    """The transcription process: load the model, warm up, time ``transcribe`` over the inputs."""
    import resource

    import torch

    from asr.cli import add_model_options, load_recognizer

    parser = argparse.ArgumentParser()
    add_model_options(parser)
    args = parser.parse_args([*model_args, "--threads", str(threads)])
    recognizer = load_recognizer(args)
    recognizer.transcribe(np.zeros(SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)  # warm-up (librosa, allocator)
    wall = seconds = 0.0
    texts, segments = [], 0
    for path in inputs:
        start = time.perf_counter()
        result = recognizer.transcribe(path)
        wall += time.perf_counter() - start
        seconds += result.duration
        texts.append(result.text)
        segments += len(result.segments)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "wall_seconds": wall,
        "audio_seconds": seconds,
        "texts": texts,
        "segments": segments,
        "peak_rss_mb": round(peak, 1),
        "torch_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])))
