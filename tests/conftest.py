"""Shared fixtures: real audio clips, the committed tiny model that transcribes two of them, and a tiny training run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from asr.audio import SAMPLE_RATE, load_audio
from asr.model import ModelConfig

DATA = Path(__file__).parent / "data"
CLIPS = {"how_much_was_it.opus": "how much was it", "does_that_look_good.opus": "does that look good"}

torch.set_num_threads(int(os.environ.get("ASR_TEST_THREADS", "1")))  # CI also runs the suite with 2


def write_manifest(path: Path, clips: dict[str, str], repeat: int = 1) -> Path:
    lines = [json.dumps({"audio": str(DATA / name), "duration": 1.0, "text": text}) for name, text in clips.items()]
    path.write_text("\n".join(lines * repeat) + "\n")
    return path


TINY_MODEL = ModelConfig(hidden_size=64, num_layers=2, dropout=0.0, stack_frames=2, chunk_frames=30, lookahead_frames=6)
TINY_MODEL_FILE = DATA / "tiny-model.pt"  # made by tests/make_tiny_model.py
TRAINING_EPOCHS = 8  # of 25 steps: the budget within which training must overfit the two clips


def tiny_train_config(folder: Path, manifest: Path, **overrides):
    from training.augment import NO_AUGMENT
    from training.trainer import TrainConfig

    settings = dict(
        train_manifests=(str(manifest),),
        output_dir=str(folder / "run"),
        model=TINY_MODEL,
        epochs=6,
        batch_frames=200,
        learning_rate=0.01,
        warmup_steps=10,
        specaugment=False,
        augment=NO_AUGMENT,
        cache_dir=str(folder / "cache"),
        workers=1,
        progress=False,
        checkpoint_every=10**6,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def quiet_noise(seconds: float, seed: int = 0) -> np.ndarray:
    """Background noise at about -60 dBFS: what a pause sounds like on a real microphone."""
    return (np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE)) * 1e-3).astype(np.float32)


@pytest.fixture(scope="session")
def overfit_manifest(tmp_path_factory) -> Path:
    """The two clips as they are and with pauses around them, repeated: an "epoch" is 25 steps of two utterances."""
    folder = tmp_path_factory.mktemp("manifest")
    clips = dict(CLIPS)
    for i, (name, text) in enumerate(CLIPS.items()):
        padded = np.concatenate([quiet_noise(0.5, i), load_audio(DATA / name), quiet_noise(0.7, i + 10)])
        sf.write(folder / f"padded_{i}.wav", padded, SAMPLE_RATE)
        clips[str(folder / f"padded_{i}.wav")] = text
    return write_manifest(folder / "train.jsonl", clips, repeat=13)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """A 2-layer, 64-unit model that transcribes the two clips, committed (tests/make_tiny_model.py): its
    transcripts win by a wide margin on any CPU, unlike those of a model trained during the test session."""
    if not TINY_MODEL_FILE.is_file():
        pytest.fail(f"{TINY_MODEL_FILE} is missing: run `python tests/make_tiny_model.py`")
    return TINY_MODEL_FILE


def _tiny_punctuator_config():
    from asr.punctuation import PunctuatorConfig

    return PunctuatorConfig(vocabulary_size=50, ngram_buckets=64, word_dim=8, ngram_dim=8, hidden=8, layers=1)


TINY_PUNCTUATOR = _tiny_punctuator_config()


@pytest.fixture(scope="session")
def tiny_punctuator(tmp_path_factory) -> Path:
    """An untrained tiny punctuation model: its predictions are arbitrary, the rules around them are not (the first
    word capitalised, a paragraph ending in . ? or !, words never changed)."""
    from asr.punctuation import PunctuationModel, Punctuator

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("punctuator") / "tiny.pt"
    Punctuator(PunctuationModel(TINY_PUNCTUATOR), ["<other>", "the", "and"], {"mcdonald": "McDonald"}, {"made": "in a test"}).save(path)
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, overfit_manifest) -> Path:
    """The output folder of a tiny model trained on the two clips in this session, scored on them each epoch
    (about 20 s on one core). Only the training tests use it: its exact transcripts depend on the CPU."""
    from training.trainer import train

    folder = tmp_path_factory.mktemp("trained")
    dev = write_manifest(folder / "dev.jsonl", CLIPS)
    config = tiny_train_config(folder, overfit_manifest, dev_manifests=(str(dev),), epochs=TRAINING_EPOCHS)
    return train(config, log=lambda _msg: None).parent
