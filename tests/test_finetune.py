from dataclasses import replace

import pytest
import torch

from asr.checkpoint import ModelBundle, load_model_file, save_model
from asr.features import FeatureConfig
from asr.model import CTCModel, ModelConfig
from asr.text import Vocabulary
from tests.conftest import tiny_train_config, write_manifest
from training.trainer import FINETUNE_DEFAULTS, TrainConfig, init_model_config, train

SMALL = ModelConfig(hidden_size=16, num_layers=1, dropout=0.2, chunk_frames=4, lookahead_frames=2)
LR = 1e-3


@pytest.fixture
def init_model(tmp_path):
    """A small model with a feature normalisation no training set would give, and metadata of its own."""
    torch.manual_seed(7)
    model = CTCModel(SMALL)
    model.set_normalization(torch.linspace(-8, -2, SMALL.n_mels), torch.linspace(1, 3, SMALL.n_mels))
    path = tmp_path / "init.pt"
    save_model(ModelBundle(model, FeatureConfig(), Vocabulary(), {"train_manifests": ["corpus/train"], "steps": 7}), path)
    return path


def _config(tmp_path, manifest, init, name, **overrides):
    settings = dict(model=SMALL, init_model=str(init), learning_rate=LR, warmup_steps=0, epochs=2)
    return tiny_train_config(tmp_path / name, manifest, **{**settings, **overrides})


def test_fine_tuning_starts_from_the_models_weights_and_normalisation(tmp_path, overfit_manifest, init_model):
    result = train(_config(tmp_path, overfit_manifest, init_model, "one-step", max_steps=1), log=lambda _m: None)
    before, after = load_model_file(init_model), load_model_file(result)
    assert after.model.config == before.model.config
    start, end = before.model.state_dict(), after.model.state_dict()
    for name in ("feature_mean", "feature_std"):  # kept, not recomputed from the training data
        torch.testing.assert_close(end[name], start[name], rtol=0, atol=0)
    # One AdamW step moves each weight by at most about the learning rate: training began at the init weights.
    moved = max(float((end[k] - start[k]).abs().max()) for k in start if k not in ("feature_mean", "feature_std"))
    assert 0 < moved <= 2 * LR
    record = after.metadata["initialised_from"]
    assert record["model"] == str(init_model) and len(record["sha256"]) == 16
    assert record["train_manifests"] == ["corpus/train"] and record["steps"] == 7


def test_a_character_branch_added_by_fine_tuning_starts_from_the_model_and_learns(tmp_path, overfit_manifest, init_model):
    branched = replace(SMALL, char_layers=1)
    assert init_model_config(SMALL, char_layers=1) == branched
    with pytest.raises(ValueError, match="1 character-branch layers; it keeps them"):
        init_model_config(branched, char_layers=0)
    result = train(_config(tmp_path, overfit_manifest, init_model, "branch", model=branched, max_steps=3), log=lambda _m: None)
    before, after = load_model_file(init_model).model.state_dict(), load_model_file(result)
    assert after.model.config.char_layers == 1
    end = after.model.state_dict()
    shared = [k for k in before if k not in ("feature_mean", "feature_std")]
    assert max(float((end[k] - before[k]).abs().max()) for k in shared) <= 6 * LR  # three steps from the init weights
    assert float(end["char_branch_output.weight"].abs().max()) > 0  # the branch, at zero to begin with, is learning
    assert sorted(set(end) - set(before)) == sorted(k for k in end if k.startswith("char_branch"))


def test_fine_tuning_resumes_exactly_and_refuses_a_different_shape(tmp_path, overfit_manifest, init_model):
    straight = train(_config(tmp_path, overfit_manifest, init_model, "a", specaugment=True), log=lambda _m: None)
    config = _config(tmp_path, overfit_manifest, init_model, "b", specaugment=True, max_steps=13)
    train(config, log=lambda _m: None)
    resumed = train(replace(config, max_steps=0), log=lambda _m: None)
    a, b = load_model_file(straight).model.state_dict(), load_model_file(resumed).model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)

    other = _config(tmp_path, overfit_manifest, init_model, "c", model=replace(SMALL, hidden_size=8))
    with pytest.raises(ValueError, match="hidden_size=8 .it has 16"):
        train(other, log=lambda _m: None)
    # Resuming with another initial model is refused like a different configuration.
    save_model(ModelBundle(CTCModel(SMALL), FeatureConfig(), Vocabulary()), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="different initial model"):
        train(replace(config, init_model=str(tmp_path / "other.pt")), log=lambda _m: None)


