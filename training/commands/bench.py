"""`asr bench train`, `asr bench long` and `asr bench accuracy`."""

from __future__ import annotations

import argparse
import json
import sys

from asr.model import ModelConfig


def run_bench_train(args: argparse.Namespace) -> int:
    from ..bench import ThroughputOptions, training_throughput

    model = ModelConfig(
        hidden_size=args.hidden_size, num_layers=args.num_layers, chunk_frames=args.chunk_frames, lookahead_frames=args.lookahead_frames
    )
    options = ThroughputOptions(
        manifest=args.manifest,
        steps=args.steps,
        batch_frames=args.batch_frames,
        model=model,
        device=args.device,
        cache_dir=args.cache_dir,
        amp=not args.no_amp,
        augment=not args.no_augment,
        processes=args.processes,
        threads=args.threads,
        phone_loss="" if args.phone_loss == "none" else args.phone_loss,
    )
    print(json.dumps(training_throughput(options), indent=2))
    return 0


def add_bench_train_parser(bench_commands) -> None:
    p = bench_commands.add_parser("train", help="training throughput in audio seconds per wall second")
    p.add_argument("manifest", help="training manifest to draw batches from")
    d = ModelConfig()
    p.add_argument("--steps", type=int, default=20, help="optimiser steps (at least 20; the first 10 are warm-up)")
    p.add_argument("--batch-frames", type=int, default=30_000)
    p.add_argument("--hidden-size", type=int, default=d.hidden_size)
    p.add_argument("--num-layers", type=int, default=d.num_layers)
    p.add_argument("--chunk-frames", type=int, default=d.chunk_frames)
    p.add_argument("--lookahead-frames", type=int, default=d.lookahead_frames)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch per process (0 = torch's default)")
    p.add_argument(
        "--processes", type=int, default=1, help="data-parallel processes (on a 2-core CPU: --processes 2 --threads 1 is fastest)"
    )
    p.add_argument("--no-amp", action="store_true", help="float32 throughout")
    p.add_argument("--no-augment", action="store_true", help="without speed, gain, noise and reverberation")
    p.add_argument(
        "--phone-loss",
        choices=("none", "ctc", "crf"),
        default="none",
        help="also a phone output layer trained with CTC or CTC-CRF (the same batches for each: compare their throughput)",
    )
    p.add_argument("--cache-dir", default="cache")
    p.set_defaults(handler=run_bench_train)


def run_bench_long(args: argparse.Namespace) -> int:
    import shlex

    from ..long_bench import LongBenchOptions, long_benchmark

    model_args = shlex.split(args.options)
    options = LongBenchOptions(args.manifest, tuple(args.minutes), tuple(model_args), args.threads, args.seed)
    report = long_benchmark(options, log=lambda message: print(message, file=sys.stderr))
    print(json.dumps(report, indent=2))
    return 0


def add_bench_long_parser(bench_commands) -> None:
    p = bench_commands.add_parser(
        "long",
        help="long recordings of speech: real-time factor, peak memory and WER against the same utterances as separate files",
        description="Writes a manifest's utterances back to back with 0.3-1.2 s pauses into one WAV per length, and "
        "transcribes each in a fresh process (peak memory of its own), then the utterances as separate files.",
    )
    p.add_argument("manifest", help="utterances to read back to back (cycled when the recording is longer)")
    p.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60, 120], help="recording lengths")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the transcribing process")
    p.add_argument("--seed", type=int, default=0, help="seed of the pause lengths")
    p.add_argument("--options", default="", help="model and decoding options of `asr transcribe`, e.g. '--decoder greedy'")
    p.set_defaults(handler=run_bench_long)


def run_bench_accuracy(args: argparse.Namespace) -> int:

    from ..accuracy import accuracy_benchmark, write_report

    report = accuracy_benchmark(
        args.manifests, args.model, args.limit, args.threads, args.systems, args.lm, log=lambda m: print(m, file=sys.stderr)
    )
    paths = write_report(report, args.output_dir)
    print(paths[0].read_text())
    print(f"written: {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


def add_bench_accuracy_parser(bench_commands) -> None:
    p = bench_commands.add_parser("accuracy", help="WER, CER and RTF of our model and of installed peer recognisers")
    p.add_argument("manifests", nargs="+", metavar="MANIFEST")
    p.add_argument("-m", "--model", help="model file (default: the bundled model)")
    p.add_argument("--lm", help="language-model folder for the beam+LM rows (default: the bundled LM with the bundled model)")
    p.add_argument("--limit", type=int, default=0, help="evenly spaced utterances per manifest (0 = all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--systems", nargs="*", help="only systems whose name contains one of these (e.g. ours pocketsphinx)")
    p.add_argument("-o", "--output-dir", default="bench-accuracy", help="where accuracy.md/.json/.png are written")
    p.set_defaults(handler=run_bench_accuracy)
