"""Word and character error rates (jiwer)."""

from __future__ import annotations

import jiwer


def error_rates(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Corpus-level {'wer', 'cer'} over normalised texts; empty references are skipped."""
    pairs = [(r, h) for r, h in zip(references, hypotheses, strict=True) if r.strip()]
    if not pairs:
        raise ValueError("no non-empty references to score")
    refs, hyps = zip(*pairs)
    hyps = [h if h.strip() else "<empty>" for h in hyps]  # jiwer rejects empty hypotheses in some versions
    return {"wer": float(jiwer.wer(list(refs), hyps)), "cer": float(jiwer.cer(list(refs), hyps))}
