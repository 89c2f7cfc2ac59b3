"""`asr adapt` and `asr bench adapt`: speaker adaptation."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _adapt_options(args: argparse.Namespace):
    from ..adapt import AdaptOptions

    return AdaptOptions(args.method, args.max_steps, learning_rate=args.learning_rate, seconds=args.seconds)


def run_adapt(args: argparse.Namespace) -> int:
    import torch

    from ..adapt import adapt_model_file
    from ..trainer import resolve_init_model

    torch.set_num_threads(args.threads)
    output = Path(args.output)
    options = _adapt_options(args)
    if output.is_dir() or output.suffix != ".pt":
        raise ValueError(f"-o must name a .pt model file, not {output}")
    report = adapt_model_file(resolve_init_model(args.model), args.data, output, options, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(report.to_dict(), indent=2))
    print(
        f"adapted model in {output}: {report.utterances} utterances ({report.audio_seconds:.0f} s), {report.steps} steps, "
        f"held-out loss {report.held_out_loss_before:.3f} -> {report.held_out_loss_after:.3f} per character, {report.seconds:.0f} s",
        file=sys.stderr,
    )
    return 0


def _add_adapt_options(p: argparse.ArgumentParser) -> None:
    from ..adapt import METHODS

    p.add_argument("--model", default="bundled", help="model to adapt (default: the bundled one)")
    p.add_argument(
        "--method",
        choices=METHODS,
        default="lin+lhuc",
        help="what adapts (default: an input feature transform and LHUC scales, see docs/training.md)",
    )
    p.add_argument("--max-steps", type=int, default=40, help="steps tried; held-out utterances choose how many are kept")
    p.add_argument(
        "--learning-rate",
        type=float,
        default=0.0,
        help="one rate for every part (default: each its own, 0.05 for LHUC, 5e-4 for the input map)",
    )
    p.add_argument("--seconds", type=float, default=55.0, help="time budget of the adaptation (default 55: about a minute in all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


def add_adapt_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "adapt",
        help="adapt a model to one speaker from a few utterances (about a minute on one core)",
        description="Adapt a model (the bundled one by default) to one speaker. DATA is a JSONL manifest, or a folder of "
        "audio files each with a .txt transcript beside it; 10 sentences are enough. A few utterances are held out to "
        "choose the number of steps; the model is written only when it scores better on them than the original.",
    )
    p.add_argument("data", nargs="+", metavar="DATA", help="JSONL manifest or folder of audio files with .txt transcripts")
    p.add_argument("-o", "--output", required=True, help="the adapted model file to write (.pt)")
    _add_adapt_options(p)
    p.set_defaults(handler=run_adapt)


def run_bench_adapt(args: argparse.Namespace) -> int:
    import torch

    from ..adapt_bench import adaptation_benchmark

    torch.set_num_threads(args.threads)
    options = _adapt_options(args)
    model = None if args.model == "bundled" else args.model
    decoders = tuple(args.decoders)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    report = adaptation_benchmark(args.manifest, args.enrol, options, model, args.speakers, log, decoders, args.test_from)
    print(json.dumps(report, indent=2))
    return 0


def add_bench_adapt_parser(bench_commands) -> None:
    p = bench_commands.add_parser(
        "adapt",
        help="speaker adaptation: each speaker's first N utterances adapt, the rest are scored before and after",
    )
    p.add_argument("manifest", help="JSONL manifest with speakers")
    p.add_argument("--enrol", type=int, default=10, help="utterances each speaker adapts on (their first N)")
    p.add_argument("--speakers", type=int, default=0, help="only the first N speakers (0: all)")
    p.add_argument("--decoders", nargs="+", choices=["greedy", "default"], default=["greedy", "default"])
    p.add_argument("--test-from", type=int, default=0, help="score each speaker's utterances from the N-th on (default: --enrol)")
    _add_adapt_options(p)
    p.set_defaults(handler=run_bench_adapt)
