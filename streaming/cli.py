"""`asr mic` (live microphone transcription) and `asr bench stream`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from asr.cli import add_model_options, grammar_phrases, hotword_phrases, load_recognizer


def run_mic(args: argparse.Namespace) -> int:

    from .mic import LiveDisplay, capture, input_devices, resolve_device
    from .recognizer import Final, Partial, RecognitionStream

    if args.list_devices:
        devices = input_devices()
        if not devices:
            print("no audio input devices found", file=sys.stderr)
            return 1
        for d in devices:
            mark = "*" if d["default"] else " "
            print(f"{mark} {d['index']:3d}  {d['name']}  ({d['channels']} ch, {d['default_samplerate']:.0f} Hz)")
        return 0
    device, device_rate = resolve_device(args.input_device)
    rate = args.sample_rate or device_rate
    if args.enroll:
        return _enroll(args, device, rate)
    if args.server:
        return _mic_through_server(args, device, rate)
    recognizer = load_recognizer(args)
    options = stream_options(args)
    stream = RecognitionStream(recognizer, rate, options, punctuate=args.punctuate)
    display = LiveDisplay(sys.stdout)

    def show(events) -> None:
        for event in events:
            if args.json:
                print(json.dumps(event.to_dict()), flush=True)
            elif isinstance(event, Partial):
                display.partial(event.text)
            elif isinstance(event, Final):
                display.final(event.display_text, event.start, event.end)

    print(f"listening on device {device} at {rate} Hz (Ctrl+C to stop)", file=sys.stderr)
    try:
        blocks = capture(device, rate)
        for block in blocks:
            show(stream.accept(block))
            if 0 < args.max_seconds <= stream.seconds_received:
                blocks.close()
                break
    except KeyboardInterrupt:
        pass
    show(stream.finish())
    return 0


def _enroll(args: argparse.Namespace, device: int | None, rate: int) -> int:
    """Show the prompts one at a time, record each, and adapt the model to the voice (`asr mic --enroll -o me.pt`)."""
    import tempfile

    from .enrol import adapt_in_process, load_prompts, record_prompts
    from .mic import capture

    if not args.output or Path(args.output).suffix != ".pt":
        raise ValueError("--enroll needs -o FILE.pt, the adapted model to write")

    def show(line: str) -> None:
        print(line, flush=True)

    try:
        prompts = load_prompts(args.prompts_file, args.prompts)
        show(f"Read each sentence aloud when it appears ({len(prompts)} sentences, device {device} at {rate} Hz).")
        with tempfile.TemporaryDirectory(prefix="asr-enrol-") as scratch:
            folder = Path(args.recordings) if args.recordings else Path(scratch)
            blocks = capture(device, rate)
            try:
                record_prompts(prompts, blocks, rate, folder, show)
            finally:
                blocks.close()
            show("adapting the model to your voice ...")
            adapt_in_process(folder, args.output, args.model, show)
    except KeyboardInterrupt:
        print("enrolment interrupted: nothing written", file=sys.stderr)
        return 130
    show(f"your model: {args.output}  (use it with: asr mic -m {args.output})")
    return 0


def _mic_through_server(args: argparse.Namespace, device: int | None, rate: int) -> int:
    """Stream the microphone to `asr serve` and show its replies with the same live display."""
    import asyncio

    from websockets.exceptions import InvalidStatus, InvalidURI

    from .client import stream_blocks
    from .mic import LiveDisplay, capture

    display = LiveDisplay(sys.stdout)

    def show(event: dict) -> None:
        if args.json:
            print(json.dumps(event), flush=True)
        elif "error" in event:
            print(f"server error: {event['error']}", file=sys.stderr)
        elif "partial" in event:
            display.partial(event["partial"])
        elif event.get("text"):
            display.final(event["text"], event.get("start", 0.0), event.get("end", 0.0))

    def blocks():
        received = 0.0
        source = capture(device, rate)
        for block in source:
            yield block
            received += len(block) / rate
            if 0 < args.max_seconds <= received:
                source.close()
                return

    print(f"streaming device {device} at {rate} Hz to {args.server} (Ctrl+C to stop)", file=sys.stderr)
    try:
        hotwords = hotword_phrases(args) or None
        phrases = grammar_phrases(args)
        asyncio.run(
            stream_blocks(args.server, blocks(), rate, show, args.token, phrase_list=phrases, hotwords=hotwords, punctuate=args.punctuate)
        )
    except (InvalidStatus, InvalidURI) as error:
        raise ConnectionError(f"{args.server}: {error}") from error
    except KeyboardInterrupt:
        pass
    return 0


def add_mic_parser(subparsers) -> None:
    p = subparsers.add_parser("mic", help="transcribe the microphone live")
    p.add_argument("--list-devices", action="store_true", help="list input devices and exit")
    p.add_argument("-i", "--input-device", help="input device index or part of its name (default: the system default)")
    p.add_argument("--sample-rate", type=int, default=0, help="capture rate (default: the device's own)")
    add_segment_options(p)
    p.add_argument("--max-seconds", type=float, default=0, help="stop after this much audio (0 = until Ctrl+C)")
    p.add_argument("--json", action="store_true", help="print events as JSON lines instead of the live display")
    p.add_argument("--server", help="send the audio to `asr serve` at this ws:// or wss:// address instead of decoding locally")
    p.add_argument("--token", help="shared secret for the server")
    e = p.add_argument_group("enrolment: learn your voice")
    e.add_argument("--enroll", action="store_true", help="read prompts aloud and adapt the model to your voice (with -o)")
    e.add_argument("-o", "--output", help="with --enroll: the adapted model file to write (.pt)")
    e.add_argument("--prompts", type=int, default=10, help="sentences to read (default 10)")
    e.add_argument("--prompts-file", help="your own prompts, one sentence a line (default: Harvard sentences)")
    e.add_argument("--recordings", help="keep the recordings and transcripts in this folder (for `asr adapt` later)")
    add_model_options(p)
    p.set_defaults(handler=run_mic)


def run_bench_stream(args: argparse.Namespace) -> int:

    from .bench import stream_benchmark

    recognizer = load_recognizer(args)
    report = stream_benchmark(
        recognizer,
        args.manifests,
        args.limit,
        stream_options(args),
        args.memory_minutes,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(json.dumps(report, indent=2))
    return 0


def add_bench_stream_parser(bench_commands) -> None:
    p = bench_commands.add_parser("stream", help="streaming vs offline accuracy, compute per stream, latency, memory")
    p.add_argument("manifests", nargs="+", metavar="MANIFEST")
    p.add_argument("--limit", type=int, default=50, help="utterances per manifest (evenly spaced; 0 = all)")
    p.add_argument("--memory-minutes", type=int, default=60, help="also stream this many minutes and report memory (0 = skip)")
    add_segment_options(p)
    add_model_options(p)
    p.set_defaults(handler=run_bench_stream, threads=1)


def server_options(args: argparse.Namespace):
    """ServerOptions from the parsed `asr serve` arguments (the one reader of them)."""
    from .server import ServerOptions

    return ServerOptions(
        host=args.host,
        port=args.port,
        max_connections=args.max_connections,
        max_message_bytes=args.max_message_bytes,
        idle_timeout=args.idle_timeout,
        max_session_seconds=args.max_session_seconds,
        sample_rate=args.sample_rate,
        token=args.token or None,
        punctuate=args.punctuate,
        tokens=_tokens(args.tokens_file),
        voices=args.voices,
        max_enrolments=args.max_enrolments,
        prompts_file=args.prompts_file,
        prompts=args.prompts,
    )


def stream_options(args: argparse.Namespace):
    """StreamOptions from the segment options (``add_segment_options``)."""
    from .recognizer import StreamOptions

    return StreamOptions(endpoint_silence=args.endpoint_silence, max_segment=args.max_segment)


def add_segment_options(p: argparse.ArgumentParser) -> None:
    """--endpoint-silence and --max-segment, with StreamOptions' defaults."""
    from .recognizer import StreamOptions

    d = StreamOptions()
    p.add_argument("--endpoint-silence", type=float, default=d.endpoint_silence, help="seconds of silence that end a segment")
    p.add_argument("--max-segment", type=float, default=d.max_segment, help="longest segment in seconds (cut at a quiet point)")


