import numpy as np
import pytest
import soundfile as sf
import torch

import asr
from asr.audio import load_audio
from tests.conftest import DATA


@pytest.fixture(scope="module")
def recognizer(tiny_model):
    return asr.load_model(tiny_model, "cpu")


def test_transcribe_array_at_another_rate_equals_file(recognizer, tmp_path):
    audio = load_audio(DATA / "how_much_was_it.opus")
    result = recognizer.transcribe(audio, sample_rate=16000)
    assert result.text == "how much was it"
    assert abs(result.duration - len(audio) / 16000) < 1e-3
    # the same speech at 44.1 kHz stereo
    import soxr

    stereo = np.stack([soxr.resample(audio, 16000, 44100)] * 2, axis=1)
    assert recognizer.transcribe(stereo, sample_rate=44100).text == "how much was it"
    path = tmp_path / "x.flac"
    sf.write(path, stereo, 44100)
    assert recognizer.transcribe(str(path)).text == "how much was it"


def test_word_timings_are_monotonic_and_inside_the_audio(recognizer):
    result = recognizer.transcribe(DATA / "does_that_look_good.opus")
    ends = [0.0]
    for word in result.words:
        assert ends[-1] <= word.start < word.end <= result.duration + 0.03
        assert 0 < word.confidence <= 1
        ends.append(word.end)


def test_block_sizes_do_not_change_the_output(recognizer):
    audio = np.concatenate([load_audio(DATA / n) for n in ("how_much_was_it.opus", "does_that_look_good.opus")] * 3)
    whole = recognizer.log_probs([audio])
    pieces = recognizer.log_probs(np.array_split(audio, 37))
    assert pieces.shape == whole.shape
    torch.testing.assert_close(pieces, whole, atol=1e-4, rtol=1e-3)


def test_forward_state_restarts_after_a_pause(tiny_model):
    from asr.encoder import ChunkedEncoder
    from asr.features import compute_features
    from tests.conftest import quiet_noise

    recognizer = asr.load_model(tiny_model, "cpu")
    audio = np.concatenate([load_audio(DATA / "how_much_was_it.opus"), quiet_noise(2.0), load_audio(DATA / "how_much_was_it.opus")])
    encoder = ChunkedEncoder(recognizer.model, recognizer.device, recognizer.frame_shift)
    encoder.accept(compute_features(audio, recognizer.extractor))
    encoder.flush()
    assert encoder.resets >= 1
    assert recognizer.transcribe(audio, 16000).text == "how much was it how much was it"


def test_silence_and_very_short_audio(recognizer):
    assert recognizer.transcribe(np.zeros(100, dtype=np.float32), 16000).text == ""
    result = recognizer.transcribe(np.zeros(16000, dtype=np.float32), 16000)
    assert result.duration == 1.0


def test_bad_inputs_raise_clear_errors(recognizer, tmp_path):
    with pytest.raises(asr.AudioError, match="sample_rate"):
        recognizer.transcribe(np.zeros(1000))
    with pytest.raises(asr.AudioError, match="not found"):
        recognizer.transcribe(tmp_path / "missing.wav")
    with pytest.raises(asr.CheckpointError, match="not found"):
        asr.load_model(tmp_path / "missing.pt")
