"""The `asr` command: transcribe and benchmark here; other packages add subcommands via entry points."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import entry_points
from pathlib import Path

from .audio import AUDIO_SUFFIXES, AudioError
from .checkpoint import CheckpointError
from .formats import FORMATS, format_transcript
from .lm import LanguageModelError
from .recognizer import DECODERS, UNIT_CHOICES

EXIT_SOME_FAILED = 1
EXIT_USAGE = 2


def add_model_options(p: argparse.ArgumentParser, several_models: bool = False) -> None:
    """Model and decoding options; ``several_models``: -m may be repeated, as PATH or NAME=PATH (a server's models)."""
    if several_models:
        p.add_argument(
            "-m",
            "--model",
            action="append",
            metavar="[NAME=]PATH",
            help="model file (default: the bundled English model); repeat as NAME=PATH to serve more models, which a client "
            'picks with {"config": {"model": "NAME"}}; the first is also named "default"',
        )
    else:
        p.add_argument("-m", "--model", help="model file (default: the bundled English model)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for inference (0 = torch's default)")
    p.add_argument("--chunk-frames", type=int, default=None, help="override the model's chunk size (30 ms frames)")
    p.add_argument("--lookahead-frames", type=int, default=None, help="override the model's lookahead (30 ms frames)")
    d = p.add_argument_group("decoding")
    d.add_argument("--decoder", choices=DECODERS, default="auto", help="auto: beam search with the LM when there is one, else greedy")
    d.add_argument(
        "--lm",
        help="language-model folder from `asr lm build` (default: the bundled LM with the bundled model); "
        "'none' with --decoder beam: lexicon-free beam search that can spell any word",
    )
    d.add_argument("--beam-size", type=int, help="hypotheses kept per frame")
    d.add_argument("--lm-weight", type=float, help="language-model weight")
    d.add_argument("--word-score", type=float, help="score added per word (insertion bonus)")
    d.add_argument(
        "--char-weight",
        type=float,
        help="phones: weight of the character layer when reranking the final hypotheses (0 = off; default: the LM's tuned value)",
    )
    d.add_argument(
        "--lstm-weight", type=float, help="weight of the LSTM LM when rescoring the final hypotheses (default: the LM's tuned value)"
    )
    d.add_argument(
        "--no-lstm", dest="lstm", action="store_false", help="do not rescore final hypotheses with the LM folder's LSTM LM (faster)"
    )
    d.add_argument("--hotwords", default="", help="comma-separated words or phrases to favour (names, domain terms)")
    d.add_argument("--hotwords-file", help="file with one word or phrase per line to favour")
    d.add_argument(
        "--grammar",
        help='comma-separated phrases the output is restricted to, "[unk]" for anything else (e.g. "yes,no,[unk]")',
    )
    d.add_argument("--grammar-file", help="file with one grammar phrase per line")
    if not several_models:  # a server punctuates only for the connections that ask (asr serve --punctuate: all)
        add_punctuation_options(p, default=True)
    d.add_argument(
        "--units",
        choices=UNIT_CHOICES,
        default="auto",
        help="what beam search with an LM decodes: auto = phones when the model has a phone output layer and the LM a phone "
        "lexicon (`asr lm add-phones`), else characters",
    )


def add_punctuation_options(p: argparse.ArgumentParser, default: bool) -> None:
    """--no-punctuate (or --punctuate where it is off by default) and --punctuation-model."""
    f = p.add_argument_group("capitals and punctuation")
    if default:
        f.add_argument("--no-punctuate", dest="punctuate", action="store_false", help="leave the words lower case without punctuation")
    else:
        f.add_argument("--punctuate", action="store_true", help="cased, punctuated finals for every connection (else only when asked)")
    f.add_argument("--punctuation-model", help="punctuation model file (default: the bundled one; train with `asr train-punctuator`)")


def _phrases(listed: str | None, file: str | None) -> list[str] | None:
    """Comma-separated phrases plus a file's lines; None when neither was given."""
    if listed is None and file is None:
        return None
    phrases = [p.strip() for p in (listed or "").split(",") if p.strip()]
    if file:
        phrases += [line.strip() for line in Path(file).read_text(encoding="utf-8").splitlines() if line.strip()]
    return phrases


def grammar_phrases(args: argparse.Namespace) -> list[str] | None:
    """The --grammar/--grammar-file phrases, or None."""
    return _phrases(getattr(args, "grammar", None), getattr(args, "grammar_file", None))


def decode_options(args: argparse.Namespace):
    """DecodeOptions from the parsed model/decoding arguments."""
    from .recognizer import DecodeOptions

    hotwords = _phrases(args.hotwords, args.hotwords_file) or []
    grammar = grammar_phrases(args)
    settings = {
        k: v
        for k, v in (
            ("beam_size", args.beam_size),
            ("lm_weight", args.lm_weight),
            ("word_score", args.word_score),
            ("char_weight", args.char_weight),
            ("lstm_weight", getattr(args, "lstm_weight", None)),
        )
        if v is not None
    }
    return DecodeOptions(
        args.chunk_frames,
        args.lookahead_frames,
        args.decoder,
        args.lm,
        settings,
        tuple(hotwords),
        None if grammar is None else tuple(grammar),
        getattr(args, "alternatives", 0),
        getattr(args, "units", "auto"),
        lstm=getattr(args, "lstm", True),
        punctuate=getattr(args, "punctuate", True),
        punctuation_model=getattr(args, "punctuation_model", None),
    )


def load_recognizer(args: argparse.Namespace):
    import torch

    from .recognizer import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model, args.device, decode_options(args))


