"""`asr train-punctuator` and `asr bench punctuate`: the capitals-and-punctuation model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def run_train_punctuator(args: argparse.Namespace) -> int:
    from asr.punctuation import PunctuatorConfig

    from ..punctuation import PunctuatorTraining, prepare_punctuation_corpus, score_held_out, train_punctuator

    work, output = Path(args.work), Path(args.output)
    config = PunctuatorConfig(args.vocabulary, args.ngram_buckets, hidden=args.hidden_size, layers=args.layers)
    settings = PunctuatorTraining(args.minutes, args.batch_size, args.window, args.learning_rate, threads=args.threads)
    if output.is_dir() or output.suffix != ".pt":
        raise ValueError(f"--output must be a .pt file, not {output}")
    print(f"labelling the text into {work} (once) ...", file=sys.stderr)
    corpus = prepare_punctuation_corpus(args.texts, work)
    print(
        f"corpus: {corpus['train_words']:,} words to train on; {corpus['held_out_words']:,} words in "
        f"{len(corpus['held_out_books'])} held-out books",
        file=sys.stderr,
    )
    punctuator = train_punctuator(work, config, settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    print("scoring every held-out book ...", file=sys.stderr)
    punctuator.info |= {"sources": corpus["sources"], "held_out": score_held_out(work, punctuator)}
    punctuator.save(output)
    size = output.stat().st_size / 1e6
    print(json.dumps(punctuator.info["held_out"]))
    print(f"punctuation model in {output}: {punctuator.parameters / 1e6:.1f} M parameters, {size:.1f} MB", file=sys.stderr)
    return 0


def add_train_punctuator_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train-punctuator",
        help="train the capitals-and-punctuation model on cased, punctuated text (CPU, resumable)",
        description="Label the text into --work (once; every 25th Project Gutenberg book is held out whole, with any copy of "
        "it), train for --minutes of wall-clock time with checkpoints every 5 minutes (run the same command again to resume "
        "after an interruption), score every held-out book, then write the model file.",
    )
    p.add_argument("texts", nargs="+", metavar="TEXT", help="cased, punctuated text files (.txt, .gz, .xz), a sentence or paragraph a line")
    p.add_argument("-o", "--output", required=True, help="model file to write (.pt)")
    p.add_argument("--work", required=True, help="folder for the labelled text and checkpoints (resumes from them)")
    p.add_argument("--minutes", type=float, default=60.0, help="training time (the learning rate decays over it)")
    p.add_argument("--vocabulary", type=int, default=20_000, help="words with their own embedding (the rest: spelling only)")
    p.add_argument("--ngram-buckets", type=int, default=32_768, help="hashed character n-gram embeddings")
    p.add_argument("--hidden-size", type=int, default=128, help="LSTM units per direction")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--window", type=int, default=128, help="words per training window")
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(handler=run_train_punctuator)


def run_bench_punctuate(args: argparse.Namespace) -> int:
    import torch

    from asr.punctuation import load_punctuator

    from ..punctuation import score_held_out

    torch.set_num_threads(args.threads)
    punctuator = load_punctuator(args.punctuation_model)
    scores = score_held_out(Path(args.work), punctuator, args.limit or None)
    print(json.dumps(scores, indent=2))
    return 0


def add_bench_punctuate_parser(bench_commands) -> None:
    p = bench_commands.add_parser(
        "punctuate",
        help="F1 of each mark and of capitals on held-out books, and words per second",
        description="Format the held-out books of a `asr train-punctuator` work folder (lower case, no marks, in "
        "paragraphs of about 150 words) and score the marks and capitals against the books' own.",
    )
    p.add_argument("--work", required=True, help="work folder of `asr train-punctuator` (its held-out books)")
    p.add_argument("--punctuation-model", help="model file (default: the bundled one)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N held-out words (0: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: words per second on one core)")
    p.set_defaults(handler=run_bench_punctuate)