def test_init_model_config_keeps_the_shape_and_allows_latency_and_dropout_changes():
    assert init_model_config(SMALL, dropout=0.0, chunk_frames=8, lookahead_frames=3) == replace(
        SMALL, dropout=0.0, chunk_frames=8, lookahead_frames=3
    )
    assert init_model_config(SMALL, hidden_size=16) == SMALL
    with pytest.raises(ValueError, match="num_layers=2 .it has 1.*cell='gru'"):
        init_model_config(SMALL, num_layers=2, cell="gru")
    TrainConfig(train_manifests=("m",), output_dir="o", init_model="bundled", **FINETUNE_DEFAULTS)
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(train_manifests=("m",), output_dir="o", warmup_steps=-1)


def test_train_cli_init_bundled(tmp_path, capsys):
    from asr.cli import main

    manifest = write_manifest(tmp_path / "m.jsonl", {"how_much_was_it.opus": "how much was it"})
    common = ["train", "--train", str(manifest), "-o", str(tmp_path / "run"), "--no-progress"]
    assert main([*common, "--init", "bundled", "--hidden-size", "192", "--num-layers", "4"]) == 2
    err = capsys.readouterr().err
    assert "hidden_size=192 (it has 224)" in err and "num_layers" not in err  # 4 layers is the bundled model's own
    assert main([*common, "--init", "bundled", "--char-layers", "-1"]) == 2
    assert "char_layers must be >= 0" in capsys.readouterr().err
    assert main([*common, "--init", str(tmp_path / "missing.pt")]) == 2
    assert "model file not found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_widened_model_computes_what_the_narrow_one_did(cell):
    from training.widen import widen_model

    narrow_config = replace(SMALL, cell=cell, num_layers=2, phone_vocab_size=5, char_layers=1)
    torch.manual_seed(3)
    narrow = CTCModel(narrow_config).eval()
    for parameter in narrow.parameters():  # the branch's output layer starts at zero: give every weight a value
        parameter.data.normal_(0, 0.3)
    wide = CTCModel(replace(narrow_config, hidden_size=24)).eval()
    widen_model(narrow, wide)
    features, lengths = torch.randn(2, 120, SMALL.n_mels), torch.tensor([120, 75])
    with torch.no_grad():
        expected, wide_out = narrow(features, lengths, head="both")[0], wide(features, lengths, head="both")[0]
    torch.testing.assert_close(wide_out, expected, rtol=0, atol=1e-5)
    # The new units compute something (random incoming weights), and what reads them starts at zero.
    weights = wide.state_dict()  # detached tensors, unlike the parameters
    gates = 4 if cell == "lstm" else 3
    new_rows = torch.cat([torch.arange(16, 24) + g * 24 for g in range(gates)])
    assert float(weights["layers.1.forward_rnn.weight_ih_l0"][new_rows].abs().max()) > 0
    new_features = torch.cat([torch.arange(16, 24), torch.arange(40, 48)])  # forward, then backward new units
    for reader in ("output", "phone_output", "char_branch_output"):
        assert float(weights[f"{reader}.weight"][:, new_features].abs().max()) == 0
    assert float(weights["layers.1.forward_rnn.weight_ih_l0"][:16, new_features].abs().max()) == 0
    with pytest.raises(ValueError, match="larger hidden size"):
        widen_model(wide, narrow)
    with pytest.raises(ValueError, match="larger hidden size"):
        widen_model(narrow, CTCModel(replace(narrow_config, hidden_size=24, num_layers=3)))


def test_fine_tuning_with_a_larger_hidden_size_widens_the_model_and_trains_the_new_units(tmp_path, overfit_manifest, init_model):
    assert init_model_config(SMALL, hidden_size=24) == replace(SMALL, hidden_size=24)
    with pytest.raises(ValueError, match="hidden_size=8 .it has 16"):
        init_model_config(SMALL, hidden_size=8)
    lines = []
    result = train(
        _config(tmp_path, overfit_manifest, init_model, "wide", model=replace(SMALL, hidden_size=24), max_steps=3), log=lines.append
    )
    assert any("widened from hidden size 16" in line for line in lines)
    before, after = load_model_file(init_model).model, load_model_file(result).model
    assert after.config.hidden_size == 24
    start, end = before.state_dict(), after.state_dict()
    torch.testing.assert_close(end["feature_mean"], start["feature_mean"], rtol=0, atol=0)
    trained_rows = torch.cat([torch.arange(16) + g * 24 for g in range(4)])
    old = end["layers.0.forward_rnn.weight_ih_l0"][trained_rows]
    assert float((old - start["layers.0.forward_rnn.weight_ih_l0"]).abs().max()) <= 6 * LR  # three steps from the init
    # What reads the new units started at zero and has learned to use them.
    assert float(end["output.weight"][:, torch.cat([torch.arange(16, 24), torch.arange(40, 48)])].abs().max()) > 0
