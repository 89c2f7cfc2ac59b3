"""Word/character error rates and real-time factor of a recognizer on manifests."""

from __future__ import annotations

import time
from pathlib import Path

from asr.recognizer import Recognizer

from .manifest import read_manifest
from .metrics import error_rates


def evaluate_manifest(recognizer: Recognizer, manifest: str | Path, limit: int = 0) -> dict:
    """Transcribe every utterance (audio decoding included in the timing) and score it.

    Returns {'manifest', 'utterances', 'audio_seconds', 'wer', 'cer', 'rtf', 'examples'}.
    """
    utterances = read_manifest(manifest)
    if limit:
        utterances = utterances[:limit]
    refs, hyps = [], []
    wall = audio = 0.0
    for utt in utterances:
        start = time.perf_counter()
        result = recognizer.transcribe(utt.audio, punctuate=False)
        wall += time.perf_counter() - start
        audio += result.duration
        refs.append(utt.text)
        hyps.append(result.text)
    rates = error_rates(refs, hyps)
    name = f"{Path(manifest).parent.name}/{Path(manifest).stem}"
    return {
        "manifest": name,
        "utterances": len(utterances),
        "audio_seconds": round(audio, 1),
        "wer": round(rates["wer"], 4),
        "cer": round(rates["cer"], 4),
        "rtf": round(wall / max(audio, 1e-9), 4),
        "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:3]],
    }