def run_serve(args: argparse.Namespace) -> int:
    import asyncio
    import ssl

    from .server import RecognitionServer

    options = server_options(args)
    context = None
    if args.certfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.certfile, args.keyfile)
    recognizer, more = load_served_models(args)
    server = RecognitionServer(recognizer, options, stream_options(args), more)
    scheme = "wss" if context else "ws"
    models = ", ".join(server.recognizers)
    address = f"{scheme}://{args.host}:{args.port}"
    print(f"serving {address} (models: {models}; decoder: {recognizer.decoder_name}); Ctrl+C to stop", file=sys.stderr)
    asyncio.run(server.run(ssl=context))
    return 0


def _tokens(path: str | None) -> tuple[str, ...]:
    """The tokens of a file, one a line (blank lines and # comments skipped)."""
    if not path:
        return ()
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return tuple(line for line in lines if line and not line.startswith("#"))


def load_served_models(args: argparse.Namespace):
    """(the default recogniser, {name: recogniser} of the other models) from repeated ``--model [NAME=]PATH``."""
    entries = args.model or [None]
    named: dict[str, object] = {}
    default = None
    for entry in entries:
        named_entry = entry is not None and "=" in entry and not Path(entry).exists()
        name, _, path = entry.partition("=") if named_entry else ("", "", entry)
        if name in named or name == "default":
            raise ValueError(f"model name {name!r} given twice (the first model is also named 'default')")
        recognizer = load_recognizer(args, model=path)
        default = default or recognizer
        if name:
            named[name] = recognizer
    return default, named


