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

from .recognizer import Final, RecognitionStream, StreamOptions

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
            log_probs = recognizer.log_probs([audio])  # the model's output, to align the reference with
            ends = reference_speech_ends(recognizer, log_probs, text)
            words, finals = latencies([(clock, event.to_dict()) for clock, event in run["timeline"]], ends)
            word_latency += words
            final_latency += finals
            streamed.append(" ".join(e.text for _, e in run["timeline"] if isinstance(e, Final)) or "<empty>")
            offline.append(recognizer.transcribe(audio, SAMPLE_RATE, punctuate=False).text or "<empty>")  # decoded by segments, as streamed
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
        speech = [path for path, _ in _manifest(manifests[0], 0)]
        report["memory"] = hour_memory(recognizer, options, memory_minutes, speech)
    return report


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return round(int(handle.read().split()[1]) * resource.getpagesize() / 1e6, 1)


def hour_memory(recognizer: Recognizer, options: StreamOptions, minutes: int, speech: list[Path]) -> dict:
    """Resident memory after 5 minutes and after ``minutes`` of streamed speech: the ``speech`` files back to back
    (cycled), each after a pause of 0.3-1.2 s of quiet noise, in 1 s pieces."""
    stream = RecognitionStream(recognizer, SAMPLE_RATE, options)
    rng = np.random.default_rng(1)
    second, total = SAMPLE_RATE, minutes * 60 * SAMPLE_RATE
    rss, finals, sent, index, marks = {}, 0, 0, 0, {5 * 60 * SAMPLE_RATE, total}
    while sent < total:
        pause = (rng.standard_normal(int(rng.uniform(0.3, 1.2) * second)) * 1e-3).astype(np.float32)
        audio = np.concatenate([pause, load_audio(speech[index % len(speech)])])[: total - sent]
        index += 1
        for start in range(0, len(audio), second):
            finals += sum(isinstance(e, Final) for e in stream.accept(audio[start : start + second]))
            sent += len(audio[start : start + second])
            for mark in sorted(m for m in marks if sent >= m):
                marks.discard(mark)
                rss[f"rss_mb_after_{mark // (60 * second)}_min"] = _rss_mb()
    finals += sum(isinstance(e, Final) for e in stream.finish())
    peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6, 1)  # kB -> MB, as _rss_mb
    return {**rss, "utterances": index, "finals": finals, "peak_rss_mb": peak}


async def _paced_client(url: str, audio: np.ndarray, piece: float = PIECE_SECONDS) -> dict:
    """Send audio at real-time pace like a microphone; record when each reply arrived (seconds from the start)."""
    import asyncio

    from websockets.asyncio.client import connect

    loop = asyncio.get_running_loop()
    replies: list[tuple[float, dict]] = []
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"config": {"sample_rate": SAMPLE_RATE, "words": True}}))
        start = loop.time()

        async def receive() -> None:
            async for message in ws:
                replies.append((loop.time() - start, json.loads(message)))

        receiver = asyncio.create_task(receive())
        step = int(piece * SAMPLE_RATE)
        for index, offset in enumerate(range(0, len(audio), step)):
            await asyncio.sleep(max(0.0, start + (index + 1) * piece - loop.time()))  # the audio exists only once spoken
            await ws.send((np.clip(audio[offset : offset + step], -1, 1) * 32767).astype("<i2").tobytes())
        await ws.send(json.dumps({"eof": 1}))
        await receiver
    return {"replies": replies}


def reference_speech_ends(recognizer: Recognizer, log_probs: torch.Tensor, text: str) -> list[float]:
    """Where each spoken character of the reference transcript ends (seconds from the start of the audio).

    From CTC forced alignment of ``text`` with the model's offline output ``log_probs`` (frames, vocab): the
    benchmark's "end of speech" for a final is the last of these inside its segment, whichever words the model
    did or did not recognise.
    """
    from torchaudio.functional import forced_align

    targets = recognizer.vocabulary.encode(text)
    if not targets:
        return []
    try:
        path = forced_align(log_probs.unsqueeze(0), torch.tensor([targets], dtype=torch.int32), blank=0)[0][0].tolist()
    except RuntimeError:  # more characters than frames: no alignment
        return []
    space = recognizer.vocabulary.space_id
    return [
        round((t + 1) * recognizer.frame_shift, 3)
        for t, token in enumerate(path)
        if token not in (0, space) and (t + 1 == len(path) or path[t + 1] != token)
    ]


def latencies(replies: list[tuple[float, dict]], speech_ends: list[float] | None = None) -> tuple[list[float], list[float]]:
    """From (arrival time, protocol reply) pairs: (word end -> first partial or final showing it, end of speech -> final).

    The end of speech of a final is the last of ``speech_ends`` inside its segment (see ``reference_speech_ends``);
    without them, the end of its last recognised word.
    """
    word_latency, final_latency = [], []
    partials: dict[int, list[tuple[float, list[str]]]] = {}
    for arrival, reply in replies:
        if "partial" in reply:
            partials.setdefault(reply.get("segment", 0), []).append((arrival, reply["partial"].split()))
        elif reply.get("result"):
            words = reply["result"]
            if speech_ends is None:
                final_latency.append(arrival - words[-1]["end"])
            else:
                inside = [t for t in speech_ends if reply["start"] <= t <= reply["end"]]
                if inside:
                    final_latency.append(arrival - inside[-1])
            for i, word in enumerate(words):
                shown = next((t for t, ws in partials.get(reply.get("segment", 0), []) if len(ws) > i and ws[i] == word["word"]), arrival)
                word_latency.append(max(0.0, shown - word["end"]))
    return word_latency, final_latency


