import math

import numpy as np
import pytest
import soxr
import torch

from asr.audio import SAMPLE_RATE, load_audio
from asr.features import LOG_FLOOR, FeatureConfig, LogMelExtractor, compute_features
from tests.conftest import DATA
from training.augment import NO_AUGMENT, AugmentConfig, FeatureAugment

ONLY = dict(speed=0.0, gain_prob=0.0, noise_prob=0.0, reverb_prob=0.0)


def features_of(audio: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(compute_features(audio, LogMelExtractor()))


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return load_audio(DATA / "LJ002-0179.opus")


def batch_of(feats: torch.Tensor, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
    return feats.unsqueeze(0).repeat(copies, 1, 1), torch.full((copies,), len(feats))


def test_no_augmentation_changes_nothing(speech):
    feats, lengths = batch_of(features_of(speech), 2)
    out, out_lengths = FeatureAugment(NO_AUGMENT, FeatureConfig())(feats, lengths)
    assert torch.equal(out, feats) and torch.equal(out_lengths, lengths) and not NO_AUGMENT.enabled


@pytest.mark.parametrize("speed", [0.9, 1.1])
def test_speed_perturbation_matches_really_resampled_audio(speech, speed, monkeypatch):
    # Audio played `speed` times faster: fewer samples with every frequency scaled. Its log-mel should be what
    # the feature-domain perturbation produces from the original, far closer than the original itself.
    faster = features_of(soxr.resample(speech, SAMPLE_RATE * speed, SAMPLE_RATE))
    import training.augment

    monkeypatch.setattr(training.augment, "_uniform", lambda low, high, size, device: torch.full((size,), speed))
    feats, lengths = batch_of(features_of(speech), 1)
    out, out_lengths = FeatureAugment(AugmentConfig(**{**ONLY, "speed": 0.1}), FeatureConfig())(feats, lengths)
    assert abs(int(out_lengths[0]) - len(faster)) <= 1
    n = min(len(faster), int(out_lengths[0]), feats.shape[1])
    perturbed = (out[0, :n] - faster[:n]).abs().mean()
    untouched = (feats[0, :n] - faster[:n]).abs().mean()
    assert perturbed < 0.6 and perturbed < untouched / 4, (float(perturbed), float(untouched))


def test_speed_changes_lengths_within_the_range_one_speed_per_batch(speech):
    feats, lengths = batch_of(features_of(speech), 4)
    lengths[1] = lengths[0] // 2  # a shorter utterance in the same batch
    augment = FeatureAugment(AugmentConfig(**{**ONLY, "speed": 0.1}), FeatureConfig())
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        out, out_lengths = augment(feats, lengths)
        ratios = lengths.float() / out_lengths.float()
        assert ((ratios > 0.89) & (ratios < 1.11)).all()
        assert out.shape[1] == out_lengths.max()  # no row is padded beyond the longest
        assert abs(float(ratios[1] - ratios[0])) < 0.02  # every utterance of a batch at the same speed
        seen.add(int(out_lengths[0]))
    assert len(seen) > 6  # batches get different speeds


def test_gain_shifts_log_power_by_a_constant(speech):
    feats, lengths = batch_of(features_of(speech), 8)
    torch.manual_seed(0)
    out, _ = FeatureAugment(AugmentConfig(**{**ONLY, "gain_prob": 1.0}), FeatureConfig())(feats, lengths)
    above_floor = feats > math.log(1e-6) + 3 * math.log(10)  # well above the floor, where no clamping happens
    for row in range(8):
        shift = (out[row] - feats[row])[above_floor[row]]
        assert shift.std() < 1e-4 and abs(float(shift.mean())) <= 10 * math.log(10) / 10 + 1e-4


def test_noise_is_added_at_an_snr_in_the_range(speech):
    feats, lengths = batch_of(features_of(speech), 12)
    torch.manual_seed(0)
    config = AugmentConfig(**{**ONLY, "noise_prob": 1.0})
    out, _ = FeatureAugment(config, FeatureConfig())(feats, lengths)
    signal = feats.exp().mean((1, 2))
    noise = out.exp().mean((1, 2)) - signal
    snr = 10 * torch.log10(signal / noise)
    assert ((snr > config.snr_db[0] - 1) & (snr < config.snr_db[1] + 1)).all(), snr
    assert (out >= feats - 1e-5).all()  # powers add


def test_reverberation_adds_a_decaying_tail_after_speech(speech):
    feats = features_of(np.concatenate([speech, np.zeros(SAMPLE_RATE, dtype=np.float32)]))
    batch, lengths = batch_of(feats, 4)
    torch.manual_seed(0)
    out, _ = FeatureAugment(AugmentConfig(**{**ONLY, "reverb_prob": 1.0}), FeatureConfig())(batch, lengths)
    speech_end = len(features_of(speech))
    tail = out[:, speech_end : speech_end + 100].exp().mean((0, 2))
    assert (out >= batch - 1e-4).all()
    assert tail[:10].mean() > 100 * batch[:, speech_end : speech_end + 10].exp().mean()  # the room rings on ...
    assert tail[:10].mean() > 10 * tail[-10:].mean()  # ... and dies away


def test_same_seed_same_augmentation(speech):
    feats, lengths = batch_of(features_of(speech), 3)
    augment = FeatureAugment(AugmentConfig(), FeatureConfig())
    torch.manual_seed(5)
    first = augment(feats, lengths)
    torch.manual_seed(5)
    second = augment(feats, lengths)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="probability"):
        AugmentConfig(noise_prob=1.5)
    with pytest.raises(ValueError, match="speed"):
        AugmentConfig(speed=0.7)
    with pytest.raises(ValueError, match="low, high"):
        AugmentConfig(snr_db=(30.0, 5.0))


def test_reverberation_is_the_first_order_recursion(speech, monkeypatch):
    """The parallel scan computes tail[t] = decay * (tail[t - 1] + direct[t - 1]), written out here frame by frame."""
    import training.augment

    rt60, direct_to_reverb_db = 0.5, 3.0
    draws = iter([torch.tensor([rt60, rt60]), torch.tensor([direct_to_reverb_db, direct_to_reverb_db])])
    monkeypatch.setattr(training.augment, "_uniform", lambda low, high, size, device: next(draws))
    feats, lengths = batch_of(features_of(speech), 2)
    augment = FeatureAugment(AugmentConfig(**{**ONLY, "reverb_prob": 1.0}), FeatureConfig())
    out, _ = augment(feats, lengths)
    power = feats.double().exp()
    decay = math.exp(-6.9 * FeatureConfig().frame_shift / rt60)
    scale = 10 ** (-direct_to_reverb_db / 10) * (1 - decay) / decay
    expected, tail = power.clone(), torch.zeros_like(power[:, 0])
    for t in range(1, power.shape[1]):
        tail = decay * (tail + power[:, t - 1])
        expected[:, t] += scale * tail
    torch.testing.assert_close(out.double(), expected.clamp_min(LOG_FLOOR).log(), rtol=1e-4, atol=1e-4)
