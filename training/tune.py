"""Grid search of the beam-search decoder's LM weight and word score on a dev manifest."""

from __future__ import annotations

import itertools
from dataclasses import replace

from asr.audio import iter_audio
from asr.lm import BeamSearchDecoder, DecoderSettings, LanguageModel
from asr.recognizer import Recognizer

from .manifest import read_manifest
from .metrics import error_rates

CRITERIA = ("pooled", "mean")


def tune_decoder(
    recognizer: Recognizer,
    lm: LanguageModel,
    manifests: list[str],
    lm_weights: list[float],
    word_scores: list[float],
    beam_size: int | None = None,
    limit: int = 0,
    log=print,
    char_weights: list[float] | None = None,
    criterion: str = "pooled",
) -> tuple[DecoderSettings, list[dict]]:
    """Encode the dev audio once, decode it with every (lm_weight, word_score[, char_weight]); returns the best
    settings and all results. Each utterance is decoded segment by segment, as ``Recognizer.transcribe`` decodes it.

    Each result holds the WER and CER over all utterances pooled, and each manifest's own. ``criterion`` chooses the
    best: "pooled" (the WER over all words, so the manifest with the most words weighs most) or "mean" (the mean of
    the manifests' WERs: each domain counts the same).

    Tunes the settings of the recogniser's units (``Recognizer.units``: characters or phones). ``char_weights``
    (phones only; default: the LM's own value) weigh the character layer when reranking the phone search's finals.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, not {criterion!r}")
    phones = recognizer.units == "phones"
    if char_weights and not phones:
        raise ValueError("char weights rerank a phone search: tune them with --units phones")
    lm = lm.for_units(recognizer.units)
    refs, emissions, spans = [], [], {}  # emissions: per utterance, (searched frames, character frames) of each segment
    for manifest in manifests:
        utterances = read_manifest(manifest)
        start = len(refs)
        for utt in utterances[:limit] if limit else utterances:
            log_probs, segments = recognizer.segmented_log_probs(iter_audio(utt.audio))
            parts = [log_probs[a:b] for a, b in segments]
            emissions.append([(recognizer.select(p, phones), recognizer.select(p, False) if phones else None) for p in parts])
            refs.append(utt.text)
        if any(text.strip() for text in refs[start:]):  # a manifest of silences has no WER of its own
            spans[str(manifest)] = (start, len(refs))
    base = lm.settings if beam_size is None else replace(lm.settings, beam_size=beam_size)
    chars = recognizer.vocabulary if phones else None
    weights = char_weights or [base.char_weight]
    results = []
    for weight, score in itertools.product(lm_weights, word_scores):
        settings = replace(base, lm_weight=weight, word_score=score)
        decoder = BeamSearchDecoder(recognizer.beam_vocabulary, lm, settings, char_vocabulary=chars)
        if phones:  # one search per segment, reranked with each weight
            decoded = [[decoder.decode_reranked(e, recognizer.frame_shift, c, weights) for e, c in segments] for segments in emissions]
        else:
            decoded = [[[decoder.decode(e, recognizer.frame_shift)] for e, _ in segments] for segments in emissions]
        for i, char_weight in enumerate(weights):
            hypotheses = [" ".join(t for t in (segment[i].text for segment in segments) if t) for segments in decoded]
            rates = error_rates(refs, hypotheses)
            per_manifest = {name: error_rates(refs[a:b], hypotheses[a:b]) for name, (a, b) in spans.items()}
            mean_wer = sum(r["wer"] for r in per_manifest.values()) / max(len(per_manifest), 1)
            setting = {"lm_weight": weight, "word_score": score, "char_weight": char_weight}
            results.append({**setting, **rates, "mean_wer": mean_wer, "manifests": per_manifest})
            rerank = f" char_weight {char_weight:4.2f}" if phones else ""
            each = " ".join(f"{100 * r['wer']:.2f}" for r in per_manifest.values())
            log(
                f"lm_weight {weight:5.2f} word_score {score:5.2f}{rerank}: WER {100 * rates['wer']:6.2f}% CER {100 * rates['cer']:6.2f}%"
                f" mean WER {100 * mean_wer:6.2f}% (each: {each})"
            )
    key = "wer" if criterion == "pooled" else "mean_wer"
    best = min(results, key=lambda r: (r[key], r["cer"]))
    return replace(base, lm_weight=best["lm_weight"], word_score=best["word_score"], char_weight=best["char_weight"]), results
