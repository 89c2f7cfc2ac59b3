import pytest
import torch

from asr.checkpoint import FORMAT_VERSION, CheckpointError, ModelBundle, bundle_to_dict, load_model_file, save_model
from asr.features import FeatureConfig
from asr.model import CTCModel, ModelConfig
from asr.text import Vocabulary


def make_bundle() -> ModelBundle:
    torch.manual_seed(0)
    model = CTCModel(ModelConfig(hidden_size=16, num_layers=2, chunk_frames=4, lookahead_frames=2)).eval()
    model.set_normalization(torch.randn(80), torch.rand(80) + 0.5)
    return ModelBundle(model, FeatureConfig(), Vocabulary(), {"note": "test", "epochs_completed": 3})


def test_round_trip_keeps_weights_config_normalisation_and_metadata(tmp_path):
    bundle = make_bundle()
    path = tmp_path / "model.pt"
    save_model(bundle, path)
    loaded = load_model_file(path)
    assert loaded.model.config == bundle.model.config
    assert loaded.feature_config == bundle.feature_config
    assert loaded.vocabulary.tokens == bundle.vocabulary.tokens
    assert loaded.metadata == bundle.metadata
    feats = torch.randn(1, 60, 80)
    torch.testing.assert_close(loaded.model(feats, torch.tensor([60]))[0], bundle.model(feats, torch.tensor([60]))[0])
    torch.testing.assert_close(loaded.model.feature_mean, bundle.model.feature_mean)


def test_file_loads_with_weights_only(tmp_path):
    path = tmp_path / "model.pt"
    save_model(make_bundle(), path)
    data = torch.load(path, weights_only=True)
    assert data["format_version"] == FORMAT_VERSION


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_file_is_rejected_clearly(tmp_path, damage):
    path = tmp_path / "model.pt"
    save_model(make_bundle(), path)
    data = path.read_bytes()
    path.write_bytes({"garbage": b"\x00\x01not a model" * 100, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="model.pt"):
        load_model_file(path)


def test_wrong_content_and_version(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not a asr-bilstm-ctc model"):
        load_model_file(path)
    data = bundle_to_dict(make_bundle())
    data["format_version"] = 99
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="version 99"):
        load_model_file(path)
    data = bundle_to_dict(make_bundle())
    data["model_config"]["hidden_size"] = 17
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="damaged or incompatible"):
        load_model_file(path)


def test_missing_file():
    with pytest.raises(CheckpointError, match="not found"):
        load_model_file("/no/such/model.pt")
