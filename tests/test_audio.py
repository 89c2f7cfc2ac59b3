import numpy as np
import pytest
import soundfile as sf

from asr.audio import SAMPLE_RATE, AudioError, iter_audio, load_audio, prepare_array
from tests.conftest import DATA


def test_opus_file_is_16k_mono_float32():
    audio = load_audio(DATA / "how_much_was_it.opus")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 0.6 < len(audio) / SAMPLE_RATE < 1.0
    assert 0.01 < np.abs(audio).max() <= 1.0


def test_8khz_file_is_resampled_to_16k():
    info = sf.info(str(DATA / "zero_8khz.opus"))
    audio = load_audio(DATA / "zero_8khz.opus")
    assert info.samplerate == 8000
    assert abs(len(audio) / SAMPLE_RATE - info.duration) < 0.01


def test_resampling_preserves_a_tone(tmp_path):
    t = np.arange(44100 * 2) / 44100
    path = tmp_path / "tone.wav"
    sf.write(path, 0.5 * np.sin(2 * np.pi * 440 * t), 44100)
    audio = load_audio(path)
    assert len(audio) == 2 * SAMPLE_RATE
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / len(audio) - 440) < 2


def test_channels_are_averaged(tmp_path):
    left = np.random.default_rng(0).uniform(-0.5, 0.5, SAMPLE_RATE).astype(np.float32)
    right = np.zeros_like(left)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), left / 2, atol=1e-6)
    np.testing.assert_allclose(prepare_array(np.stack([left, right], 1), SAMPLE_RATE), left / 2, atol=1e-6)


def test_block_reading_equals_whole_file(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "noise.wav"
    sf.write(path, rng.uniform(-0.3, 0.3, 22050 * 3).astype(np.float32), 22050, subtype="FLOAT")
    whole = np.concatenate(list(iter_audio(path, block_seconds=100)))
    blocks = np.concatenate(list(iter_audio(path, block_seconds=0.37)))
    np.testing.assert_allclose(blocks, whole, atol=1e-6)


def test_bytes_input_equals_path():
    path = DATA / "does_that_look_good.opus"
    np.testing.assert_array_equal(load_audio(path.read_bytes()), load_audio(path))


@pytest.mark.parametrize("content", [b"", b"not audio at all" * 10, b"RIFF\x24\x00\x00\x00WAVEfmt "])
def test_corrupt_or_empty_file_names_the_file(tmp_path, content):
    path = tmp_path / "broken.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match="broken.wav"):
        load_audio(path)


def test_truncated_file(tmp_path):
    data = (DATA / "LJ002-0179.opus").read_bytes()
    path = tmp_path / "truncated.opus"
    path.write_bytes(data[: len(data) // 3])
    try:
        audio = load_audio(path)
    except AudioError as error:  # some truncations are detected...
        assert "truncated.opus" in str(error)
    else:  # ...others decode the part that is there
        assert 0 < len(audio) < len(load_audio(DATA / "LJ002-0179.opus"))


def test_missing_file():
    with pytest.raises(AudioError, match="not found"):
        load_audio("/no/such/file.wav")


def test_array_needs_sample_rate_and_finite_values():
    with pytest.raises(AudioError, match="sample_rate"):
        prepare_array(np.zeros(100), None)
    with pytest.raises(AudioError, match="NaN"):
        prepare_array(np.array([0.0, np.nan]), SAMPLE_RATE)
    with pytest.raises(AudioError, match="empty"):
        prepare_array(np.zeros(0), SAMPLE_RATE)
