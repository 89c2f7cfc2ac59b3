"""The `asr` command: transcribe and benchmark here; other packages add subcommands via entry points."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from importlib.metadata import entry_points
from pathlib import Path

from .batch import (
    READ_ERRORS,
    STATUS_FILE,
    STDIN,
    BatchError,
    BatchInput,
    RecognizerLoader,
    RunSummary,
    Shard,
    StatusLog,
    check_unique_outputs,
    collect_inputs,
    pending_inputs,
    process_rows,
    transcribe_to_files,
)
from .errors import EXIT_SOME_FAILED, EXIT_USAGE, REPORTED_ERRORS
from .formats import FORMATS, format_transcript
from .recognizer import DECODERS, UNIT_CHOICES


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
    add_punctuation_options(p, default=not several_models)  # a server punctuates for the connections that ask (or --punctuate)
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


def hotword_phrases(args: argparse.Namespace) -> list[str]:
    """The --hotwords/--hotwords-file phrases (none: an empty list)."""
    return _phrases(args.hotwords, args.hotwords_file) or []


def grammar_phrases(args: argparse.Namespace) -> list[str] | None:
    """The --grammar/--grammar-file phrases, or None."""
    return _phrases(args.grammar, args.grammar_file)


DECODER_SETTINGS = ("beam_size", "lm_weight", "word_score", "char_weight", "lstm_weight")  # DecoderSettings given as options


def decode_options(args: argparse.Namespace, **overrides):
    """DecodeOptions from the arguments of ``add_model_options`` (the one reader of them); ``overrides`` replace fields."""
    from .recognizer import DecodeOptions

    grammar = grammar_phrases(args)
    fields = dict(
        chunk_frames=args.chunk_frames,
        lookahead_frames=args.lookahead_frames,
        decoder=args.decoder,
        lm=args.lm,
        settings={name: getattr(args, name) for name in DECODER_SETTINGS if getattr(args, name) is not None},
        hotwords=tuple(hotword_phrases(args)),
        grammar=None if grammar is None else tuple(grammar),
        units=args.units,
        lstm=args.lstm,
        punctuate=args.punctuate,
        punctuation_model=args.punctuation_model,
    )
    return DecodeOptions(**(fields | overrides))


def load_recognizer(args: argparse.Namespace, model: str | None = None, threads: int | None = None, **overrides):
    """The recogniser of the arguments of ``add_model_options``: ``model`` and ``threads`` (default: ``--model`` and
    ``--threads``), ``overrides`` of its DecodeOptions fields (e.g. ``alternatives``)."""
    import torch

    from .recognizer import load_model

    threads = args.threads if threads is None else threads
    if threads:
        torch.set_num_threads(threads)
    return load_model(model or args.model, args.device, decode_options(args, **overrides))


def run_transcribe(args: argparse.Namespace, transcribe=None) -> int:
    """``transcribe(source) -> Transcript`` (a path or encoded bytes) defaults to a local recogniser."""
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
    shard = Shard.parse(args.shard) if args.shard else Shard()
    inputs, missing = collect_inputs(args.paths)
    inputs = shard.select(inputs)
    if args.output_dir:
        check_unique_outputs(inputs)
    if args.ray is not None and (not args.output_dir or any(item.source == STDIN for item in inputs)):
        raise BatchError("--ray writes into an output folder (-o) and reads files, not standard input")
    for path in missing:
        print(f"error: {path}: no such file or folder", file=sys.stderr)
    if not inputs and not (args.output_dir and shard.count > 1):
        print("error: no audio files to transcribe", file=sys.stderr)
        return EXIT_USAGE if not missing else EXIT_SOME_FAILED
    if args.jobs < 1:
        raise ValueError("--jobs must be at least 1")
    if args.output_dir:
        return _run_batch(args, transcribe, inputs, missing, formats, shard)
    local = None
    if transcribe is None:
        local = _local_recognizer(args)
        transcribe = local.transcribe
    stdin_file = _spool_stdin() if any(item.source == STDIN for item in inputs) else None
    try:
        return _transcribe_inputs(args, transcribe, local, inputs, missing, formats, stdin_file)
    finally:
        if stdin_file is not None:
            stdin_file.unlink(missing_ok=True)


def _threads_per_job(args: argparse.Namespace) -> int:
    """--threads, or with several --jobs and no --threads the cores shared among the jobs (0: torch's default)."""
    if args.jobs > 1 and not args.threads:
        return max(1, (os.cpu_count() or 1) // args.jobs)
    return args.threads


def _local_recognizer(args: argparse.Namespace):
    """The recogniser the arguments describe, with its punctuator loaded (a broken one fails here, not per input)."""
    recognizer = load_recognizer(args, threads=_threads_per_job(args), alternatives=args.alternatives)
    if recognizer.options.punctuate:
        try:
            recognizer.punctuator  # noqa: B018 - loaded now
        except ValueError as error:
            raise ValueError(f"{error} (--no-punctuate leaves the words as recognised)") from error
    if args.alternatives > 1 and recognizer.decoder_name == "greedy" and recognizer.grammar is None:
        print("note: the greedy decoder gives one alternative; N-best needs beam search (--decoder beam)", file=sys.stderr)
    return recognizer


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
    """Transcribe every input to standard output; ``local``: the recogniser behind ``transcribe`` when it is local."""
    single = len(inputs) == 1 and not args.no_progress and local is not None

    def work(item: BatchInput):
        path = str(stdin_file) if item.source == STDIN else item.source
        try:
            if not single:
                return transcribe(path), None
            progress = _audio_progress(path)
            try:
                return local.transcribe(path, progress=progress), None
            finally:
                if progress is not None:
                    sys.stderr.write("\r" + " " * 60 + "\r")  # erase the progress line
        except READ_ERRORS as error:
            return None, str(error)

    failed = 0
    progress = _file_progress(len(inputs), args.no_progress)
    several = len(inputs) > 1 or len(formats) > 1
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for item, (transcript, error) in zip(inputs, pool.map(work, inputs)):
            if progress is not None:
                progress.update(1)
            if error is not None:
                failed += 1
                _say(progress, f"error: {item.source}: {error}")
                continue
            name = "<stdin>" if item.source == STDIN else item.source
            for fmt in formats:
                text = format_transcript(transcript, fmt, name)
                if fmt == "json" and several:
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


def _file_progress(total: int, disabled: bool):
    """A progress bar over files (with audio hours) on a terminal; None when output is piped or logged."""
    if total < 2 or disabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="file", file=sys.stderr, dynamic_ncols=True)


def _say(progress, message: str) -> None:
    (progress.write(message, file=sys.stderr) if progress is not None else print(message, file=sys.stderr))


def _run_batch(args, transcribe, inputs: list[BatchInput], missing: list[str], formats: list[str], shard: Shard) -> int:
    """Transcribe into the output folder: done inputs skipped, each output renamed into place, a status row per input."""
    out_dir = Path(args.output_dir)
    pending, skipped = pending_inputs(inputs, out_dir, formats, args.overwrite)
    summary = RunSummary(skipped=skipped)
    started = time.perf_counter()
    if pending:
        rows = _batch_rows(args, transcribe, pending, out_dir, formats)
        status = StatusLog(out_dir / shard.status_name())
        progress = _file_progress(len(pending), args.no_progress)
        try:
            for row in rows:
                status.append(row)
                summary.add(row)
                if row.error is not None:
                    _say(progress, f"error: {row.input}: {row.error}")
                if progress is not None:
                    progress.set_postfix_str(f"{summary.audio_seconds / 3600:.2f} h of audio", refresh=False)
                    progress.update(1)
        finally:
            if progress is not None:
                progress.close()
    summary.wall_seconds = time.perf_counter() - started
    print(("shard " + f"{shard.index}/{shard.count}: " if shard.count > 1 else "") + summary.text(), file=sys.stderr)
    if summary.failed or missing:
        print(f"{summary.failed + len(missing)} of {len(inputs) + len(missing)} input(s) failed", file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0


def _batch_rows(args, transcribe, pending: list[BatchInput], out_dir: Path, formats: list[str]):
    """Status rows of the pending inputs as they finish: on Ray, or in --jobs threads here."""
    if args.ray is not None:
        from .batch_ray import ray_rows

        threads = args.threads or 1  # per actor
        loader = RecognizerLoader(args.model, args.device, decode_options(args, alternatives=args.alternatives), threads)
        return ray_rows(pending, out_dir, formats, loader, args.jobs, threads, args.ray or None)
    stdin_file = _spool_stdin() if any(item.source == STDIN for item in pending) else None
    if transcribe is None and args.jobs > 1:  # a process per job: decoding holds the interpreter lock
        loader = RecognizerLoader(args.model, args.device, decode_options(args, alternatives=args.alternatives), args.threads or 1)
        return _removing(stdin_file, process_rows(pending, out_dir, formats, loader, args.jobs, stdin_file and str(stdin_file)))
    if transcribe is None:
        transcribe = _local_recognizer(args).transcribe
    return _local_rows(transcribe, pending, out_dir, formats, args.jobs, stdin_file)


def _removing(path: Path | None, rows):
    """``rows``, then remove the spooled standard input ``path`` (when there is one)."""
    try:
        yield from rows
    finally:
        if path is not None:
            path.unlink(missing_ok=True)


def _local_rows(transcribe, pending: list[BatchInput], out_dir: Path, formats: list[str], jobs: int, stdin_file: Path | None):
    def read(source: str):
        return transcribe(str(stdin_file) if source == STDIN else source)

    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(transcribe_to_files, read, item, out_dir, formats) for item in pending]
            try:
                for future in as_completed(futures):
                    yield future.result()
            finally:
                for future in futures:
                    future.cancel()
    finally:
        if stdin_file is not None:
            stdin_file.unlink(missing_ok=True)


def add_transcribe_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "transcribe",
        help="transcribe audio files, folders or stdin",
        description="Transcribe audio files (wav, flac, ogg/opus, mp3, ...), folders (recursively) or '-' for stdin.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="audio file, folder, JSONL manifest, or - for stdin")
    p.add_argument("-f", "--format", default="txt", help=f"output format(s), comma-separated: {', '.join(FORMATS)}")
    p.add_argument(
        "-o",
        "--output-dir",
        help="write <name>.<format> files here (the path relative to the folder or manifest given) instead of printing, "
        f"and a row per input to {STATUS_FILE}; inputs whose outputs exist are skipped, so the same command resumes a run",
    )
    p.add_argument("--overwrite", action="store_true", help="with -o: transcribe inputs whose outputs exist again")
    p.add_argument(
        "--shard",
        metavar="K/N",
        help="take only the inputs whose index in the sorted list is K mod N (K from 0): one of N machines or processes, "
        "e.g. --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT",
    )
    p.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=1,
        help="files transcribed in parallel: with -o worker processes (with --ray: actors), else threads",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="with -o: run on a Ray cluster (ADDRESS, or 'auto'; none: a local one), one actor per --jobs with --threads "
        "CPUs each; needs pip install 'bilstm-asr[ray]'",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--alternatives", type=int, default=0, metavar="N", help="add the N best hypotheses with confidences to json output")
    add_model_options(p)
    p.set_defaults(handler=run_transcribe)


PUNCTUATE_BATCH_WORDS = 50_000  # lines are punctuated (and written) in batches of about this many words


def run_punctuate(args: argparse.Namespace) -> int:
    """Text in, one paragraph a line; the same words out, cased and punctuated, one line for each line in."""
    from .punctuation import load_punctuator

    punctuator = load_punctuator(args.punctuation_model)
    source = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115 - closed below
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

    recognizer = load_recognizer(args)
    result = offline_benchmark(recognizer, args.paths)
    import json

    print(json.dumps(result, indent=2))
    return 0


def run_bench_profile(args: argparse.Namespace) -> int:
    import json

    from .bench import profile_table, profile_transcription

    report = profile_transcription(load_recognizer(args), args.path)
    print(json.dumps(report, indent=2) if args.json else profile_table(report))
    return 0


def run_bench_batch(args: argparse.Namespace) -> int:
    import json

    from .batch_bench import batch_benchmark

    report = batch_benchmark(args.paths, args.setups, args.options, args.limit, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(report, indent=2))
    return 0


def add_bench_parser(subparsers):
    bench = subparsers.add_parser("bench", help="benchmarks (speed, memory, accuracy)")
    bench_commands = bench.add_subparsers(dest="benchmark", required=True)
    p = bench_commands.add_parser("offline", help="offline real-time factor and peak memory")
    p.add_argument("paths", nargs="+", metavar="AUDIO_OR_MANIFEST", help="audio files or JSONL manifests")
    add_model_options(p)
    p.set_defaults(handler=run_bench_offline, threads=1)
    p = bench_commands.add_parser("profile", help="where the time of one `asr transcribe` goes: features, model, search, finals, ...")
    p.add_argument("path", metavar="AUDIO", help="a recording (speech: the search's cost depends on it)")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    add_model_options(p)
    p.set_defaults(handler=run_bench_profile, threads=1)
    p = bench_commands.add_parser(
        "batch",
        help="batch transcription throughput: the same files with each setup (e.g. --jobs 2 against --ray --jobs 2)",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="audio files, folders or JSONL manifests")
    p.add_argument("--setups", nargs="+", default=["--jobs 1", "--jobs 2"], help="extra `asr transcribe` options of each run")
    p.add_argument("--options", default="", help="`asr transcribe` options of every run (e.g. '-f txt,json')")
    p.add_argument("--limit", type=int, default=0, help="the first N inputs in sorted order (0: all)")
    p.set_defaults(handler=run_bench_batch)
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
    except REPORTED_ERRORS as error:
        if os.environ.get("ASR_TRACEBACK"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"interrupted after {time.time() - started:.0f} s", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
