"""Weight averaging of model files from one training run (e.g. its last epochs)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from asr.checkpoint import CheckpointError, ModelBundle, load_model_file

from .shards import file_sha256


def average_models(paths: Sequence[str | os.PathLike]) -> ModelBundle:
    """The element-wise mean of the weights of ``paths`` (model files of one architecture and vocabulary).

    Checkpoints along one run's trajectory sit in the same basin, so their mean is a model too, usually a slightly
    better one than any of them. Configuration, vocabularies and feature normalisation must be identical; the
    result keeps them and the last file's metadata, and records its sources under ``averaged_from``.
    Raises CheckpointError for an unreadable or incompatible file and ValueError for fewer than two files.
    """
    if len(paths) < 2:
        raise ValueError("averaging needs at least two model files")
    bundles = [load_model_file(p) for p in paths]
    states = [b.model.state_dict() for b in bundles]

    def shape(bundle: ModelBundle) -> tuple:
        phones = bundle.phone_vocabulary.tokens if bundle.phone_vocabulary is not None else None
        return bundle.model.config, bundle.feature_config, bundle.vocabulary.tokens, phones

    for path, bundle, state in zip(paths[1:], bundles[1:], states[1:]):
        if shape(bundle) != shape(bundles[0]):
            raise CheckpointError(f"{path} differs from {paths[0]} in configuration or vocabulary; only one run's models can be averaged")
        if not all(torch.equal(state[name], states[0][name]) for name in ("feature_mean", "feature_std")):
            raise CheckpointError(f"{path} has a different feature normalisation from {paths[0]}")
    averaged = {
        name: torch.stack([s[name].double() for s in states]).mean(0).to(value.dtype) if value.is_floating_point() else value
        for name, value in states[-1].items()
    }
    result = bundles[-1]
    result.model.load_state_dict(averaged)
    result.metadata = {
        **result.metadata,
        "averaged_from": [
            {
                "file": Path(p).name,
                "sha256": file_sha256(Path(p))[:16],
                **{k: b.metadata[k] for k in ("epochs_completed", "steps") if k in b.metadata},
            }
            for p, b in zip(paths, bundles)
        ],
    }
    return result
