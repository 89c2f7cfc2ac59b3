"""Reading audio from files, bytes or arrays into 16 kHz mono float32."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000  # every model in this project works on 16 kHz mono audio
READ_BLOCK_SECONDS = 30  # block size when reading long files, to bound memory

FFMPEG_ONLY_SUFFIXES = {".m4a", ".aac", ".mp4", ".webm", ".wma"}  # libsndfile cannot read these; librosa/audioread can

AudioSource = str | os.PathLike | bytes


AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a", ".aiff", ".aif", ".au", ".webm"}  # what folders are searched for


class AudioError(ValueError):
    """Raised when audio cannot be read or is unusable (empty, truncated, bad rate)."""


def _describe(source: AudioSource) -> str:
    return "<bytes>" if isinstance(source, bytes | bytearray) else str(source)


def to_mono(audio: np.ndarray) -> np.ndarray:
    """Average channels: (samples,) or (samples, channels) -> (samples,) float32."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1, dtype=np.float32)
    elif audio.ndim != 1:
        raise AudioError(f"audio must be 1-D or (samples, channels), got shape {audio.shape}")
    return audio


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample a mono float32 signal (samples,) with soxr's high-quality filter."""
    if orig_sr <= 0:
        raise AudioError(f"sample rate must be positive, got {orig_sr}")
    if orig_sr == target_sr:
        return np.ascontiguousarray(audio, dtype=np.float32)
    import soxr

    return soxr.resample(np.asarray(audio, dtype=np.float32), orig_sr, target_sr, quality="HQ").astype(np.float32, copy=False)


class StreamResampler:
    """Chunk-by-chunk resampler whose concatenated output equals one continuous resampling."""

    def __init__(self, orig_sr: int, target_sr: int = SAMPLE_RATE) -> None:
        if orig_sr <= 0:
            raise AudioError(f"sample rate must be positive, got {orig_sr}")
        self.orig_sr, self.target_sr = orig_sr, target_sr
        self._stream = None
        if orig_sr != target_sr:
            import soxr

            self._stream = soxr.ResampleStream(orig_sr, target_sr, 1, dtype="float32", quality="HQ")

    def __call__(self, chunk: np.ndarray, last: bool = False) -> np.ndarray:
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        if self._stream is None:
            return chunk
        return self._stream.resample_chunk(chunk, last=last)


def _open(source: AudioSource) -> sf.SoundFile:
    try:
        if isinstance(source, bytes | bytearray):
            return sf.SoundFile(io.BytesIO(source))
        return sf.SoundFile(os.fspath(source))
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        raise AudioError(f"cannot read audio from {_describe(source)}: {error}") from error


def iter_audio(source: AudioSource, block_seconds: float = READ_BLOCK_SECONDS) -> Iterator[np.ndarray]:
    """Yield consecutive blocks of 16 kHz mono float32 audio (samples,) from a file or bytes.

    Long recordings are read, mixed and resampled block by block so memory stays bounded.
    """
    if not isinstance(source, bytes | bytearray) and not Path(source).is_file():
        raise AudioError(f"audio file not found: {source}")
    if not isinstance(source, bytes | bytearray) and Path(source).suffix.lower() in FFMPEG_ONLY_SUFFIXES:
        yield _load_with_librosa(source)
        return
    handle = _open(source)
    with handle:
        resampler = StreamResampler(handle.samplerate)
        block = max(1, int(block_seconds * handle.samplerate))
        produced = 0
        try:
            for frames in handle.blocks(blocksize=block, dtype="float32", always_2d=True):
                out = resampler(to_mono(frames))
                produced += len(out)
                if len(out):
                    yield out
        except (sf.LibsndfileError, RuntimeError) as error:
            raise AudioError(f"cannot decode audio in {_describe(source)} (truncated or corrupt?): {error}") from error
        tail = resampler(np.zeros(0, dtype=np.float32), last=True)
        produced += len(tail)
        if len(tail):
            yield tail
        if produced == 0:
            raise AudioError(f"audio in {_describe(source)} is empty")


def audio_duration(source: str | os.PathLike) -> float | None:
    """Seconds of audio in a file, from its header; None when the header does not tell (or cannot be read)."""
    try:
        info = sf.info(os.fspath(source))
    except (sf.LibsndfileError, RuntimeError, TypeError, OSError):
        return None
    return info.frames / info.samplerate if info.frames > 0 and info.samplerate > 0 else None


def _load_with_librosa(source: AudioSource) -> np.ndarray:
    import librosa

    try:
        data = source if not isinstance(source, bytes | bytearray) else io.BytesIO(source)
        audio, _ = librosa.load(data, sr=SAMPLE_RATE, mono=True)
    except Exception as error:  # librosa/audioread raise many unrelated types
        raise AudioError(f"cannot read audio from {_describe(source)}: {error}") from error
    if audio.size == 0:
        raise AudioError(f"audio in {_describe(source)} is empty")
    return audio.astype(np.float32, copy=False)


def load_audio(source: AudioSource) -> np.ndarray:
    """Read a file path or encoded bytes (wav, flac, ogg/opus, mp3, ...) -> (samples,) float32 at 16 kHz."""
    return np.concatenate(list(iter_audio(source)))


def prepare_array(audio: np.ndarray, sample_rate: int | None) -> np.ndarray:
    """Validate an in-memory signal (samples,) or (samples, channels) and convert to 16 kHz mono float32."""
    if sample_rate is None:
        raise AudioError("sample_rate is required when passing an array")
    audio = to_mono(audio)
    if audio.size == 0:
        raise AudioError("audio array is empty")
    if not np.all(np.isfinite(audio)):
        raise AudioError("audio array contains NaN or infinite values")
    return resample(audio, int(sample_rate))
