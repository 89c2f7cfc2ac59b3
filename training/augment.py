"""On-the-fly augmentation of log-mel batches: speed, gain, additive noise and reverberation.

Everything works on the cached librosa log-mel features (natural-log mel power), so an epoch costs no new
audio decoding or STFTs, on the CPU or the GPU alike:

- **speed** (0.9-1.1, one draw per batch): audio played ``a`` times faster has every frequency times ``a`` and lasts
  ``1/a`` as long; the mel axis is resampled at ``f / a`` and the time axis at ``t * a`` (linear interpolation of log-mel).
- **gain**: a level change is a constant added to log power.
- **noise** at a random SNR against the utterance's mean power: white, pink or brown spectra, or babble (another
  utterance of the batch), with the frame-to-frame fluctuation of a noise power spectrum; powers add.
- **reverberation**: late reverberation as a decaying-noise impulse response in the power domain, each band's power
  convolved in time with ``exp(-6.9 t / RT60)`` at a random direct-to-reverberant ratio.

Random draws come from torch's global generators, which training checkpoints save, so resume stays exact.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from asr.features import LOG_FLOOR, FeatureConfig
from asr.model import linear_scan

FLUCTUATION_SIGMA = math.sqrt(math.log(1.25))


@dataclass(frozen=True)
class AugmentConfig:
    speed: float = 0.1  # playback speed drawn from [1 - speed, 1 + speed]; 0 = off
    gain_db: float = 10.0  # level change drawn from [-gain_db, +gain_db] dB, applied with probability gain_prob
    gain_prob: float = 0.5
    noise_prob: float = 0.4
    snr_db: tuple[float, float] = (5.0, 30.0)
    reverb_prob: float = 0.3
    rt60: tuple[float, float] = (0.2, 0.8)  # seconds
    direct_to_reverb_db: tuple[float, float] = (-3.0, 12.0)

    def __post_init__(self) -> None:
        if not 0 <= self.speed < 0.5:
            raise ValueError("speed must be in [0, 0.5)")
        for name in ("gain_prob", "noise_prob", "reverb_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability")
        for name in ("snr_db", "rt60", "direct_to_reverb_db"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name} must be (low, high)")
        if self.gain_db < 0 or self.rt60[0] <= 0:
            raise ValueError("gain_db must be >= 0 and rt60 positive")

    @property
    def enabled(self) -> bool:
        return bool(self.speed or (self.gain_db and self.gain_prob) or self.noise_prob or self.reverb_prob)

    def to_dict(self) -> dict:
        return asdict(self)


NO_AUGMENT = AugmentConfig(speed=0.0, gain_prob=0.0, noise_prob=0.0, reverb_prob=0.0)


def _uniform(low: float, high: float, size: int, device: torch.device) -> Tensor:
    return low + (high - low) * torch.rand(size, device=device)


class FeatureAugment(torch.nn.Module):
    """(features (B, T, n_mels) log-mel, lengths (B,)) -> augmented (features (B, T', n_mels), lengths (B,))."""

    def __init__(self, config: AugmentConfig, features: FeatureConfig) -> None:
        super().__init__()
        import librosa

        self.config = config
        self.frame_seconds = features.frame_shift
        centres = librosa.mel_frequencies(features.n_mels + 2, fmin=features.fmin, fmax=features.fmax)[1:-1]
        self.register_buffer("centres", torch.tensor(centres, dtype=torch.float32), persistent=False)
        # Power of white (flat), pink (1/f) and brown (1/f^2) noise in each band, each normalised to mean 1.
        shapes = np.stack([np.ones_like(centres), 1 / centres, 1 / centres**2])
        self.register_buffer("noise_shapes", torch.tensor(shapes / shapes.mean(1, keepdims=True), dtype=torch.float32), persistent=False)

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        c = self.config
        if c.speed:
            features, lengths = self._speed(features, lengths)
        batch, device = features.shape[0], features.device
        # Reverberation and noise add power; a batch that gets neither skips the exp/log round trip and its rounding.
        power = None
        if c.reverb_prob:
            chosen = torch.rand(batch, device=device) < c.reverb_prob
            if bool(chosen.any()):
                power = self._reverb(features.exp(), chosen)
        if c.noise_prob:
            chosen = torch.rand(batch, device=device) < c.noise_prob
            if bool(chosen.any()):
                valid = (torch.arange(features.shape[1], device=device) < lengths.unsqueeze(1)).unsqueeze(2)  # (B, T, 1)
                power = self._noise(features.exp() if power is None else power, valid, lengths, chosen)
        out = features if power is None else torch.log(power.clamp_min(LOG_FLOOR))
        if c.gain_db and c.gain_prob:
            chosen = torch.rand(batch, device=device) < c.gain_prob
            gain = torch.where(chosen, _uniform(-c.gain_db, c.gain_db, batch, device), 0.0) * (math.log(10) / 10)
            out = torch.maximum(out + gain.view(-1, 1, 1), torch.tensor(math.log(LOG_FLOOR), device=device))
        return out, lengths  # frames past a length stay padding: the model never reads them into valid outputs

    def _speed(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        batch, frames, bins = features.shape
        device = features.device
        # One speed for the whole batch: per-utterance speeds would pad every row to the slowest one's length,
        # about 10 % more frames to compute for the same audio (the batches hold utterances of similar length).
        speed = _uniform(1 - self.config.speed, 1 + self.config.speed, 1, device).expand(batch)  # (B,)
        # Frequency: output bin m shows the input at centre[m] / speed, linearly between the two nearest bins.
        source = _interp(self.centres / speed.unsqueeze(1), self.centres)  # (B, M) fractional input bins
        low = source.floor().clamp(0, bins - 1)
        frac = (source - low).clamp(0, 1)
        low = low.long()
        warp = torch.zeros(batch, bins, bins, device=device)  # (B, out bin, in bin)
        warp.scatter_add_(2, low.unsqueeze(2), (1 - frac).unsqueeze(2))
        warp.scatter_add_(2, (low + 1).clamp(max=bins - 1).unsqueeze(2), frac.unsqueeze(2))
        warped = torch.bmm(features, warp.transpose(1, 2))
        # Time: output frame t shows the input at t * speed.
        new_lengths = torch.clamp((lengths.float() / speed).floor().long(), min=1)
        longest = int(new_lengths.max())
        positions = torch.arange(longest, device=device).unsqueeze(0) * speed.unsqueeze(1)  # (B, T')
        positions = torch.minimum(positions, (lengths - 1).clamp(min=0).unsqueeze(1).float())
        before = positions.floor().long()
        after = torch.minimum(before + 1, (lengths - 1).clamp(min=0).unsqueeze(1))
        weight = (positions - before).unsqueeze(2)
        index = lambda idx: idx.unsqueeze(2).expand(batch, longest, bins)  # noqa: E731
        stretched = warped.gather(1, index(before)) * (1 - weight) + warped.gather(1, index(after)) * weight
        return stretched, new_lengths

    def _reverb(self, power: Tensor, chosen: Tensor) -> Tensor:
        rows = chosen.nonzero().squeeze(1)  # (R,), at least one
        c = self.config
        device = power.device
        # Power decays 60 dB in RT60: each frame's tail keeps `decay` of the previous one (a first-order recursion,
        # far cheaper than a convolution), scaled so that the whole tail holds `ratio` of the direct sound's energy.
        rt60 = _uniform(*c.rt60, len(rows), device)
        decay = torch.exp(-6.9 * self.frame_seconds / rt60).unsqueeze(1)  # (R, 1)
        ratio = 10 ** (-_uniform(*c.direct_to_reverb_db, len(rows), device) / 10)
        scale = (ratio * (1 - decay[:, 0]) / decay[:, 0]).unsqueeze(1)  # 1 / sum of decay^k for k >= 1
        direct = power[rows]  # (R, T, M)
        # tail[t] = decay * (tail[t - 1] + direct[t - 1]), as a parallel scan over time
        previous = torch.nn.functional.pad(direct[:, :-1], (0, 0, 1, 0))
        factor = decay.unsqueeze(2).expand_as(direct)
        _, tail = linear_scan(factor, factor * previous, dim=1)
        return power.index_copy(0, rows, direct + scale.unsqueeze(2) * tail)

    def _noise(self, power: Tensor, valid: Tensor, lengths: Tensor, chosen: Tensor) -> Tensor:
        rows = chosen.nonzero().squeeze(1)  # (R,), at least one
        c = self.config
        batch, frames, bins = power.shape
        device = power.device
        mean_power = (power * valid).sum((1, 2)) / (lengths.clamp(min=1) * bins)  # (B,)
        count = len(rows)
        kind = torch.randint(0, 4, (count,), device=device)  # white, pink, brown, babble
        # A noise band's power fluctuates from frame to frame: log-normal with mean 1 and variance 1/4, like the
        # average of the four exponential periodogram bins that a mid-range mel band holds.
        fluctuation = torch.randn(count, frames, bins, device=device).mul_(FLUCTUATION_SIGMA).sub_(FLUCTUATION_SIGMA**2 / 2).exp_()
        shaped = self.noise_shapes[kind.clamp(max=2)].unsqueeze(1) * fluctuation
        other = (rows + 1) % batch  # babble: the next utterance of the batch, at its own mean power
        babble = (power[other] * valid[other]) / mean_power[other].clamp_min(1e-10).view(-1, 1, 1)
        noise = torch.where((kind == 3).view(-1, 1, 1), babble, shaped)
        snr = 10 ** (_uniform(*c.snr_db, count, device) / 10)
        return power.index_add(0, rows, (mean_power[rows] / snr).view(-1, 1, 1) * noise)


def _interp(x: Tensor, points: Tensor) -> Tensor:
    """Fractional index of each x in the increasing ``points`` (linear between them, clamped at the ends)."""
    index = torch.searchsorted(points, x).clamp(1, len(points) - 1)
    left, right = points[index - 1], points[index]
    return (index - 1).float() + ((x - left) / (right - left)).clamp(0, 1)
