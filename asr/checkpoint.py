"""Self-describing model files: weights, model/feature config, vocabulary, normalisation, metadata."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .features import FeatureConfig
from .model import CTCModel, ModelConfig
from .text import Vocabulary

FORMAT_NAME = "asr-bilstm-ctc"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """Raised for a missing, corrupt or incompatible model file."""


@dataclass
class ModelBundle:
    """Everything needed to run a trained model."""

    model: CTCModel
    feature_config: FeatureConfig
    vocabulary: Vocabulary
    metadata: dict = field(default_factory=dict)
    phone_vocabulary: Vocabulary | None = None  # the phone output layer's units, when the model has one


def bundle_to_dict(bundle: ModelBundle) -> dict:
    data = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_config": bundle.model.config.to_dict(),
        "feature_config": bundle.feature_config.to_dict(),
        "vocabulary": list(bundle.vocabulary.tokens),
        "state_dict": {k: v.detach().cpu().clone() for k, v in bundle.model.state_dict().items()},
        "metadata": bundle.metadata,
    }
    if bundle.phone_vocabulary is not None:
        data["phone_vocabulary"] = list(bundle.phone_vocabulary.tokens)
    return data


def save_model(bundle: ModelBundle, path: str | os.PathLike) -> None:
    """Write the model atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(bundle_to_dict(bundle), tmp)
    os.replace(tmp, path)


def bundle_from_dict(data: object, source: str = "<dict>") -> ModelBundle:
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{source} is not a {FORMAT_NAME} model file")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{source} has format version {version}; this program reads version {FORMAT_VERSION}")
    try:
        model = CTCModel(ModelConfig(**data["model_config"]))
        model.load_state_dict(data["state_dict"])
        feature_config = FeatureConfig(**data["feature_config"])
        vocabulary = Vocabulary(data["vocabulary"])
        phone_vocabulary = Vocabulary(data["phone_vocabulary"]) if "phone_vocabulary" in data else None
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{source} is damaged or incompatible: {error}") from error
    if len(vocabulary) != model.config.vocab_size:
        raise CheckpointError(f"{source}: vocabulary size {len(vocabulary)} != model output {model.config.vocab_size}")
    phone_outputs = len(phone_vocabulary) if phone_vocabulary is not None else 0
    if phone_outputs != model.config.phone_vocab_size:
        raise CheckpointError(f"{source}: phone vocabulary size {phone_outputs} != phone output {model.config.phone_vocab_size}")
    model.eval()
    return ModelBundle(model, feature_config, vocabulary, dict(data.get("metadata", {})), phone_vocabulary)


def load_model_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> ModelBundle:
    """Load a model file saved by ``save_model`` (safe: ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises pickle, zip and runtime errors for damaged files
        raise CheckpointError(f"cannot read model file {path} (corrupt or not a model): {error}") from error
    bundle = bundle_from_dict(data, str(path))
    bundle.model.to(device)
    return bundle


def save_half_precision(path: str | os.PathLike, fmt: str, model: torch.nn.Module, fields: dict) -> None:
    """A small model in one file: ``{"format": fmt, **fields, "state": float16 weights}``, written beside ``path`` and
    moved into place (the LSTM LM and the punctuation model)."""
    path = Path(path)
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    partial = path.with_name(f".{path.name}.partial")
    torch.save({"format": fmt, **fields, "state": state}, partial)
    os.replace(partial, path)


def load_half_precision(path: str | os.PathLike, fmt: str, what: str, error: type[Exception], build) -> tuple[torch.nn.Module, dict]:
    """(model, the file's fields) of a file ``save_half_precision`` wrote; ``build(fields)`` makes the empty model.

    Raises ``error`` with a message naming ``what`` ("a punctuation model") for a missing file, another kind of file,
    or a broken one."""
    path, name = Path(path), what.split(" ", 1)[1]
    if not path.is_file():
        raise error(f"{name} not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != fmt:
            raise error(f"{path} is not {what} ({fmt})")
        model = build(data)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in data["state"].items()})
    except error:
        raise
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as failure:
        raise error(f"cannot load {name} {path}: {failure}") from failure
    return model, data
