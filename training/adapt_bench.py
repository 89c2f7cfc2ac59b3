"""`asr bench adapt`: per speaker, adapt on their first utterances and score the rest, before and after."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from pathlib import Path

from asr.checkpoint import ModelBundle, load_model_file
from asr.recognizer import BUNDLED_MODEL, DecodeOptions, Recognizer

from .adapt import AdaptationError, AdaptOptions, adapt, adapted_from, drop_mismatched, prepare_utterances
from .manifest import read_manifest
from .metrics import error_rates

DECODERS = ("greedy", "default")


def _recognizers(bundle: ModelBundle, model_path: Path, decoders: tuple[str, ...]) -> dict[str, Recognizer]:
    bundle.metadata["source_path"] = str(model_path.resolve())
    options = {"greedy": DecodeOptions(decoder="greedy"), "default": DecodeOptions()}
    return {name: Recognizer(bundle, options[name]) for name in decoders}


def _wers(recognizers: dict[str, Recognizer], utterances: list) -> dict[str, tuple[list[str], list[str]]]:
    """Per decoder: (references, hypotheses) of ``utterances``."""
    refs = [u.text for u in utterances]
    return {name: (refs, [r.transcribe(u.audio, punctuate=False).text for u in utterances]) for name, r in recognizers.items()}


def adaptation_benchmark(
    manifest: str,
    enrol: int,
    options: AdaptOptions,
    model_path: str | None = None,
    speakers: int = 0,
    log: Callable[[str], None] = lambda _: None,
    decoders: tuple[str, ...] = DECODERS,
    test_from: int = 0,
) -> dict:
    """For each speaker of ``manifest`` (the first ``speakers``; 0: all): adapt on their first ``enrol`` utterances,
    then greedy and default-decoder WER on their other utterances (from the ``test_from``-th on, default ``enrol``:
    the same test utterances for several enrolment sizes), unadapted and adapted; CPU seconds per adaptation."""
    test_from = max(test_from, enrol)
    path = Path(model_path) if model_path else BUNDLED_MODEL
    by_speaker: dict[str, list] = collections.defaultdict(list)
    for utterance in read_manifest(manifest):
        by_speaker[utterance.speaker].append(utterance)
    chosen = [s for s, utts in by_speaker.items() if len(utts) > test_from][: speakers or None]
    if not chosen:
        raise ValueError(f"no speaker in {manifest} has more than {enrol} utterances")
    unadapted = _recognizers(load_model_file(path), path, decoders)
    totals = {(kind, decoder): ([], []) for kind in ("unadapted", "adapted") for decoder in unadapted}
    rows = []
    for speaker in chosen:
        utterances = by_speaker[speaker]
        row = _speaker_row(path, speaker, utterances[:enrol], utterances[test_from:], options, unadapted, totals, decoders)
        rows.append(row)
        log(str(row))
    summary = {f"{kind}_{decoder}_wer": round(error_rates(*pair)["wer"], 4) for (kind, decoder), pair in totals.items()}
    for decoder in unadapted:
        before, after = summary[f"unadapted_{decoder}_wer"], summary[f"adapted_{decoder}_wer"]
        summary[f"{decoder}_relative_change"] = round((after - before) / before, 4) if before else 0.0
    seconds = [r["adapt_seconds"] for r in rows if r["adapt_seconds"] is not None]
    summary |= {"speakers": len(rows), "enrolment_utterances": enrol, "method": options.method}
    summary |= {"mean_adapt_cpu_seconds": round(sum(seconds) / max(len(seconds), 1), 1), "max_adapt_cpu_seconds": max(seconds, default=0.0)}
    worst = max((r["wer_change"] for r in rows), default=0.0)
    return {"manifest": manifest, **summary, f"worst_speaker_{decoders[-1]}_wer_change": round(worst, 4), "per_speaker": rows}


def _speaker_row(
    path: Path, speaker: str, enrolment: list, test: list, options: AdaptOptions, unadapted: dict, totals: dict, decoders: tuple[str, ...]
) -> dict:
    bundle = load_model_file(path)
    usable, rejected = prepare_utterances([(str(u.audio), u.text) for u in enrolment], bundle)
    usable, mismatched = drop_mismatched(bundle, usable)
    row = {"speaker": speaker, "enrolled": len(usable), "left_out": rejected + mismatched, "tested": len(test)}
    before = _wers(unadapted, test)
    started = time.process_time()
    try:
        adapted, report = adapt(bundle, usable, options)
        cpu_seconds = round(time.process_time() - started, 1)  # of all threads: one core's with --threads 1
        adapted.metadata["adapted_from"] = adapted_from(bundle, path)
        after = _wers(_recognizers(adapted, path, decoders), test)
        row |= {
            "adapt_seconds": cpu_seconds,
            "steps": report.steps,
            "held_out_loss": [report.held_out_loss_before, report.held_out_loss_after],
        }
    except AdaptationError as error:  # nothing written: the speaker keeps the unadapted model
        after, row["adapt_seconds"], row["steps"], row["refused"] = before, None, 0, str(error)
    for decoder in unadapted:
        for kind, result in (("unadapted", before), ("adapted", after)):
            totals[(kind, decoder)][0].extend(result[decoder][0])
            totals[(kind, decoder)][1].extend(result[decoder][1])
            row[f"{kind}_{decoder}_wer"] = round(error_rates(*result[decoder])["wer"], 4)
    decoder = decoders[-1]
    row["wer_change"] = round(row[f"adapted_{decoder}_wer"] - row[f"unadapted_{decoder}_wer"], 4)
    return row
