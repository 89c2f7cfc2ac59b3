"""`asr lm ...` (n-gram and LSTM language models, the CRF phone LM, KenLM) and `asr tune-decoder`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from asr.cli import add_model_options, load_recognizer


def run_lm_build(args: argparse.Namespace) -> int:
    from ..lm import build_language_model

    folder = build_language_model(
        args.texts,
        args.output_dir,
        order=args.order,
        max_words=args.max_words,
        min_count=args.min_count,
        prune=tuple(args.prune),
        phones=args.phones,
    )
    config = json.loads((folder / "decoder.json").read_text())
    size = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    print(f"language model in {folder}: {config['words']} words, {config['sentences']} sentences, {size:.1f} MB", file=sys.stderr)
    return 0


def run_lm_oov(args: argparse.Namespace) -> int:
    from ..lm import oov_rates, word_counts

    rows = oov_rates(word_counts(args.texts), args.dev, args.sizes)
    names = [Path(m).parent.name for m in args.dev]
    print("| words | " + " | ".join(f"{n} OOV %" for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for row in rows:
        print(f"| {row['words']:,} | " + " | ".join(f"{row[str(m)]:.2f}" for m in args.dev) + " |")
    return 0


def run_lm_add_phones(args: argparse.Namespace) -> int:
    from ..lm import add_phone_lexicon

    words, guessed = add_phone_lexicon(args.folder)
    print(f"phone lexicon of {words} words written in {args.folder} ({guessed} spelled by espeak-ng)", file=sys.stderr)
    return 0


def run_lm_phones(args: argparse.Namespace) -> int:
    from asr.phones import PHONE_TOKENS

    from ..crf import estimate_ngram, perplexity, training_phone_sequences

    sequences, left_out = training_phone_sequences(args.manifests, PHONE_TOKENS)
    if not sequences:
        raise ValueError("no transcript could be spelled in phones")
    lm = estimate_ngram(sequences, PHONE_TOKENS, args.order, discount=args.discount)
    dev = [s for manifest in args.dev for s in training_phone_sequences([manifest], PHONE_TOKENS)[0]]
    lm.save(args.output)
    kind = "bigram" if args.order == 2 else "trigram"
    report = f"phone {kind} of {len(sequences)} transcripts ({left_out} left out: a word without a pronunciation) -> {args.output}"
    report += f"; perplexity {perplexity(lm, sequences):.2f} on them"
    if dev:
        report += f", {perplexity(lm, dev):.2f} on {len(dev)} dev transcripts"
    print(report, file=sys.stderr)
    return 0


def run_lm_install(args: argparse.Namespace) -> int:
    from ..lm import install_kenlm

    for path in install_kenlm(args.prefix, args.jobs):
        print(f"installed {path}", file=sys.stderr)
    return 0


def run_lm_train_lstm(args: argparse.Namespace) -> int:
    from asr.nnlm import NeuralLMConfig

    from ..nnlm import NeuralLMTraining, install_neural_lm, prepare_corpus, train_neural_lm

    work = Path(args.work)
    NeuralLMConfig(args.max_words + 2, args.embed_dim, args.hidden_size, args.layers, tuple(args.cutoffs))  # checked before reading
    settings = NeuralLMTraining(args.minutes, args.batch_size, args.bptt, args.learning_rate, threads=args.threads)
    print(f"reading the text into {work} ...", file=sys.stderr)
    corpus = prepare_corpus(args.texts, work, args.max_words)
    print(
        f"corpus: {corpus['tokens']:,} words ({100 * corpus['unknown_rate']:.2f} % outside the {corpus['words']:,}-word vocabulary)",
        file=sys.stderr,
    )
    config = NeuralLMConfig(corpus["words"], args.embed_dim, args.hidden_size, args.layers, tuple(args.cutoffs))
    lm = train_neural_lm(work, config, settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    lm.info["sources"] = corpus["sources"]
    path = install_neural_lm(lm, args.output)
    size = path.stat().st_size / 1e6
    print(f"LSTM language model in {path}: {lm.parameters / 1e6:.1f} M parameters, {size:.1f} MB, {lm.info}", file=sys.stderr)
    return 0


def add_lm_parser(subparsers) -> None:
    lm = subparsers.add_parser("lm", help="build word n-gram language models for beam search")
    commands = lm.add_subparsers(dest="lm_command", required=True)
    p = commands.add_parser("build", help="normalise text and build a KenLM model plus lexicon")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="text files (.txt, .gz, .xz; a sentence or paragraph a line), JSONL manifests")
    p.add_argument("-o", "--output-dir", required=True)
    p.add_argument("--order", type=int, default=3)
    p.add_argument("--max-words", type=int, default=60_000, help="vocabulary size (most frequent words)")
    p.add_argument("--min-count", type=int, default=2, help="drop words seen fewer times")
    p.add_argument("--prune", type=int, nargs="+", default=[0, 0, 1], help="lmplz --prune thresholds per order")
    p.add_argument("--phones", action="store_true", help="also write a phone lexicon (as `asr lm add-phones`)")
    p.set_defaults(handler=run_lm_build)
    p = commands.add_parser(
        "add-phones",
        help="add a phone lexicon to a language-model folder, for models trained with --phones",
        description="Spell every word of the folder's lexicon in ARPAbet phones (all CMUdict pronunciations; espeak-ng for "
        "words CMUdict lacks) and name the file in decoder.json. Then tune it: asr tune-decoder --units phones.",
    )
    p.add_argument("folder", help="language-model folder (from `asr lm build`)")
    p.set_defaults(handler=run_lm_add_phones)
    p = commands.add_parser(
        "phones",
        help="build the phone n-gram LM of CTC-CRF training (asr train --phone-loss crf --phone-lm FILE)",
        description="Spell the manifests' transcripts in ARPAbet phones (CMUdict; espeak-ng for the rest; word boundaries "
        "kept) and estimate a bigram or trigram over them with interpolated absolute discounting, each order down to "
        "the one below, the unigram add-one smoothed.",
    )
    p.add_argument("manifests", nargs="+", metavar="MANIFEST", help="training manifests (JSONL)")
    p.add_argument("-o", "--output", required=True, help="file to write (JSON)")
    p.add_argument("--dev", nargs="*", default=[], metavar="MANIFEST", help="also report the perplexity on these")
    p.add_argument("--order", type=int, choices=(2, 3), default=2, help="2: a bigram (81 CRF states), 3: a trigram (3,281)")
    p.add_argument("--discount", type=float, default=0.5, help="absolute discount of the n-gram counts")
    p.set_defaults(handler=run_lm_phones)
    p = commands.add_parser("oov", help="out-of-vocabulary rate of dev manifests for vocabularies of the texts' most frequent words")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="text files or JSONL manifests, as for `asr lm build`")
    p.add_argument("--dev", nargs="+", required=True, help="manifests whose transcripts are counted")
    p.add_argument("--sizes", type=int, nargs="+", default=[60_000, 100_000, 150_000, 200_000])
    p.set_defaults(handler=run_lm_oov)
    _add_train_lstm_parser(commands)
    p = commands.add_parser("install-kenlm", help="build KenLM's lmplz and build_binary from its PyPI source package")
    p.add_argument("--prefix", default=str(Path.home() / ".local"), help="installs into PREFIX/bin")
    p.add_argument("--jobs", type=int, default=2)
    p.set_defaults(handler=run_lm_install)


def _add_train_lstm_parser(commands) -> None:
    p = commands.add_parser(
        "train-lstm",
        help="train the LSTM language model that rescores final hypotheses (CPU, resumable)",
        description="Normalise the text into --work (once), train for --minutes of wall-clock time with checkpoints "
        "every 5 minutes (run the same command again to resume after an interruption), then write the model: into "
        "a language-model folder (named in its decoder.json) or to a file. Tune its weight with asr tune-decoder.",
    )
    p.add_argument("texts", nargs="+", metavar="TEXT", help="text files or JSONL manifests, as for `asr lm build`")
    p.add_argument("-o", "--output", required=True, help="language-model folder (from `asr lm build`) or a .pt file")
    p.add_argument("--work", required=True, help="folder for the prepared text and checkpoints (resumes from them)")
    p.add_argument("--minutes", type=float, default=60.0, help="training time (the learning rate decays over it)")
    p.add_argument("--max-words", type=int, default=100_000, help="vocabulary size (most frequent words)")
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--cutoffs", type=int, nargs="+", default=[2000, 10000], help="adaptive softmax cluster boundaries")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bptt", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(handler=run_lm_train_lstm)


def run_tune(args: argparse.Namespace) -> int:
    from asr.lm import LanguageModel

    from ..tune import tune_decoder

    # emissions only (the tuner builds its decoders); for phones the recogniser needs the LM to choose them
    decoder = "beam" if args.units == "phones" else "greedy"
    lm = LanguageModel.load(args.lm) if args.lm else None
    recognizer = load_recognizer(args, decoder=decoder, hotwords=())
    if lm is None:
        from asr.recognizer import BUNDLED_LM

        lm = LanguageModel.load(BUNDLED_LM)
    best, results = tune_decoder(
        recognizer,
        lm,
        args.manifests,
        args.lm_weights,
        args.word_scores,
        args.beam_size,
        args.limit,
        log=lambda m: print(m, file=sys.stderr),
        char_weights=args.char_weights,
        criterion=args.criterion,
        lstm_weights=args.lstm_weights,
    )
    print(json.dumps({"best": best.to_dict(), "results": results}, indent=2))
    if not args.dry_run:
        lm.for_units(recognizer.units).save_settings(best)
        rerank = f" char_weight={best.char_weight}" if recognizer.units == "phones" else ""
        rerank += f" lstm_weight={best.lstm_weight}" if lm.lstm_file is not None else ""
        print(
            f"saved lm_weight={best.lm_weight} word_score={best.word_score}{rerank} for {recognizer.units} in {lm.folder / 'decoder.json'}",
            file=sys.stderr,
        )
    return 0


def add_tune_parser(subparsers) -> None:
    from ..tune import CRITERIA

    p = subparsers.add_parser("tune-decoder", help="grid-search LM weight and word score on dev manifests; store the best with the LM")
    p.add_argument("manifests", nargs="+", metavar="MANIFEST")
    add_model_options(p)
    p.add_argument("--lm-weights", type=float, nargs="+", default=[0.3, 0.5, 0.8, 1.1, 1.5])
    p.add_argument("--word-scores", type=float, nargs="+", default=[-1.0, 0.0, 1.0, 2.0])
    p.add_argument(
        "--lstm-weights",
        type=float,
        nargs="+",
        help="weights of the LM folder's LSTM LM when rescoring finals (default: the LM's own value)",
    )
    p.add_argument(
        "--char-weights",
        type=float,
        nargs="+",
        help="with --units phones: weights of the character layer when reranking finals (default: the LM's own value)",
    )
    p.add_argument("--limit", type=int, default=0, help="use the first N utterances of each manifest")
    p.add_argument(
        "--criterion",
        choices=CRITERIA,
        default="pooled",
        help="pooled: the lowest WER over all words; mean: the lowest mean of the manifests' WERs (each domain counts the same)",
    )
    p.add_argument("--dry-run", action="store_true", help="report without saving")
    p.set_defaults(handler=run_tune)
