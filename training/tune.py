"""Grid search of the beam-search decoder's LM weight and word score on a dev manifest."""

from __future__ import annotations

import itertools
from dataclasses import replace

from asr.audio import iter_audio
from asr.lm import BeamSearchDecoder, DecoderSettings, LanguageModel
from asr.nnlm import NeuralLM
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
    lstm_weights: list[float] | None = None,
) -> tuple[DecoderSettings, list[dict]]:
    """Encode the dev audio once, decode it with every (lm_weight, word_score[, char_weight][, lstm_weight]); returns the best
    settings and all results. Each utterance is decoded segment by segment, as ``Recognizer.transcribe`` decodes it.

    Each result holds the WER and CER over all utterances pooled, and each manifest's own. ``criterion`` chooses the
    best: "pooled" (the WER over all words, so the manifest with the most words weighs most) or "mean" (the mean of
    the manifests' WERs: each domain counts the same).

    Tunes the settings of the recogniser's units (``Recognizer.units``: characters or phones). ``char_weights``
    (phones only; default: the LM's own value) weigh the character layer when reranking the phone search's finals.
    ``lstm_weights`` (default: the LM's own value) weigh the LM folder's LSTM LM when rescoring finals; an LM without
    one is tuned without.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, not {criterion!r}")
    phones = recognizer.units == "phones"
    if char_weights and not phones:
        raise ValueError("char weights rerank a phone search: tune them with --units phones")
    lm = lm.for_units(recognizer.units)
    refs, emissions, spans = _encode(recognizer, manifests, limit)
    base = lm.settings if beam_size is None else replace(lm.settings, beam_size=beam_size)
    chars = recognizer.vocabulary if phones else None
    neural_lm = NeuralLM.load(lm.lstm_file) if lm.lstm_file is not None else None
    if lstm_weights and neural_lm is None:
        raise ValueError(f"language model {lm.folder} has no LSTM LM to weigh (train one with `asr lm train-lstm`)")
    pairs = list(itertools.product(char_weights or [base.char_weight], lstm_weights or [base.lstm_weight]))
    results = []
    for weight, score in itertools.product(lm_weights, word_scores):
        settings = replace(base, lm_weight=weight, word_score=score)
        decoder = BeamSearchDecoder(recognizer.beam_vocabulary, lm, settings, char_vocabulary=chars, neural_lm=neural_lm)
        # one search per segment, its finals reranked with each pair of weights
        decoded = [[decoder.decode_reranked(e, recognizer.frame_shift, c, pairs) for e, c in segments] for segments in emissions]
        for i, (char_weight, lstm_weight) in enumerate(pairs):
            hypotheses = [" ".join(t for t in (segment[i].text for segment in segments) if t) for segments in decoded]
            setting = {"lm_weight": weight, "word_score": score, "char_weight": char_weight, "lstm_weight": lstm_weight}
            results.append({**setting, **_rates(refs, hypotheses, spans)})
            log(_describe(results[-1], phones, neural_lm is not None))
    key = "wer" if criterion == "pooled" else "mean_wer"
    best = min(results, key=lambda r: (r[key], r["cer"]))
    return replace(base, **{k: best[k] for k in ("lm_weight", "word_score", "char_weight", "lstm_weight")}), results


def _encode(recognizer: Recognizer, manifests: list[str], limit: int) -> tuple[list[str], list[list[tuple]], dict]:
    """The references, each utterance's (searched frames, character frames) per segment as ``transcribe`` cuts them,
    and each manifest's (start, end) among the utterances (manifests of silences left out: they have no WER)."""
    phones = recognizer.units == "phones"
    refs, emissions, spans = [], [], {}
    for manifest in manifests:
        utterances = read_manifest(manifest)
        start = len(refs)
        for utt in utterances[:limit] if limit else utterances:
            log_probs, segments = recognizer.segmented_log_probs(iter_audio(utt.audio))
            parts = [log_probs[a:b] for a, b in segments]
            emissions.append([(recognizer.select(p, phones), recognizer.select(p, False) if phones else None) for p in parts])
            refs.append(utt.text)
        if any(text.strip() for text in refs[start:]):
            spans[str(manifest)] = (start, len(refs))
    return refs, emissions, spans


def _rates(refs: list[str], hypotheses: list[str], spans: dict[str, tuple[int, int]]) -> dict:
    """WER and CER pooled, each manifest's, and the mean of the manifests' WERs."""
    rates = error_rates(refs, hypotheses)
    per_manifest = {name: error_rates(refs[a:b], hypotheses[a:b]) for name, (a, b) in spans.items()}
    mean_wer = sum(r["wer"] for r in per_manifest.values()) / max(len(per_manifest), 1)
    return {**rates, "mean_wer": mean_wer, "manifests": per_manifest}


def _describe(result: dict, phones: bool, lstm: bool) -> str:
    rerank = f" char_weight {result['char_weight']:4.2f}" if phones else ""
    rerank += f" lstm_weight {result['lstm_weight']:4.2f}" if lstm else ""
    each = " ".join(f"{100 * r['wer']:.2f}" for r in result["manifests"].values())
    return (
        f"lm_weight {result['lm_weight']:5.2f} word_score {result['word_score']:5.2f}{rerank}: WER {100 * result['wer']:6.2f}%"
        f" CER {100 * result['cer']:6.2f}% mean WER {100 * result['mean_wer']:6.2f}% (each: {each})"
    )
