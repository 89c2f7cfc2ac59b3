import numpy as np
import pytest

from asr.audio import SAMPLE_RATE, load_audio
from asr.endpoint import PAUSE_SECONDS, PauseDetector, frame_energy_db
from asr.features import LogMelExtractor, compute_features
from tests.conftest import DATA, quiet_noise

FRAME = 0.01  # seconds per log-mel frame
EXTRACTOR = LogMelExtractor()


def pauses(audio: np.ndarray, piece_frames: int = 0) -> list[float]:
    """Times (seconds) at which pauses complete, feeding the detector ``piece_frames`` frames at a time (0 = all)."""
    features = compute_features(audio, EXTRACTOR)
    detector = PauseDetector(FRAME)
    step = piece_frames or len(features)
    ends = []
    for start in range(0, len(features), step):
        ends += [(start + p) * FRAME for p in detector(features[start : start + step])]
    return ends


def speech_end(clip: np.ndarray) -> float:
    """Seconds to the clip's last frame within 30 dB of its loudest (the clip's own trailing quiet excluded)."""
    energy = frame_energy_db(compute_features(clip, EXTRACTOR))
    return (np.flatnonzero(energy > energy.max() - 30)[-1] + 1) * FRAME


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return load_audio(DATA / "how_much_was_it.opus")


def test_a_pause_completes_its_length_after_speech_ends(clip):
    audio = np.concatenate([quiet_noise(0.5), clip, quiet_noise(1.5, 1), clip, quiet_noise(1.5, 2)])
    first_end = 0.5 + speech_end(clip)
    second_end = 0.5 + len(clip) / SAMPLE_RATE + 1.5 + speech_end(clip)
    found = pauses(audio)
    assert len(found) == 2, found
    for end, pause in zip((first_end, second_end), found):
        assert end + PAUSE_SECONDS - 0.15 <= pause <= end + PAUSE_SECONDS + 0.1, (end, pause)


@pytest.mark.parametrize("piece_frames", [1, 7, 100])
def test_pieces_of_any_size_give_the_same_pauses(clip, piece_frames):
    audio = np.concatenate([clip, quiet_noise(1.0), clip, quiet_noise(1.0, 1)])
    assert pauses(audio, piece_frames) == pauses(audio)


def test_no_pause_without_speech():
    assert pauses(quiet_noise(3.0)) == []
    loud_noise = quiet_noise(3.0) * 50  # steady noise at about -26 dBFS is not speech either
    assert pauses(loud_noise) == []
    assert pauses(np.zeros(3 * SAMPLE_RATE, dtype=np.float32)) == []


def test_a_recording_that_starts_mid_word(clip):
    energy = frame_energy_db(compute_features(clip, EXTRACTOR))
    loudest = int(np.argmax(energy)) * int(FRAME * SAMPLE_RATE)
    assert len(pauses(np.concatenate([clip[loudest:], quiet_noise(1.5)]))) == 1


def test_a_click_inside_the_pause_does_not_hold_it_back(clip):
    quiet = quiet_noise(1.5)
    quiet[int(0.3 * SAMPLE_RATE) : int(0.32 * SAMPLE_RATE)] = 0.3  # a 20 ms click
    found = pauses(np.concatenate([clip, quiet]))
    assert len(found) == 1 and found[0] <= speech_end(clip) + PAUSE_SECONDS + 0.1


def test_pauses_in_steady_background_noise(clip):
    rng = np.random.default_rng(5)
    speech = np.concatenate([clip, np.zeros(int(1.5 * SAMPLE_RATE), np.float32), clip, np.zeros(int(1.5 * SAMPLE_RATE), np.float32)])
    noise = rng.standard_normal(len(speech)).astype(np.float32) * np.sqrt(np.mean(clip**2)) / 10  # 20 dB SNR
    assert len(pauses(speech + noise)) == 2


def test_short_gaps_between_words_are_not_pauses(clip):
    assert pauses(clip) == []  # the clip's own gaps between words are shorter than a pause
    gap = quiet_noise(PAUSE_SECONDS / 2)
    assert pauses(np.concatenate([clip, gap, clip])) == []
