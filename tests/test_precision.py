"""How training picks its number type: on a CPU, by timing the model's own step in float32 and in bfloat16."""

import time

import pytest
import torch

import training.precision as precision_module
import training.trainer as trainer_module
from asr.model import CTCModel, ModelConfig
from training.precision import faster_on_cpu, precision_named, training_precision
from training.trainer import _precision_probe

CPU = torch.device("cpu")


def _step_taking(float32_seconds: float, bfloat16_seconds: float):
    calls = []

    def step(dtype):
        calls.append(dtype)
        time.sleep(bfloat16_seconds if dtype == torch.bfloat16 else float32_seconds)

    return step, calls


@pytest.mark.parametrize(
    ("float32_seconds", "bfloat16_seconds", "expected"),
    [(0.06, 0.02, True), (0.02, 0.06, False), (0.05, 0.05, False)],  # a tie is not worth the lower precision
)
def test_bfloat16_is_chosen_only_when_the_timed_step_is_faster(float32_seconds, bfloat16_seconds, expected):
    step, calls = _step_taking(float32_seconds, bfloat16_seconds)
    assert faster_on_cpu(step) is expected
    assert calls.count(None) == calls.count(torch.bfloat16) == precision_module.PROBE_REPEATS + 1  # one warm-up each


def test_the_probe_decides_only_where_the_cpu_has_bfloat16_instructions(monkeypatch):
    fast_bfloat16, _ = _step_taking(0.03, 0.01)
    slow_bfloat16, _ = _step_taking(0.01, 0.03)
    monkeypatch.setattr(precision_module, "cpu_has_native_bfloat16", lambda: True)
    assert training_precision(CPU, True, fast_bfloat16).name == "bfloat16"
    assert training_precision(CPU, True, slow_bfloat16).name == "float32"
    assert training_precision(CPU, False, fast_bfloat16).name == "float32"  # --no-amp
    monkeypatch.setattr(precision_module, "cpu_has_native_bfloat16", lambda: False)
    never, calls = _step_taking(0.0, 0.0)
    assert training_precision(CPU, True, never).name == "float32" and not calls  # emulated bfloat16: not even timed


def test_precisions_are_named_as_the_log_and_the_checkpoint_name_them():
    for name in ("float32", "bfloat16", "float16"):
        assert precision_named(name).name == name
    assert precision_named("float16").loss_scaling
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        precision_named("int8")


def test_the_probe_leaves_random_state_and_gradients_as_they_were():
    torch.manual_seed(0)
    model = CTCModel(ModelConfig(hidden_size=16, num_layers=1, chunk_frames=4, lookahead_frames=2, phone_vocab_size=41))
    probe = _precision_probe(model, CPU, "both")
    before = torch.get_rng_state()
    for dtype in (None, torch.bfloat16):
        probe(dtype)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.grad is None for p in model.parameters())


def test_a_resumed_run_keeps_its_precision(monkeypatch):
    # Emulated or not, bfloat16 is what the run started in; a probe that would now choose float32 is not consulted.
    monkeypatch.setattr(trainer_module, "cpu_has_native_bfloat16", lambda: True)
    monkeypatch.setattr(precision_module, "cpu_has_native_bfloat16", lambda: True)
    monkeypatch.setattr(precision_module, "faster_on_cpu", lambda step: False)
    config = trainer_module.TrainConfig(train_manifests=("-",), output_dir="-")
    kept = trainer_module._run_precision(config, CPU, 1, lambda dtype: None, {"precision": "bfloat16"})
    assert kept.name == "bfloat16"
    assert trainer_module._run_precision(config, CPU, 1, lambda dtype: None, None).name == "float32"
    monkeypatch.setattr(trainer_module, "cpu_has_native_bfloat16", lambda: False)  # resumed on a CPU without it: chosen again
    assert trainer_module._run_precision(config, CPU, 1, lambda dtype: None, {"precision": "bfloat16"}).name == "float32"
    no_amp = trainer_module.TrainConfig(train_manifests=("-",), output_dir="-", amp=False)
    assert trainer_module._run_precision(no_amp, CPU, 1, lambda dtype: None, {"precision": "bfloat16"}).name == "float32"
