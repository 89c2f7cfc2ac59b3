"""`asr data synth`: synthetic training speech from text files with every installed offline English voice."""

from __future__ import annotations

import argparse
import sys


def run_synth(args: argparse.Namespace) -> int:
    from .synth import SynthConfig, SynthError, synthesize
    from .tts import ENGINES, discover_voices

    if args.list_voices:
        report = discover_voices(ENGINES)
        for engine, voices in report.found.items():
            print(f"{engine}: {len(voices)} voice(s): {' '.join(voices[:12])}{' ...' if len(voices) > 12 else ''}")
        for name, why in report.missing.items():
            print(f"{name}: {why}")
        return 0
    if not args.texts or not args.output_dir:
        print("error: give TEXT files and -o/--output-dir (or --list-voices)", file=sys.stderr)
        return 2
    config = SynthConfig(
        texts=tuple(args.texts),
        output_dir=args.output_dir,
        hours=args.hours,
        voices=tuple(args.voices.split(",")),
        seed=args.seed,
        exclude=tuple(args.exclude),
        jobs=args.jobs,
        rate=tuple(args.rate),
        pitch=tuple(args.pitch),
        min_words=args.min_words,
        max_words=args.max_words,
    )
    try:
        report = synthesize(config, log=lambda m: print(m, file=sys.stderr, flush=True))
    except (SynthError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = sys.stderr
    for engine, voices in report.voices.found.items():
        print(f"found {engine}: {len(voices)} voice(s)", file=out)
    for name, why in report.voices.missing.items():
        print(f"missing {name}: {why}", file=out)
    print(f"{'engine':10s} {'voices':>6s} {'utts':>6s} {'hours':>6s} {'new':>6s} {'failed':>6s} {'x real time':>11s}", file=out)
    for engine, s in report.engines.items():
        speed = f"{s.speed:11.1f}" if s.rendered else f"{'-':>11s}"
        print(f"{engine:10s} {len(s.voices):6d} {s.utterances:6d} {s.seconds / 3600:6.3f} {s.rendered:6d} {s.failed:6d} {speed}", file=out)
        for error in s.errors[:2]:
            print(f"  e.g. {error}", file=out)
    hours = sum(s.seconds for s in report.engines.values()) / 3600
    print(
        f"wrote {report.sentences_used} utterances ({hours:.2f} h) to {report.manifest}; {report.excluded} sentence(s) left out "
        f"as they appear in --exclude manifests{'; ran out of text' if report.ran_out_of_text else ''}",
        file=out,
    )
    return 0


def add_synth_parser(data_commands) -> None:
    """Register ``synth`` under the ``asr data`` subcommands."""
    p = data_commands.add_parser(
        "synth",
        help="render sentences from text files with every installed offline English voice into a training manifest",
        description="Draw sentences (seeded) from text files, skip any found in --exclude manifests, and render an equal "
        "share of --hours with each engine (piper, espeak-ng, flite, festival) at a random voice, speaking rate and pitch. "
        "Writes OUTPUT/audio/ENGINE/*.opus (16 kHz mono) and OUTPUT/train.jsonl; rerun to resume (files are reused). "
        "Install the voices with: apt-get install espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k "
        "festvox-us-slt-hts; pip install 'bilstm-asr[synth]'.",
    )
    p.add_argument("texts", nargs="*", metavar="TEXT", help="text files (.txt or .gz), one sentence or paragraph a line")
    p.add_argument("-o", "--output-dir", help="folder for audio/ and train.jsonl")
    p.add_argument("--hours", type=float, default=1.0, help="hours of audio in all (an equal share per engine)")
    p.add_argument(
        "--voices",
        default="all",
        help="all, or a comma list of engines (piper, espeak, flite, festival) and voice-id prefixes (espeak:en-gb, flite:slt)",
    )
    p.add_argument("--exclude", nargs="*", default=[], metavar="MANIFEST", help="manifests (dev, test) whose sentences must not be used")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="rendering processes")
    p.add_argument("--rate", type=float, nargs=2, default=[0.85, 1.2], metavar=("LOW", "HIGH"), help="speaking-rate factor range")
    p.add_argument("--pitch", type=float, nargs=2, default=[0.85, 1.2], metavar=("LOW", "HIGH"), help="pitch factor range")
    p.add_argument("--min-words", type=int, default=3)
    p.add_argument("--max-words", type=int, default=25)
    p.add_argument("--list-voices", action="store_true", help="only report which voices are installed")
    p.set_defaults(handler=run_synth)