def _start_server(recognizer: Recognizer, max_connections: int):
    """A server on a free loopback port, run by an event loop in a thread: (server, url, stop)."""
    import asyncio
    import threading

    from .server import RecognitionServer, ServerOptions

    server = RecognitionServer(recognizer, ServerOptions(host="127.0.0.1", port=0, max_connections=max_connections))
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    task_holder = {}

    async def run_server() -> None:
        started = asyncio.Event()
        task_holder["task"] = asyncio.ensure_future(server.run(started))
        await started.wait()
        ready.set()
        try:
            await task_holder["task"]
        except asyncio.CancelledError:
            pass

    thread = threading.Thread(target=loop.run_until_complete, args=(run_server(),), daemon=True)
    thread.start()
    if not ready.wait(60):
        raise RuntimeError("the benchmark's server did not start")

    def stop() -> None:
        loop.call_soon_threadsafe(task_holder["task"].cancel)
        thread.join(30)

    return server, f"ws://127.0.0.1:{server.port}", stop


async def _lockstep_client(url: str, pcm: np.ndarray, piece: float = 0.2) -> list[dict]:
    """vosk-server's example client: send a piece of pcm (samples,) int16, wait for its one reply, repeat; then eof
    and its one reply."""
    from websockets.asyncio.client import connect

    replies = []
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"config": {"sample_rate": SAMPLE_RATE}}))
        step = int(piece * SAMPLE_RATE)
        for start in range(0, len(pcm), step):
            await ws.send(pcm[start : start + step].astype("<i2").tobytes())
            replies.append(json.loads(await ws.recv()))
        await ws.send('{"eof" : 1}')
        replies.append(json.loads(await ws.recv()))
    return replies


def lockstep_benchmark(recognizer: Recognizer, paths: list[str], log=print) -> dict:
    """Per file: a lockstep client's wall time through a server in this process against ``Recognizer.transcribe``'s
    (the model loaded in both), and whether their transcripts are the same."""
    import asyncio

    server, url, stop = _start_server(recognizer, 2)
    rows = []
    try:
        asyncio.run(_lockstep_client(url, np.zeros(SAMPLE_RATE, dtype=np.int16)))  # warm-up
        for path in paths:
            pcm = np.clip(np.round(load_audio(path) * 32768), -32768, 32767).astype(np.int16)
            audio = pcm / np.float32(32768)  # what the server makes of the PCM
            began = time.perf_counter()
            offline = recognizer.transcribe(audio, SAMPLE_RATE, punctuate=False)
            offline_seconds = time.perf_counter() - began
            began = time.perf_counter()
            replies = asyncio.run(_lockstep_client(url, pcm))
            client_seconds = time.perf_counter() - began
            streamed = " ".join(r["text"] for r in replies if r.get("text"))
            row = {
                "file": str(path),
                "audio_seconds": round(len(audio) / SAMPLE_RATE, 1),
                "messages": len(replies),
                "finals": sum("partial" not in r for r in replies),
                "transcribe_seconds": round(offline_seconds, 2),
                "lockstep_client_seconds": round(client_seconds, 2),
                "ratio": round(client_seconds / offline_seconds, 3),
                "same_transcript": streamed == offline.text,
            }
            log(json.dumps(row))
            rows.append(row)
    finally:
        stop()
    return {"decoder": recognizer.decoder_name, "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "files": rows}


def serve_benchmark(recognizer: Recognizer, manifest: str, clients: list[int], log=print) -> dict:
    """Start a server in this process and, for each N in ``clients``, let N clients stream different real recordings
    at real-time pace at once; report reply latencies and the CPU time the process used."""
    import asyncio

    recordings, speech_ends = [], []
    for path, text in _manifest(manifest, max(clients)):
        quiet = (np.random.default_rng(len(recordings)).standard_normal(int(TRAILING_PAUSE * SAMPLE_RATE)) * 1e-3).astype(np.float32)
        recordings.append(np.concatenate([load_audio(path), quiet]))
        speech_ends.append(reference_speech_ends(recognizer, recognizer.log_probs([recordings[-1]]), text))
    server, url, stop = _start_server(recognizer, max(clients) + 1)
    asyncio.run(_paced_client(url, recordings[0][:SAMPLE_RATE]))  # warm-up
    report = {
        "manifest": f"{Path(manifest).parent.name}/{Path(manifest).stem}",
        "decoder": recognizer.decoder_name,
        "torch_threads": torch.get_num_threads(),
        "cpus": len(__import__("os").sched_getaffinity(0)),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "results": [],
    }
    try:
        for n in clients:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            began = time.perf_counter()
            rounds, streams = server.worker.rounds, server.worker.batched_streams

            async def many(count: int) -> list[dict]:
                return await asyncio.gather(*(_paced_client(url, recordings[i % len(recordings)]) for i in range(count)))

            results = asyncio.run(many(n))
            wall = time.perf_counter() - began
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
            words, finals = [], []
            for i, result in enumerate(results):
                w, f = latencies(result["replies"], speech_ends[i % len(recordings)])
                words += w
                finals += f
            batches = server.worker.rounds - rounds
            row = {
                "clients": n,
                "partial_latency_p50": _percentile(words, 50),
                "partial_latency_p95": _percentile(words, 95),
                "final_latency_p50": _percentile(finals, 50),
                "final_latency_p95": _percentile(finals, 95),
                "cpu_cores_used": round(cpu / wall, 2),
                "mean_streams_per_model_round": round((server.worker.batched_streams - streams) / max(1, batches), 2),
                "finals": len(finals),
            }
            log(json.dumps(row))
            report["results"].append(row)
    finally:
        stop()
    return report