def expand_inputs(paths: list[str]) -> tuple[list[tuple[str, Path | None]], list[str]]:
    """Files and folders (searched recursively for audio) -> [(path, root folder or None)], missing paths."""
    found, missing = [], []
    for raw in paths:
        if raw == "-":
            found.append(("-", None))
            continue
        path = Path(raw)
        if path.is_dir():
            found.extend((str(f), path) for f in sorted(path.rglob("*")) if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES)
        elif path.exists():
            found.append((raw, None))
        else:
            missing.append(raw)
    return found, missing


def _output_path(out_dir: Path, source: str, root: Path | None, fmt: str) -> Path:
    if source == "-":
        return out_dir / f"stdin.{fmt}"
    relative = Path(source).relative_to(root) if root else Path(Path(source).name)
    return out_dir / relative.with_suffix(f".{fmt}")


def run_transcribe(args: argparse.Namespace, transcribe=None) -> int:
    """``transcribe(source) -> Transcript`` (a path or encoded bytes) defaults to a local recogniser."""
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        print(f"error: unknown format(s) {unknown}; choose from {', '.join(FORMATS)}", file=sys.stderr)
        return EXIT_USAGE
    inputs, missing = expand_inputs(args.paths)
    for path in missing:
        print(f"error: {path}: no such file or folder", file=sys.stderr)
    if not inputs:
        print("error: no audio files to transcribe", file=sys.stderr)
        return EXIT_USAGE if not missing else EXIT_SOME_FAILED
    if args.jobs < 1:
        print("error: --jobs must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if args.jobs > 1 and not args.threads:
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    if transcribe is None:
        try:
            recognizer = load_recognizer(args)
        except (CheckpointError, LanguageModelError, ValueError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE
        if recognizer.options.punctuate:
            try:
                recognizer.punctuator  # noqa: B018 - load it now: a missing or broken file fails here, not per input
            except ValueError as error:
                print(f"error: {error} (--no-punctuate leaves the words as recognised)", file=sys.stderr)
                return EXIT_USAGE
        if args.alternatives > 1 and recognizer.decoder_name == "greedy" and recognizer.grammar is None:
            print("note: the greedy decoder gives one alternative; N-best needs beam search (--decoder beam)", file=sys.stderr)
        transcribe = recognizer.transcribe
        local = recognizer
    else:
        local = None
    stdin_file = _spool_stdin() if any(src == "-" for src, _ in inputs) else None
    try:
        return _transcribe_inputs(args, transcribe, local, inputs, missing, formats, stdin_file)
    finally:
        if stdin_file is not None:
            stdin_file.unlink(missing_ok=True)


def _spool_stdin() -> Path:
    """Copy standard input (a stream of unknown length) to a temporary file, block by block: memory stays bounded."""
    import shutil
    import tempfile

    with tempfile.NamedTemporaryFile(prefix="asr-stdin-", delete=False) as handle:
        shutil.copyfileobj(sys.stdin.buffer, handle, 1 << 20)
    return Path(handle.name)


PROGRESS_MIN_SECONDS = 60.0  # recordings at least this long show their progress in audio time on a terminal


def _audio_progress(source: str):
    """A ``transcribe`` progress callback drawing audio time done / total on stderr, or None when stderr is not a
    terminal (output piped or logged) or the recording is short."""
    if not sys.stderr.isatty():
        return None
    from .audio import audio_duration

    total = audio_duration(source)
    if total is not None and total < PROGRESS_MIN_SECONDS:
        return None

    def update(seconds: float) -> None:
        done = f"{_clock(seconds)} / {_clock(total)} ({100 * seconds / total:.0f} %)" if total else _clock(seconds)
        sys.stderr.write(f"\raudio transcribed: {done} ")
        sys.stderr.flush()

    return update


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _transcribe_inputs(args, transcribe, local, inputs, missing, formats, stdin_file: Path | None) -> int:
    """Transcribe and write every input; ``local``: the recogniser behind ``transcribe`` when it is local."""
    out_dir = Path(args.output_dir) if args.output_dir else None
    single = len(inputs) == 1 and not args.no_progress and local is not None

    def work(item: tuple[str, Path | None]):
        source, _ = item
        path = str(stdin_file) if source == "-" else source
        try:
            if not single:
                return transcribe(path), None
            progress = _audio_progress(path)
            try:
                return local.transcribe(path, progress=progress), None
            finally:
                if progress is not None:
                    sys.stderr.write("\r" + " " * 60 + "\r")  # erase the progress line
        except (AudioError, RuntimeError, ValueError, MemoryError, OSError) as error:
            return None, str(error)

    failed = 0
    progress = None
    if len(inputs) > 1 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=len(inputs), unit="file", file=sys.stderr, dynamic_ncols=True)
    several = len(inputs) > 1 or len(formats) > 1
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for (source, root), (transcript, error) in zip(inputs, pool.map(work, inputs)):
            if progress is not None:
                progress.update(1)
            if error is not None:
                failed += 1
                message = f"error: {source}: {error}"
                (progress.write(message, file=sys.stderr) if progress is not None else print(message, file=sys.stderr))
                continue
            name = "<stdin>" if source == "-" else source
            for fmt in formats:
                text = format_transcript(transcript, fmt, name)
                if out_dir is not None:
                    target = _output_path(out_dir, source, root, fmt)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(text, encoding="utf-8")
                elif fmt == "json" and several:
                    import json

                    sys.stdout.write(json.dumps(json.loads(text)) + "\n")
                else:
                    sys.stdout.write((f"==> {name} ({fmt}) <==\n" if several else "") + text)
            sys.stdout.flush()
    if progress is not None:
        progress.close()
    if failed or missing:
        print(f"{failed + len(missing)} of {len(inputs) + len(missing)} input(s) failed", file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0


def add_transcribe_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "transcribe",
        help="transcribe audio files, folders or stdin",
        description="Transcribe audio files (wav, flac, ogg/opus, mp3, ...), folders (recursively) or '-' for stdin.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="audio file, folder, or - for stdin")
    p.add_argument("-f", "--format", default="txt", help=f"output format(s), comma-separated: {', '.join(FORMATS)}")
    p.add_argument("-o", "--output-dir", help="write <name>.<format> files here instead of printing")
    p.add_argument("-j", "--jobs", type=int, default=1, help="files transcribed in parallel")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--alternatives", type=int, default=0, metavar="N", help="add the N best hypotheses with confidences to json output")
    add_model_options(p)
    p.set_defaults(handler=run_transcribe)


PUNCTUATE_BATCH_WORDS = 50_000  # lines are punctuated (and written) in batches of about this many words


def run_punctuate(args: argparse.Namespace) -> int:
    """Text in, one paragraph a line; the same words out, cased and punctuated, one line for each line in."""
    from .punctuation import load_punctuator

    try:
        punctuator = load_punctuator(args.punctuation_model)
        source = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115 - closed below
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    name = "<stdin>" if args.file == "-" else args.file
    number, batch, words = 0, [], 0
    try:
        with source:
            for number, raw in enumerate(source, 1):
                if b"\x00" in raw:
                    raise ValueError(f"{name} is a binary file, not text (a NUL byte on line {number})")
                line = raw.decode("utf-8").rstrip("\r\n")
                batch.append(line)
                words += line.count(" ") + 1
                if words >= PUNCTUATE_BATCH_WORDS:
                    _write_lines(punctuator.punctuate_lines(batch))
                    batch, words = [], 0
            _write_lines(punctuator.punctuate_lines(batch))
    except UnicodeDecodeError as error:
        message = f"{name} is not UTF-8 text (line {number}: {error.reason})"
    except (ValueError, OSError) as error:
        message = str(error)
    else:
        return 0
    try:
        _write_lines(punctuator.punctuate_lines(batch))  # the lines read before the error are not lost
    except OSError:
        pass  # the output itself failed (a closed pipe)
    print(f"error: {message}; the lines before it were written", file=sys.stderr)
    return EXIT_USAGE


def _write_lines(lines: list[str]) -> None:
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()


def add_punctuate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "punctuate",
        help="restore capitals and punctuation in lower-case text (one paragraph a line)",
        description="Read text (what a recogniser writes: lower case, no punctuation; one paragraph a line) and write the "
        "same words cased and punctuated, one line for each line read. Words are never added, dropped or changed.",
    )
    p.add_argument("file", nargs="?", default="-", metavar="FILE", help="text file, or - for standard input (the default)")
    p.add_argument("--punctuation-model", help="punctuation model file (default: the bundled one)")
    p.set_defaults(handler=run_punctuate)


def run_bench_offline(args: argparse.Namespace) -> int:
    from .bench import offline_benchmark

    try:
        recognizer = load_recognizer(args)
        result = offline_benchmark(recognizer, args.paths)
    except (CheckpointError, LanguageModelError, AudioError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    import json

    print(json.dumps(result, indent=2))
    return 0


def add_bench_parser(subparsers):
    bench = subparsers.add_parser("bench", help="benchmarks (speed, memory, accuracy)")
    bench_commands = bench.add_subparsers(dest="benchmark", required=True)
    p = bench_commands.add_parser("offline", help="offline real-time factor and peak memory")
    p.add_argument("paths", nargs="+", metavar="AUDIO_OR_MANIFEST", help="audio files or JSONL manifests")
    add_model_options(p)
    p.set_defaults(handler=run_bench_offline, threads=1)
    return bench_commands


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="asr", description="Speech recognition with a latency-controlled BiLSTM-CTC model.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_transcribe_parser(subparsers)
    add_punctuate_parser(subparsers)
    bench_commands = add_bench_parser(subparsers)
    for entry in sorted(entry_points(group="asr.commands"), key=lambda e: e.name):
        entry.load()(subparsers, bench_commands)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning  # library warnings (an unpronounceable hotword, say) as one plain line
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.time()
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"interrupted after {time.time() - started:.0f} s", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
