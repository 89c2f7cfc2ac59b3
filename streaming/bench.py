"""Streaming benchmark: accuracy against offline decoding, compute, and latency on a virtual real-time clock."""

from __future__ import annotations

import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from asr.audio import SAMPLE_RATE, load_audio
from asr.recognizer import Recognizer

from .recognizer import Final, Partial, RecognitionStream, StreamOptions

PIECE_SECONDS = 0.1  # how much audio a client sends at a time (like a microphone callback)
TRAILING_PAUSE = 1.5  # seconds of quiet appended after each utterance, so the endpoint fires as in real use


def _manifest(path: str | Path, limit: int) -> list[tuple[Path, str]]:
    path = Path(path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if limit and len(rows) > limit:  # evenly spaced, so every speaker is represented
        rows = [rows[round(i * (len(rows) - 1) / (limit - 1))] for i in range(limit)] if limit > 1 else rows[:1]
    return [((path.resolve().parent / r["audio"]).resolve(), r["text"]) for r in rows]


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def stream_utterance(recognizer: Recognizer, audio: np.ndarray, options: StreamOptions) -> dict:
    """Feed audio in real-time-sized pieces; the virtual clock advances with the audio, and with compute when it falls behind."""
    stream = RecognitionStream(recognizer, SAMPLE_RATE, options)
    step = int(PIECE_SECONDS * SAMPLE_RATE)
    clock = compute = 0.0
    timeline: list[tuple[float, object]] = []
    for start in range(0, len(audio), step):
        arrival = min(start + step, len(audio)) / SAMPLE_RATE
        began = time.perf_counter()
        events = stream.accept(audio[start : start + step])
        spent = time.perf_counter() - began
        compute += spent
        clock = max(clock, arrival) + spent
        timeline += [(clock, e) for e in events]
    began = time.perf_counter()
    events = stream.finish()
    spent = time.perf_counter() - began
    compute += spent
    clock = max(clock, len(audio) / SAMPLE_RATE) + spent
    timeline += [(clock, e) for e in events]
    return {"timeline": timeline, "compute": compute}


def latencies(timeline: list[tuple[float, object]]) -> tuple[list[float], list[float]]:
    """(word end -> first partial or final showing it, last word end -> final) in seconds."""
    word_latency, final_latency = [], []
    partials: dict[int, list[tuple[float, list[str]]]] = {}
    for clock, event in timeline:
        if isinstance(event, Partial):
            partials.setdefault(event.segment, []).append((clock, event.text.split()))
        elif isinstance(event, Final) and event.words:
            final_latency.append(clock - event.words[-1].end)
            for i, word in enumerate(event.words):
                shown = next((t for t, words in partials.get(event.segment, []) if len(words) > i and words[i] == word.text), clock)
                word_latency.append(max(0.0, shown - word.end))
    return word_latency, final_latency


def stream_benchmark(
    recognizer: Recognizer, manifests: list[str], limit: int, options: StreamOptions, memory_minutes: int = 60, log=print
) -> dict:
    """Per manifest: streaming vs offline WER/CER of the same model, compute RTF per stream, latencies."""
    import jiwer

    report = {
        "decoder": recognizer.decoder_name,
        "chunk_ms": round(recognizer.model.config.chunk_frames * recognizer.frame_shift * 1000),
        "lookahead_ms": round(recognizer.model.config.lookahead_frames * recognizer.frame_shift * 1000),
        "endpoint_silence": options.endpoint_silence,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "results": [],
    }
    rng = np.random.default_rng(0)
    stream_utterance(recognizer, (rng.standard_normal(SAMPLE_RATE) * 1e-3).astype(np.float32), options)  # warm-up (librosa JIT)
    for manifest in manifests:
        refs, streamed, offline = [], [], []
        audio_seconds = compute = 0.0
        word_latency, final_latency = [], []
        for path, text in _manifest(manifest, limit):
            speech = load_audio(path)
            pause = (rng.standard_normal(int(TRAILING_PAUSE * SAMPLE_RATE)) * 1e-3).astype(np.float32)
            audio = np.concatenate([speech, pause])
            run = stream_utterance(recognizer, audio, options)
            compute += run["compute"]
            audio_seconds += len(audio) / SAMPLE_RATE
            words, finals = latencies(run["timeline"])
            word_latency += words
            final_latency += finals
            streamed.append(" ".join(e.text for _, e in run["timeline"] if isinstance(e, Final)) or "<empty>")
            offline.append(recognizer.transcribe(audio, SAMPLE_RATE).text or "<empty>")
            refs.append(text)
        name = f"{Path(manifest).parent.name}/{Path(manifest).stem}"
        result = {
            "manifest": name,
            "utterances": len(refs),
            "audio_seconds": round(audio_seconds, 1),
            "offline_wer": round(jiwer.wer(refs, offline), 4),
            "streaming_wer": round(jiwer.wer(refs, streamed), 4),
            "offline_cer": round(jiwer.cer(refs, offline), 4),
            "streaming_cer": round(jiwer.cer(refs, streamed), 4),
            "rtf_per_stream": round(compute / audio_seconds, 4),
            "partial_latency_p50": _percentile(word_latency, 50),
            "partial_latency_p95": _percentile(word_latency, 95),
            "final_latency_p50": _percentile(final_latency, 50),
            "final_latency_p95": _percentile(final_latency, 95),
        }
        log(json.dumps(result))
        report["results"].append(result)
    if memory_minutes:
        report["memory"] = hour_memory(recognizer, options, memory_minutes)
    return report


def hour_memory(recognizer: Recognizer, options: StreamOptions, minutes: int = 60) -> dict:
    """Resident memory after 5 minutes and after ``minutes`` of streamed audio (quiet noise with no speech gaps cut)."""
    stream = RecognitionStream(recognizer, SAMPLE_RATE, options)
    rng = np.random.default_rng(1)
    second = SAMPLE_RATE
    rss = {}
    for minute in range(minutes):
        block = (rng.standard_normal(60 * second) * 3e-3).astype(np.float32)
        for start in range(0, len(block), second):
            stream.accept(block[start : start + second])
        if minute + 1 in (5, minutes):
            with open("/proc/self/statm") as handle:
                rss[f"rss_mb_after_{minute + 1}_min"] = round(int(handle.read().split()[1]) * resource.getpagesize() / 1e6, 1)
    stream.finish()
    return rss