def add_serve_parser(subparsers) -> None:
    from .server import ServerOptions

    d = ServerOptions()
    p = subparsers.add_parser("serve", help="websocket server (vosk-server protocol)")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--max-connections", type=int, default=d.max_connections)
    p.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes)
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout, help="close connections silent this many seconds")
    p.add_argument("--max-session-seconds", type=float, default=d.max_session_seconds, help="audio seconds per connection")
    p.add_argument(
        "--sample-rate",
        type=int,
        default=d.sample_rate,
        help="PCM rate assumed until a client's config gives one (vosk-server's default is 8000: --sample-rate 8000 to be a drop-in)",
    )
    p.add_argument("--token", help="shared secret clients must send (Authorization: Bearer TOKEN or ?token=TOKEN)")
    p.add_argument("--tokens-file", help="more accepted tokens, one a line: one per user (each owns the voices it learns)")
    v = p.add_argument_group("learned voices (enrolment from the browser page or any client)")
    v.add_argument("--voices", help="folder for voices learned by enrolment (default: no enrolment)")
    v.add_argument("--max-enrolments", type=int, default=d.max_enrolments, help="adaptations running at once (each in its own process)")
    v.add_argument("--prompts-file", help="enrolment prompts, one sentence a line (default: Harvard sentences)")
    v.add_argument("--prompts", type=int, default=d.prompts, help="prompts per enrolment (3-30)")
    p.add_argument("--certfile", help="TLS certificate (PEM) for wss://")
    p.add_argument("--keyfile", help="TLS private key (PEM)")
    add_segment_options(p)
    add_model_options(p, several_models=True)
    p.set_defaults(handler=run_serve)


def _transcript_from_finals(finals: list[dict]):
    from asr.decoding import Transcript, Word

    words = [Word(w["word"], w["start"], w["end"], w["conf"]) for f in finals for w in f.get("result", [])]
    return Transcript(" ".join(f["text"] for f in finals), words, round(max((f.get("end", 0.0) for f in finals), default=0.0), 3))


def extend_transcribe(subparsers) -> None:
    """Give `asr transcribe` a --server option that sends the audio to `asr serve` instead of decoding locally."""
    parser = subparsers.choices["transcribe"]
    group = parser.add_argument_group("remote recognition")
    group.add_argument("--server", help="ws:// or wss:// address of `asr serve` (or a vosk-server) to transcribe with")
    group.add_argument("--token", help="shared secret for the server")
    local = parser.get_default("handler")

    def handler(args: argparse.Namespace) -> int:
        if not args.server:
            return local(args)
        import asyncio

        from .client import transcribe_with_server

        if args.alternatives:
            raise ValueError("--alternatives needs local recognition (not --server)")
        hotwords = hotword_phrases(args) or None
        grammar = grammar_phrases(args)

        punctuator = None
        if args.punctuate:  # here, over the whole transcript (a vosk-server cannot, and finals one by one lose context)
            from asr.punctuation import load_punctuator

            try:
                punctuator = load_punctuator(args.punctuation_model)
            except ValueError as error:
                raise ValueError(f"{error} (--no-punctuate leaves the words as recognised)") from error

        def remote(source):
            finals = asyncio.run(transcribe_with_server(args.server, source, args.token, grammar, hotwords=hotwords))
            transcript = _transcript_from_finals(finals)
            return transcript if punctuator is None else punctuator.punctuate_transcript(transcript)

        return local(args, remote)

    parser.set_defaults(handler=handler)


def run_bench_serve(args: argparse.Namespace) -> int:

    from .bench import serve_benchmark

    recognizer = load_recognizer(args)
    report = serve_benchmark(recognizer, args.manifest, args.clients, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(report, indent=2))
    return 0


def add_bench_serve_parser(bench_commands) -> None:
    p = bench_commands.add_parser("serve", help="N simultaneous real-time clients on loopback: latency and CPU use")
    p.add_argument("manifest", help="recordings to stream (one per client, evenly spaced through the manifest)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16])
    add_model_options(p)
    p.set_defaults(handler=run_bench_serve)


def run_bench_lockstep(args: argparse.Namespace) -> int:

    from .bench import lockstep_benchmark

    recognizer = load_recognizer(args)
    report = lockstep_benchmark(recognizer, args.paths, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(report, indent=2))
    return 0


def add_bench_lockstep_parser(bench_commands) -> None:
    p = bench_commands.add_parser(
        "lockstep",
        help="a vosk-style lockstep client (0.2 s, one reply, repeat) through the server against `asr transcribe`'s time",
    )
    p.add_argument("paths", nargs="+", metavar="AUDIO", help="recordings to send")
    add_model_options(p)
    p.set_defaults(handler=run_bench_lockstep, threads=1)


def register(subparsers, bench_commands) -> None:
    add_mic_parser(subparsers)
    add_serve_parser(subparsers)
    extend_transcribe(subparsers)
    add_bench_stream_parser(bench_commands)
    add_bench_serve_parser(bench_commands)
    add_bench_lockstep_parser(bench_commands)
