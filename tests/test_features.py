import numpy as np

from asr.audio import load_audio
from asr.features import FeatureConfig, LogMelExtractor, StreamingFeatures, compute_features
from tests.conftest import DATA


def test_features_from_path_equal_features_from_array():
    from asr.recognizer import Recognizer  # noqa: F401  (same extractor the recognizer uses)

    extractor = LogMelExtractor()
    path = DATA / "LJ001-0008.opus"
    from_path = compute_features(load_audio(path), extractor)
    import soundfile as sf

    raw, rate = sf.read(str(path), dtype="float32")
    from asr.audio import prepare_array

    from_array = compute_features(prepare_array(raw, rate), extractor)
    np.testing.assert_array_equal(from_path, from_array)


def test_shape_and_frame_count():
    extractor = LogMelExtractor()
    audio = load_audio(DATA / "how_much_was_it.opus")
    feats = extractor(audio)
    config = FeatureConfig()
    assert feats.shape == (1 + (len(audio) - config.n_fft) // config.hop_length, config.n_mels)
    assert feats.dtype == np.float32 and np.isfinite(feats).all()
    assert extractor(audio[:300]).shape == (0, config.n_mels)


def test_streaming_features_equal_offline_for_any_piece_size():
    extractor = LogMelExtractor()
    audio = load_audio(DATA / "LJ002-0179.opus")
    offline = extractor(audio)
    rng = np.random.default_rng(0)
    for _ in range(3):
        stream = StreamingFeatures(extractor)
        cuts = np.sort(rng.integers(0, len(audio), size=40))
        pieces = np.split(audio, cuts)
        online = np.concatenate([stream.accept(p) for p in pieces])
        assert online.shape == offline.shape
        np.testing.assert_allclose(online, offline, atol=1e-4)
