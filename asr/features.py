"""Log-mel filterbank features computed with librosa, offline and incrementally.

Frames are taken without centring (frame i covers samples [i*hop, i*hop + n_fft)), so a signal
cut into pieces at any points gives the same frames as the whole signal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

from .audio import SAMPLE_RATE

LOG_FLOOR = 1e-6  # added to mel power before the log


@dataclass(frozen=True)
class FeatureConfig:
    sample_rate: int = SAMPLE_RATE
    n_fft: int = 400  # 25 ms window
    hop_length: int = 160  # 10 ms hop
    n_mels: int = 80
    fmin: float = 20.0
    fmax: float = 7600.0

    def __post_init__(self) -> None:
        if self.sample_rate != SAMPLE_RATE:
            raise ValueError(f"features are defined at {SAMPLE_RATE} Hz, got {self.sample_rate}")
        if not 0 < self.hop_length <= self.n_fft:
            raise ValueError("need 0 < hop_length <= n_fft")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError("need 0 <= fmin < fmax <= sample_rate / 2")

    @property
    def frame_shift(self) -> float:
        """Seconds between consecutive feature frames."""
        return self.hop_length / self.sample_rate

    def to_dict(self) -> dict:
        return asdict(self)


class LogMelExtractor:
    """audio (samples,) float32 at 16 kHz -> log-mel frames (frames, n_mels) float32."""

    def __init__(self, config: FeatureConfig = FeatureConfig()) -> None:
        self.config = config

    @cached_property
    def _mel_basis(self) -> np.ndarray:
        import librosa

        c = self.config
        return librosa.filters.mel(sr=c.sample_rate, n_fft=c.n_fft, n_mels=c.n_mels, fmin=c.fmin, fmax=c.fmax).astype(np.float32)

    def num_frames(self, num_samples: int) -> int:
        c = self.config
        return 0 if num_samples < c.n_fft else 1 + (num_samples - c.n_fft) // c.hop_length

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        import librosa

        c = self.config
        frames = self.num_frames(len(audio))
        if frames == 0:
            return np.zeros((0, c.n_mels), dtype=np.float32)
        used = audio[: c.n_fft + (frames - 1) * c.hop_length]
        spectrum = librosa.stft(np.ascontiguousarray(used, dtype=np.float32), n_fft=c.n_fft, hop_length=c.hop_length, center=False)
        power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
        return np.log(self._mel_basis @ power + LOG_FLOOR).T.copy()


class StreamingFeatures:
    """Incremental log-mel: feed audio pieces, get the frames that are complete so far.

    The concatenation of all returned frames equals ``LogMelExtractor`` on the whole signal.
    """

    def __init__(self, extractor: LogMelExtractor) -> None:
        self.extractor = extractor
        self._pending = np.zeros(0, dtype=np.float32)

    def accept(self, audio: np.ndarray) -> np.ndarray:
        """audio (samples,) -> new frames (frames, n_mels)."""
        self._pending = np.concatenate([self._pending, np.asarray(audio, dtype=np.float32)])
        feats = self.extractor(self._pending)
        self._pending = self._pending[len(feats) * self.extractor.config.hop_length :]
        return feats


def compute_features(audio: np.ndarray, extractor: LogMelExtractor, block_seconds: float = 60.0) -> np.ndarray:
    """Log-mel of a long signal computed block by block to bound memory: (frames, n_mels)."""
    stream = StreamingFeatures(extractor)
    step = int(block_seconds * extractor.config.sample_rate)
    parts = [stream.accept(audio[start : start + step]) for start in range(0, len(audio), step)]
    parts = [p for p in parts if len(p)]
    return np.concatenate(parts) if parts else np.zeros((0, extractor.config.n_mels), dtype=np.float32)
