"""Live transcription of a microphone through PortAudio (sounddevice)."""

from __future__ import annotations

import queue
import sys
from collections.abc import Iterator

import numpy as np

from asr.errors import CommandError

BLOCK_SECONDS = 0.1  # audio delivered per callback


class MicrophoneError(CommandError):
    """PortAudio is missing, or the input device does not exist or cannot be opened."""


def _sounddevice():
    try:
        import sounddevice
    except OSError as error:  # raised when the PortAudio library itself is missing
        raise MicrophoneError(f"PortAudio is not available ({error}); install it, e.g. `apt-get install libportaudio2`") from error
    return sounddevice


def input_devices() -> list[dict]:
    """[{'index', 'name', 'channels', 'default_samplerate', 'default'}] for devices that can record."""
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
        default = sd.default.device[0]
    except sd.PortAudioError as error:
        raise MicrophoneError(f"cannot list audio devices: {error}") from error
    return [
        {
            "index": i,
            "name": d["name"],
            "channels": d["max_input_channels"],
            "default_samplerate": d["default_samplerate"],
            "default": i == default,
        }
        for i, d in enumerate(devices)
        if d["max_input_channels"] > 0
    ]


def resolve_device(device: str | int | None) -> tuple[int | None, int]:
    """(PortAudio device index or None for the default, its sample rate) for an index or a name fragment."""
    devices = input_devices()
    if not devices:
        raise MicrophoneError("no audio input device found (is a microphone connected, or PulseAudio/ALSA configured?)")
    if device is None or device == "":
        chosen = next((d for d in devices if d["default"]), devices[0])
    elif str(device).isdigit():
        chosen = next((d for d in devices if d["index"] == int(device)), None)
    else:
        matches = [d for d in devices if str(device).lower() in d["name"].lower()]
        chosen = matches[0] if matches else None
    if chosen is None:
        names = ", ".join(f"{d['index']}: {d['name']}" for d in devices)
        raise MicrophoneError(f"no input device {device!r}; available: {names}")
    return chosen["index"], int(chosen["default_samplerate"])


def capture(device: int | None, sample_rate: int) -> Iterator[np.ndarray]:
    """Yield mono float32 blocks (samples,) from the device; closing the generator closes the device."""
    sd = _sounddevice()
    blocks: queue.Queue[np.ndarray] = queue.Queue()

    def callback(indata, _frames, _time, _status) -> None:
        blocks.put(indata[:, 0].astype(np.float32) / 32768.0)

    try:
        stream = sd.InputStream(
            device=device, channels=1, samplerate=sample_rate, dtype="int16", blocksize=int(sample_rate * BLOCK_SECONDS), callback=callback
        )
    except (sd.PortAudioError, ValueError) as error:
        raise MicrophoneError(f"cannot open input device {device}: {error}") from error
    with stream:
        while True:
            try:
                yield blocks.get(timeout=0.5)
            except queue.Empty:
                continue


class LiveDisplay:
    """Rewrites the partial line in place on a terminal and prints each final on its own line."""

    def __init__(self, out=sys.stdout, timestamps: bool = True) -> None:
        self.out = out
        self.interactive = out.isatty()
        self.timestamps = timestamps
        self._partial_shown = False

    def partial(self, text: str) -> None:
        if self.interactive:
            self.out.write("\r\033[K" + text)
            self.out.flush()
            self._partial_shown = True

    def final(self, text: str, start: float, end: float) -> None:
        prefix = f"[{_clock(start)} - {_clock(end)}] " if self.timestamps else ""
        self.out.write(("\r\033[K" if self._partial_shown else "") + prefix + text + "\n")
        self.out.flush()
        self._partial_shown = False


def _clock(seconds: float) -> str:
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes):02d}:{secs:05.2f}"
