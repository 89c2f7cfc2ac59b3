"""`asr mic` (live microphone transcription) and `asr bench stream`."""

from __future__ import annotations

import argparse
import json
import sys

from asr.cli import add_model_options, load_recognizer


def run_mic(args: argparse.Namespace) -> int:
    from asr.checkpoint import CheckpointError
    from asr.lm import LanguageModelError

    from .mic import LiveDisplay, MicrophoneError, capture, input_devices, resolve_device
    from .recognizer import Final, Partial, RecognitionStream, StreamOptions

    try:
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
        recognizer = load_recognizer(args)
        stream = RecognitionStream(recognizer, rate, StreamOptions(endpoint_silence=args.endpoint_silence, max_segment=args.max_segment))
    except (MicrophoneError, CheckpointError, LanguageModelError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    display = LiveDisplay(sys.stdout)

    def show(events) -> None:
        for event in events:
            if args.json:
                print(json.dumps(event.to_dict()), flush=True)
            elif isinstance(event, Partial):
                display.partial(event.text)
            elif isinstance(event, Final):
                display.final(event.text, event.start, event.end)

    print(f"listening on device {device} at {rate} Hz (Ctrl+C to stop)", file=sys.stderr)
    try:
        blocks = capture(device, rate)
        for block in blocks:
            show(stream.accept(block))
            if 0 < args.max_seconds <= stream.seconds_received:
                blocks.close()
                break
    except MicrophoneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    show(stream.finish())
    return 0


def add_mic_parser(subparsers) -> None:
    p = subparsers.add_parser("mic", help="transcribe the microphone live")
    p.add_argument("--list-devices", action="store_true", help="list input devices and exit")
    p.add_argument("-i", "--input-device", help="input device index or part of its name (default: the system default)")
    p.add_argument("--sample-rate", type=int, default=0, help="capture rate (default: the device's own)")
    p.add_argument("--endpoint-silence", type=float, default=0.6, help="seconds of silence that end a segment")
    p.add_argument("--max-segment", type=float, default=20.0, help="longest segment in seconds")
    p.add_argument("--max-seconds", type=float, default=0, help="stop after this much audio (0 = until Ctrl+C)")
    p.add_argument("--json", action="store_true", help="print events as JSON lines instead of the live display")
    add_model_options(p)
    p.set_defaults(handler=run_mic)


def run_bench_stream(args: argparse.Namespace) -> int:
    from asr.checkpoint import CheckpointError
    from asr.lm import LanguageModelError

    from .bench import stream_benchmark
    from .recognizer import StreamOptions

    try:
        recognizer = load_recognizer(args)
        report = stream_benchmark(
            recognizer,
            args.manifests,
            args.limit,
            StreamOptions(endpoint_silence=args.endpoint_silence),
            args.memory_minutes,
            log=lambda m: print(m, file=sys.stderr),
        )
    except (CheckpointError, LanguageModelError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


def add_bench_stream_parser(bench_commands) -> None:
    p = bench_commands.add_parser("stream", help="streaming vs offline accuracy, compute per stream, latency, memory")
    p.add_argument("manifests", nargs="+", metavar="MANIFEST")
    p.add_argument("--limit", type=int, default=50, help="utterances per manifest (evenly spaced; 0 = all)")
    p.add_argument("--endpoint-silence", type=float, default=0.6)
    p.add_argument("--memory-minutes", type=int, default=60, help="also stream this many minutes and report memory (0 = skip)")
    add_model_options(p)
    p.set_defaults(handler=run_bench_stream, threads=1)


def register(subparsers, bench_commands) -> None:
    add_mic_parser(subparsers)
    add_bench_stream_parser(bench_commands)
