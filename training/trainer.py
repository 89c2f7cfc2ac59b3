"""CTC training loop: AdamW with warm-up and cosine decay, gradient clipping, AMP on CUDA,
periodic checkpoints with exact resume, per-epoch validation, DistributedDataParallel."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from asr.checkpoint import ModelBundle, load_model_file, save_model
from asr.decoding import greedy_decode
from asr.features import FeatureConfig
from asr.model import CTCModel, ModelConfig
from asr.phones import Pronouncer, phone_vocabulary
from asr.text import Vocabulary

from .augment import AugmentConfig, FeatureAugment
from .crf import CTCCRFLoss, PhoneNgram, estimate_bigram
from .data import (
    FeatureSet,
    SpecAugment,
    bucket_batches,
    build_examples,
    feature_statistics,
    load_features,
    prefetched_batches,
)
from .metrics import error_rates
from .precision import Precision, cpu_has_native_bfloat16, precision_named, training_precision
from .shards import file_sha256
from .widen import widen_model

STATE_FILE = "train_state.pt"
PHONE_LM_FILE = "phone-lm.json"  # the CRF's phone LM, when a run builds its own
# Settings for adapting an existing model (``init_model``) to minutes or a few hours of new audio: a lower peak rate
# that keeps what the model knows, a short warm-up, smaller batches so that there are enough steps, fewer epochs.
FINETUNE_DEFAULTS = {"epochs": 10, "learning_rate": 5e-4, "warmup_steps": 30, "batch_frames": 4_000, "shortest_first_epochs": 0}
# ModelConfig fields that fix the weights' shapes: a fine-tuned model keeps those of the model it starts from.
SHAPE_FIELDS = ("n_mels", "stack_frames", "hidden_size", "num_layers", "cell", "vocab_size")


@dataclass(frozen=True)
class TrainConfig:
    train_manifests: tuple[str, ...]
    output_dir: str
    dev_manifests: tuple[str, ...] = ()
    model: ModelConfig = field(default_factory=ModelConfig)
    init_model: str = ""  # start from this model file ("bundled": the bundled model): its weights, vocabulary, normalisation
    epochs: int = 10
    batch_frames: int = 40_000  # padded 10 ms frames per batch (per process)
    max_utterance_seconds: float = 40.0
    learning_rate: float = 2e-3
    min_learning_rate_ratio: float = 0.05
    warmup_steps: int = 300
    # The first N epochs take their batches from the shortest utterances to the longest (SortaGrad): from scratch, CTC
    # learns its first alignments on short utterances, and the all-blank start is shorter (docs/model.md).
    shortest_first_epochs: int = 1
    weight_decay: float = 1e-2
    clip_grad_norm: float = 5.0
    specaugment: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # speed, gain, noise, reverberation (training/augment.py)
    amp: bool = True  # mixed precision where the device has a fast lower-precision type (training/precision.py)
    seed: int = 1234
    checkpoint_every: int = 200  # steps
    cache_dir: str = "cache"
    workers: int = 2  # processes for feature extraction
    device: str = "auto"
    max_steps: int = 0  # stop after this many optimiser steps in total (0 = no limit)
    keep_epochs: int = 3  # the last N epochs' models are kept as epoch-NNN.pt (for `asr average`)
    progress: bool = True
    phone_loss_weight: float = 1.0  # with a phone output layer (model.phone_vocab_size > 0): loss = chars + this x phones
    # The phone layer's criterion: "ctc", or "crf" (CTC-CRF, training/crf.py: a phone bigram LM normalises over every
    # competing phone sequence), plus crf_ctc_weight x its plain CTC loss. The character layer always keeps CTC.
    phone_loss: str = "ctc"
    phone_lm: str = ""  # the CRF's phone LM (`asr lm phones`); empty: built from the training manifests into output_dir
    crf_ctc_weight: float = 0.01

    def __post_init__(self) -> None:
        if not self.train_manifests:
            raise ValueError("at least one training manifest is required")
        if self.epochs < 1 or self.batch_frames < 100 or self.learning_rate <= 0:
            raise ValueError("epochs >= 1, batch_frames >= 100 and learning_rate > 0 are required")
        if self.clip_grad_norm <= 0:
            raise ValueError("clip_grad_norm must be positive")
        if (
            min(self.warmup_steps, self.shortest_first_epochs) < 0
            or self.weight_decay < 0
            or self.max_steps < 0
            or self.keep_epochs < 0
            or self.checkpoint_every < 1
        ):
            raise ValueError(
                "warmup_steps, shortest_first_epochs, weight_decay, max_steps and keep_epochs must be >= 0 and checkpoint_every >= 1"
            )
        if self.phone_loss_weight < 0 or self.crf_ctc_weight < 0:
            raise ValueError("phone_loss_weight and crf_ctc_weight must be >= 0")
        if self.phone_loss not in ("ctc", "crf"):
            raise ValueError(f"phone_loss must be 'ctc' or 'crf', got {self.phone_loss!r}")
        if self.phone_loss == "crf" and not self.model.phone_vocab_size:
            raise ValueError("the CRF loss is for the phone output layer: train with phones (--phones)")
        if not 0 <= self.min_learning_rate_ratio <= 1 or self.max_utterance_seconds <= 0:
            raise ValueError("min_learning_rate_ratio must be in [0, 1] and max_utterance_seconds positive")


def resolve_init_model(name: str) -> Path:
    """The model file that ``init_model`` names: "bundled" is the bundled English model, anything else a path."""
    if name == "bundled":
        from asr.recognizer import BUNDLED_MODEL

        return BUNDLED_MODEL
    return Path(name)


def init_model_config(init: ModelConfig, **settings) -> ModelConfig:
    """The configuration of a model initialised from one with configuration ``init``, with ``settings`` applied.

    Raises ValueError when a setting would change the shape of the weights (``SHAPE_FIELDS``); dropout, chunk
    and lookahead may change, a phone output layer or a character branch may be added to a model without one, and
    the hidden size may grow (the model is widened, computing what it did: ``training.widen``).
    """
    phones = settings.get("phone_vocab_size", init.phone_vocab_size)
    if init.phone_vocab_size and phones != init.phone_vocab_size:
        raise ValueError(f"the model to initialise from has {init.phone_vocab_size} phone outputs; it keeps them")
    char_layers = settings.get("char_layers", init.char_layers)
    if init.char_layers and char_layers != init.char_layers:
        raise ValueError(f"the model to initialise from has {init.char_layers} character-branch layers; it keeps them")
    widened = settings.get("hidden_size", init.hidden_size) > init.hidden_size
    differing = [k for k in SHAPE_FIELDS if k in settings and settings[k] != getattr(init, k) and not (k == "hidden_size" and widened)]
    conflicts = [f"{k}={settings[k]!r} (it has {getattr(init, k)!r})" for k in differing]
    if conflicts:
        raise ValueError(
            "the model to initialise from has a different shape: "
            + ", ".join(conflicts)
            + "; fine-tuning keeps the initial model's configuration (leave the shape settings out)"
        )
    return replace(init, **settings)


def _distributed() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; initialises the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), world_size


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _lr_lambda(config: TrainConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
        floor = config.min_learning_rate_ratio
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _rng_state() -> dict:
    """Every random generator's state, as tensors and numbers (what ``torch.load(weights_only=True)`` reads back)."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position, "gauss": [has_gauss, cached_gauss]},
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": python_gauss},
    }


def _set_rng_state(state: dict) -> None:
    """Restore ``_rng_state``'s generators exactly (a state saved by an older version restores torch's only)."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state, python_state = state.get("numpy"), state.get("python")
    if isinstance(numpy_state, dict):
        has_gauss, cached_gauss = numpy_state["gauss"]
        np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"], has_gauss, cached_gauss))
    if isinstance(python_state, dict):
        random.setstate((python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss"]))


def best_path_tokens(log_probs: torch.Tensor, vocabulary: Vocabulary) -> list[str]:
    """The greedy CTC path of log_probs (frames, vocab) without blanks, repeats and word boundaries: its tokens."""
    ids = torch.unique_consecutive(log_probs.argmax(dim=-1)).tolist()
    return [vocabulary.tokens[i] for i in ids if i != 0 and i != vocabulary.space_id]


@torch.no_grad()
def validate(
    model: CTCModel,
    dev: FeatureSet,
    vocabulary: Vocabulary,
    device: torch.device,
    batch_frames: int,
    phones: tuple[Pronouncer, Vocabulary] | None = None,
) -> dict:
    """Greedy-decode a feature set: {'wer', 'cer', 'utterances'}, and 'per' (phone error rate) with ``phones``."""
    model.eval()
    order = sorted(range(len(dev)), key=dev.num_frames)
    hyps, phone_hyps, batch = {}, {}, []
    chars = len(vocabulary)

    def run(batch: list[int]) -> None:
        longest = max(dev.num_frames(i) for i in batch)
        feats = torch.zeros(len(batch), longest, dev.features.shape[1])
        for row, i in enumerate(batch):
            feats[row, : dev.num_frames(i)] = torch.from_numpy(np.asarray(dev.frames(i), dtype=np.float32))
        lengths = torch.tensor([dev.num_frames(i) for i in batch])
        log_probs, out_lengths, _ = model(feats.to(device), lengths.to(device), head="chars" if phones is None else "both")
        for row, i in enumerate(batch):
            hyps[i] = greedy_decode(log_probs[row, : out_lengths[row], :chars], vocabulary, 0.03).text
            if phones is not None:
                phone_hyps[i] = " ".join(best_path_tokens(log_probs[row, : out_lengths[row], chars:], phones[1]))

    for i in order:
        if batch and dev.num_frames(i) * (len(batch) + 1) > batch_frames:
            run(batch)
            batch = []
        batch.append(i)
    if batch:
        run(batch)
    refs = [dev.utterances[i].text for i in range(len(dev))]
    rates = error_rates(refs, [hyps[i] for i in range(len(dev))])
    if phones is not None:
        phone_refs = [" ".join(p for p in phones[0].phones_of_text(text) if p != " ") for text in refs]
        rates["per"] = error_rates(phone_refs, [phone_hyps[i] for i in range(len(dev))])["wer"]
    return {**rates, "utterances": len(dev)}


class MetricsLog:
    """Appends rows to metrics.csv and redraws training_curves.png."""

    FIELDS = ("time", "epoch", "step", "split", "loss", "grad_norm", "lr", "audio_sec_per_sec", "wer", "cer", "per")

    def __init__(self, folder: Path) -> None:
        self.path = folder / "metrics.csv"
        self.plot_path = folder / "training_curves.png"
        self.fields = self.FIELDS
        if self.path.exists():  # a resumed run keeps the columns its file started with (older files have no "per")
            with self.path.open(newline="") as handle:
                self.fields = tuple(next(csv.reader(handle), self.FIELDS))
        else:
            with self.path.open("w", newline="") as handle:
                csv.writer(handle).writerow(self.FIELDS)

    def write(self, **row) -> None:
        with self.path.open("a", newline="") as handle:
            csv.writer(handle).writerow([row.get(k, "") for k in self.fields])

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with self.path.open() as handle:
            rows = list(csv.DictReader(handle))
        train = [r for r in rows if r["split"] == "train"]
        dev = [r for r in rows if r["split"] not in ("train", "")]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        axes[0].plot([int(r["step"]) for r in train], [float(r["loss"]) for r in train])
        axes[0].set(title="training CTC loss", xlabel="step", yscale="log")
        axes[1].plot([int(r["step"]) for r in train], [float(r["grad_norm"]) for r in train])
        axes[1].set(title="gradient norm (before clipping)", xlabel="step", yscale="log")
        for split in sorted({r["split"] for r in dev}):
            pts = [r for r in dev if r["split"] == split]
            for column, marker, style in (("wer", "o", "-"), ("cer", "x", "--"), ("per", "s", ":")):
                known = [r for r in pts if r.get(column)]
                if known:
                    axes[2].plot(
                        [int(r["epoch"]) for r in known],
                        [100 * float(r[column]) for r in known],
                        marker=marker,
                        ls=style,
                        label=f"{split} {column.upper()}",
                    )
        axes[2].set(title="validation (greedy)", xlabel="epoch", ylabel="%")
        if dev:
            axes[2].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(self.plot_path, dpi=80)
        plt.close(fig)


def _set_name(manifest: str) -> str:
    path = Path(manifest)
    return f"{path.parent.name}/{path.stem}"


def _check_replicas_in_sync(model: torch.nn.Module, world_size: int) -> None:
    """Raise if DistributedDataParallel replicas ended with different weights."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).double().cpu()
    summary = torch.stack([flat.sum(), flat.square().sum()])
    gathered = [torch.zeros_like(summary) for _ in range(world_size)]
    dist.all_gather(gathered, summary)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"model replicas diverged across processes: {[g.tolist() for g in gathered]}")


def _precision_probe(model: CTCModel, device: torch.device, head: str) -> Callable[[torch.dtype | None], None]:
    """One forward and backward of ``model`` on two random 6 s utterances in a given type (None: float32), for timing.

    The random number generators and the gradients are left as they were: a run's results do not depend on the probe.
    """

    def step(dtype: torch.dtype | None) -> None:
        with torch.random.fork_rng(devices=[]):
            feats = torch.randn(2, 600, model.config.n_mels, device=device)
            lengths = torch.full((2,), 600, device=device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                log_probs, _, _ = model(feats, lengths, head=head)
            log_probs.float().sum().backward()
        model.zero_grad(set_to_none=True)

    return step


def _run_precision(
    config: TrainConfig, device: torch.device, world_size: int, probe: Callable[[torch.dtype | None], None], state: dict | None
) -> Precision:
    """The number type of the run. A resumed run keeps the one it was started with where this device computes it
    natively (so that it resumes exactly); otherwise ``training_precision`` chooses, on a CPU by timing ``probe`` in
    each type, and all processes then use float32 if any of them timed it faster."""
    if state is not None and "precision" in state and config.amp:
        kept = precision_named(state["precision"])
        if kept.dtype is None or device.type == "cuda" or cpu_has_native_bfloat16():
            return kept
    precision = training_precision(device, config.amp, probe if device.type == "cpu" else None)
    if world_size > 1 and device.type == "cpu":
        any_float32 = torch.tensor([int(precision.dtype is None)])
        dist.all_reduce(any_float32, op=dist.ReduceOp.MAX)
        if any_float32.item():
            precision = precision_named("float32")
    return precision


class CTCStep:
    """One optimiser step of CTC training on a batch: augmentation, forward, loss, backward, clipping, update.

    Training and speaker adaptation share it. ``extra_loss(log_probs, out_lengths, batch)`` (log_probs (time, batch,
    vocab) float32) adds a term to the summed CTC loss, e.g. a penalty for drifting from another model's outputs.
    ``phone_criterion`` (e.g. ``training.crf.CTCCRFLoss``) replaces the phone layer's CTC loss. A batch whose loss or
    gradient is not finite changes no weight: the call returns a NaN loss and counts it in ``skipped_batches``.
    """

    def __init__(
        self,
        model: CTCModel,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        precision: Precision,
        vocabulary_size: int,
        clip_grad_norm: float,
        head: str = "chars",
        phone_loss_weight: float = 1.0,
        forward_model: torch.nn.Module | None = None,  # the DistributedDataParallel wrapper, when there is one
        augment: SpecAugment | None = None,
        perturb: FeatureAugment | None = None,
        extra_loss: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor] | None = None,
        phone_criterion: torch.nn.Module | None = None,
    ) -> None:
        self.model, self.optimizer, self.scheduler, self.precision = model, optimizer, scheduler, precision
        self.vocabulary_size, self.clip_grad_norm, self.head, self.phone_loss_weight = (
            vocabulary_size,
            clip_grad_norm,
            head,
            phone_loss_weight,
        )
        self.forward_model = forward_model or model
        self.augment, self.perturb, self.extra_loss = augment, perturb, extra_loss
        self.device = next(model.parameters()).device
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision.loss_scaling)
        self.ctc_loss = torch.nn.CTCLoss(blank=0, reduction="sum", zero_infinity=True)
        self.phone_criterion = phone_criterion
        self.skipped_batches = 0

    def __call__(self, batch: dict) -> tuple[float, float]:
        """Train on ``batch`` (features (batch, frames, mels), lengths, targets, ...): (summed loss, gradient norm)."""
        device, model = self.device, self.model
        feats, lengths = batch["features"].to(device, non_blocking=True), batch["lengths"].to(device)
        if self.perturb is not None:
            feats, lengths = self.perturb(feats, lengths)
        if self.augment is not None:
            normalised = (feats - model.feature_mean) / model.feature_std
            feats = self.augment(normalised) * model.feature_std + model.feature_mean
        with torch.autocast(device.type, dtype=self.precision.dtype, enabled=self.precision.dtype is not None):
            log_probs, out_lengths, _ = self.forward_model(feats, lengths, head=self.head)
        loss_sum = self._loss(log_probs.float().transpose(0, 1), out_lengths, batch)
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss_sum):
            return self._skip()
        self.scaler.scale(loss_sum / feats.shape[0]).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip_grad_norm))
        if not math.isfinite(grad_norm) and not self.precision.loss_scaling:  # the scaler skips such steps itself
            return self._skip()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss_sum.item(), grad_norm

    def _loss(self, log_probs: torch.Tensor, out_lengths: torch.Tensor, batch: dict) -> torch.Tensor:
        """The summed loss of a batch from log_probs (time, batch, vocab) float32."""
        device, chars = self.device, self.vocabulary_size
        loss_sum = self.ctc_loss(log_probs[:, :, :chars], batch["targets"].to(device), out_lengths, batch["target_lengths"].to(device))
        if self.head == "both":
            phone_targets, phone_lengths = batch["phone_targets"].to(device), batch["phone_target_lengths"].to(device)
            if self.phone_criterion is not None:
                phone_loss = self.phone_criterion(log_probs[:, :, chars:], phone_targets, out_lengths, phone_lengths)[0]
            else:
                phone_loss = self.ctc_loss(log_probs[:, :, chars:], phone_targets, out_lengths, phone_lengths)
            loss_sum = loss_sum + self.phone_loss_weight * phone_loss
        if self.extra_loss is not None:
            loss_sum = loss_sum + self.extra_loss(log_probs, out_lengths, batch)
        return loss_sum

    def _skip(self) -> tuple[float, float]:
        """Leave the weights as they are (the schedule still advances, so that it stays tied to the step count)."""
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": this step has no update, on purpose
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.skipped_batches += 1
        return math.nan, math.nan


def _load_sets(config: TrainConfig, feature_config: FeatureConfig, main_process: bool, world_size: int) -> tuple[list, list]:
    """Training and dev feature sets; rank 0 extracts features first, the others then read its cache."""
    train_sets, dev_sets = [], []
    if main_process:
        train_sets = [load_features(m, feature_config, config.cache_dir, config.workers) for m in config.train_manifests]
        dev_sets = [load_features(m, feature_config, config.cache_dir, config.workers) for m in config.dev_manifests]
    if world_size > 1:
        dist.barrier()
    if not main_process:
        train_sets = [load_features(m, feature_config, config.cache_dir, 1) for m in config.train_manifests]
    return train_sets, dev_sets


def _initial_model(config: TrainConfig, init: ModelBundle | None, init_digest: str, train_sets: list, log) -> CTCModel:
    """A new model: the initial model's weights and normalisation (widened if asked), or the training data's statistics."""
    model = CTCModel(config.model)
    if init is None:
        mean, std = feature_statistics(train_sets)
        model.set_normalization(torch.from_numpy(mean), torch.from_numpy(std))
        return model
    init_width = init.model.config.hidden_size  # a new phone layer or branch starts afresh
    narrow = model if init_width == config.model.hidden_size else CTCModel(replace(config.model, hidden_size=init_width))
    missing, unexpected = narrow.load_state_dict(init.model.state_dict(), strict=False)
    if unexpected or any(not key.startswith(("phone_output.", "char_branch")) for key in missing):
        raise ValueError(f"cannot initialise from {config.init_model}: missing {missing}, unexpected {unexpected}")
    if narrow is not model:
        widen_model(narrow, model)
    if log is not None:
        log(
            f"initialised from {config.init_model} ({init_digest})"
            + (f", widened from hidden size {init_width}" if narrow is not model else "")
        )
    return model


class _TrainingRun:
    """Everything one run of ``train`` holds: data, model, optimiser, counters; it trains epochs, validates, checkpoints."""

    def __init__(self, config: TrainConfig, log) -> None:
        self.config, self.log = config, log
        self.rank, local_rank, self.world_size = _distributed()
        self.device = _device(config.device, local_rank)
        self.main_process = self.rank == 0
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        self._load_inputs()
        self.model = _initial_model(config, self.init, self.init_digest, self.train_sets, log if self.main_process else None).to(
            self.device
        )
        self.head = "chars" if self.phones is None else "both"
        self.state_path = self.out / STATE_FILE
        state = torch.load(self.state_path, map_location="cpu", weights_only=True) if self.state_path.is_file() else None
        self._check_state(state)
        self.precision = _run_precision(config, self.device, self.world_size, _precision_probe(self.model, self.device, self.head), state)
        self._build_step()
        self.epoch, self.step_in_epoch, self.global_step, self.best_wer = 0, 0, 0, math.inf
        if state is not None:
            self._restore(state)
        self.metrics = MetricsLog(self.out) if self.main_process else None
        self.metadata = self._metadata()
        self.started, self.stopped_early = time.time(), False

    def _load_inputs(self) -> None:
        config = self.config
        self.init, self.init_digest = None, ""
        if config.init_model:
            init_path = resolve_init_model(config.init_model)
            self.init = load_model_file(init_path)
            self.init_digest = file_sha256(init_path)[:16]
            init_model_config(self.init.model.config, **asdict(config.model))  # raises for a different shape
        self.feature_config = self.init.feature_config if self.init is not None else FeatureConfig()
        self.vocabulary = self.init.vocabulary if self.init is not None else Vocabulary()
        if config.model.vocab_size != len(self.vocabulary):
            raise ValueError(f"model vocab_size must be {len(self.vocabulary)}")
        self.phones = None
        if config.model.phone_vocab_size:
            init_units = self.init.phone_vocabulary if self.init is not None else None
            units = init_units if init_units is not None else phone_vocabulary()
            if config.model.phone_vocab_size != len(units):
                raise ValueError(f"model phone_vocab_size must be {len(units)}")
            self.phones = (Pronouncer(), units)
        self.train_sets, self.dev_sets = _load_sets(config, self.feature_config, self.main_process, self.world_size)
        max_frames = int(config.max_utterance_seconds * 100)
        reasons: Counter = Counter()
        self.examples, skipped = build_examples(
            self.train_sets, self.vocabulary, config.model.stack_frames, max_frames, self.phones, reasons
        )
        if not self.examples:
            raise ValueError("no usable training utterances")
        self.phone_lm = self._phone_lm() if config.phone_loss == "crf" else None
        self.hours = sum(e.duration for e in self.examples) / 3600
        if self.main_process:
            self.log(
                f"training on {len(self.examples)} utterances ({self.hours:.2f} h), skipped {skipped}"
                + (f" ({', '.join(f'{reason}: {count}' for reason, count in reasons.most_common())})" if skipped else "")
                + "; "
                f"{self.world_size} process(es) on {self.device}"
            )

    def _phone_lm(self) -> PhoneNgram:
        """The CRF's phone LM: the configured file, else the one this run built before, else built now and kept."""
        tokens = self.phones[1].tokens
        path = Path(self.config.phone_lm) if self.config.phone_lm else self.out / PHONE_LM_FILE
        if self.config.phone_lm or path.is_file():
            lm = PhoneNgram.load(path, tokens)
        else:
            lm = estimate_bigram([e.phone_targets for e in self.examples], tokens)
            if self.main_process:
                lm.save(path)
                self.log(f"phone bigram LM built from the {len(self.examples)} training transcripts -> {path}")
        if self.main_process:
            self.log(f"phone CTC-CRF loss with {path} (CTC weight {self.config.crf_ctc_weight:g})")
        return lm

    def _check_state(self, state: dict | None) -> None:
        """A saved state must be of this run's model and initial model (checked before anything is timed or allocated)."""
        if state is None:
            return
        if state["config"] != json.dumps(asdict(self.config.model)):
            raise ValueError(f"{self.state_path} was written for a different model configuration; use a new output folder")
        if state.get("init", "") != self.init_digest:
            raise ValueError(f"{self.state_path} was written for a run with a different initial model; use a new output folder")

    def _build_step(self) -> None:
        config, model, device = self.config, self.model, self.device
        forward_model = model
        if self.world_size > 1:
            forward_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        steps_per_epoch = len(bucket_batches(self.examples, config.batch_frames, config.seed, 0, self.rank, self.world_size))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, steps_per_epoch * config.epochs))
        if self.main_process:
            self.log(f"computing in {self.precision.name}" + (" with loss scaling" if self.precision.loss_scaling else ""))
        self.step = CTCStep(
            model,
            optimizer,
            scheduler,
            self.precision,
            len(self.vocabulary),
            config.clip_grad_norm,
            self.head,
            config.phone_loss_weight,
            forward_model,
            augment=SpecAugment().to(device) if config.specaugment else None,
            perturb=FeatureAugment(config.augment, self.feature_config).to(device) if config.augment.enabled else None,
            phone_criterion=CTCCRFLoss(self.phone_lm, config.crf_ctc_weight) if self.phone_lm is not None else None,
        )

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.step.optimizer.load_state_dict(state["optimizer"])
        self.step.scheduler.load_state_dict(state["scheduler"])
        self.step.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.best_wer = state["best_wer"]
        _set_rng_state(state["rng"][self.rank] if self.rank < len(state["rng"]) else state["rng"][0])
        if self.main_process:
            self.log(f"resumed from {self.state_path}: epoch {self.epoch + 1}, step {self.global_step}")

    def _metadata(self) -> dict:
        config, init = self.config, self.init
        metadata = {
            "train_manifests": [_set_name(m) for m in config.train_manifests],
            "train_hours": round(self.hours, 3),
            "train_config": json.dumps({k: v for k, v in asdict(config).items() if k != "model"}),
            "device": str(self.device.type),
            "precision": self.precision.name,
            "world_size": self.world_size,
        }
        if init is not None:
            kept = ("train_manifests", "train_hours", "steps", "initialised_from")
            metadata["initialised_from"] = {
                "model": config.init_model,
                "sha256": self.init_digest,
                **{k: init.metadata[k] for k in kept if k in init.metadata},
            }
        return metadata

    def bundle(self, extra: dict) -> ModelBundle:
        phone_units = self.phones[1] if self.phones else None
        return ModelBundle(self.model, self.feature_config, self.vocabulary, {**self.metadata, **extra}, phone_units)

    def save_state(self) -> None:
        """The exact state to resume from (every process's random generators) and last.pt."""
        rng = [None] * self.world_size
        if self.world_size > 1:
            dist.all_gather_object(rng, _rng_state())
        else:
            rng = [_rng_state()]
        if not self.main_process:
            return
        step = self.step
        state = {
            "config": json.dumps(asdict(self.config.model)),
            "init": self.init_digest,
            "model": self.model.state_dict(),
            "optimizer": step.optimizer.state_dict(),
            "scheduler": step.scheduler.state_dict(),
            "scaler": step.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_wer": self.best_wer,
            "rng": rng,
            "precision": self.precision.name,
        }
        torch.save(state, self.state_path.with_suffix(".tmp"))
        os.replace(self.state_path.with_suffix(".tmp"), self.state_path)
        save_model(self.bundle({"epochs_completed": self.epoch, "steps": self.global_step}), self.out / "last.pt")

    def train_epoch(self) -> None:
        """The rest of the current epoch's batches (all of them unless resumed mid-epoch), or up to ``max_steps``."""
        config = self.config
        shortest_first = self.epoch < config.shortest_first_epochs
        batches = bucket_batches(self.examples, config.batch_frames, config.seed, self.epoch, self.rank, self.world_size, shortest_first)
        progress = None
        if self.main_process and config.progress:
            from tqdm import tqdm

            description = f"epoch {self.epoch + 1}/{config.epochs}"
            progress = tqdm(total=len(batches), initial=self.step_in_epoch, desc=description, unit="batch", dynamic_ncols=True)
        self.step.forward_model.train()
        window = _Window()
        upcoming = prefetched_batches(self.train_sets, self.examples, batches[self.step_in_epoch :], pin_memory=self.device.type == "cuda")
        for batch_index, batch in enumerate(upcoming, start=self.step_in_epoch):
            loss_sum, grad_norm = self.step(batch)
            self.global_step += 1
            self.step_in_epoch = batch_index + 1
            if math.isfinite(loss_sum):
                window.add(float(batch["duration"]), loss_sum, batch["features"].shape[0])
            elif self.main_process:
                skipped = self.step.skipped_batches
                self.log(f"step {self.global_step}: the loss or its gradient is not finite; batch skipped ({skipped} so far)")
            if self.global_step % 10 == 0 or self.step_in_epoch == len(batches):
                self._report(window, grad_norm, progress)
            if progress is not None:
                progress.update(1)
            if self.global_step % config.checkpoint_every == 0:
                self.save_state()
            if config.max_steps and self.global_step >= config.max_steps:
                self.stopped_early = True
                break
        upcoming.close()  # an early stop leaves prefetched batches behind
        if progress is not None:
            progress.close()

    def _report(self, window: _Window, grad_norm: float, progress) -> None:
        """Throughput, loss and learning rate of the last steps: to metrics.csv and the progress bar."""
        if self.world_size > 1:  # every rank's own audio: batches hold different amounts
            total = torch.tensor([window.audio], dtype=torch.float64, device=self.device)
            dist.all_reduce(total)
            window.audio = float(total)
        throughput, mean_loss = window.take()
        if self.metrics is not None:
            self.metrics.write(
                time=round(time.time() - self.started, 1),
                epoch=self.epoch + 1,
                step=self.global_step,
                split="train",
                loss=round(mean_loss, 4),
                grad_norm=round(grad_norm, 4),
                lr=f"{self.step.scheduler.get_last_lr()[0]:.3g}",
                audio_sec_per_sec=round(throughput, 1),
            )
        if progress is not None:
            progress.set_postfix(loss=f"{mean_loss:.3f}", gnorm=f"{grad_norm:.2f}", audio_s_per_s=f"{throughput:.0f}")

    def end_epoch(self) -> None:
        """Validate on the dev sets, keep the best and the last epochs' models, checkpoint."""
        config = self.config
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if self.main_process:
            wers = self._validate()
            if wers and float(np.mean(wers)) < self.best_wer:
                self.best_wer = float(np.mean(wers))
                extra = {"epochs_completed": self.epoch, "steps": self.global_step, "dev_wer": round(self.best_wer, 4)}
                save_model(self.bundle(extra), self.out / "best.pt")
        if self.main_process and config.keep_epochs:
            save_model(self.bundle({"epochs_completed": self.epoch, "steps": self.global_step}), self.out / f"epoch-{self.epoch:03d}.pt")
            for old in sorted(self.out.glob("epoch-[0-9][0-9][0-9].pt"))[: -config.keep_epochs]:
                old.unlink()
        self.save_state()

    def _validate(self) -> list[float]:
        summary, wers = [], []
        for manifest, dev in zip(self.config.dev_manifests, self.dev_sets):
            result = validate(self.model, dev, self.vocabulary, self.device, self.config.batch_frames, self.phones)
            wers.append(result["wer"])
            per = result.get("per")
            self.metrics.write(
                time=round(time.time() - self.started, 1),
                epoch=self.epoch,
                step=self.global_step,
                split=_set_name(manifest),
                wer=round(result["wer"], 4),
                cer=round(result["cer"], 4),
                per=round(per, 4) if per is not None else "",
            )
            summary.append(
                f"{_set_name(manifest)} WER {100 * result['wer']:.1f}% CER {100 * result['cer']:.1f}%"
                + (f" PER {100 * per:.1f}%" if per is not None else "")
            )
        self.metrics.plot()
        self.log(f"epoch {self.epoch}: " + ("; ".join(summary) if summary else "no dev set"))
        return wers

    def finish(self) -> Path:
        """Write model.pt (the best epoch on the dev sets, else the last) and return its path."""
        if self.world_size > 1:
            _check_replicas_in_sync(self.model, self.world_size)
        final = self.out / "last.pt"
        if self.main_process:
            final_model = self.out / "model.pt"
            source = self.out / "best.pt" if (self.out / "best.pt").is_file() else final
            if source != final:
                os.replace(source, final_model)
            else:
                save_model(self.bundle({"epochs_completed": self.epoch, "steps": self.global_step}), final_model)
            self.log(f"model written to {final_model} ({time.time() - self.started:.0f} s)")
            final = final_model
        if self.world_size > 1:
            dist.barrier()
            dist.destroy_process_group()
        return final


class _Window:
    """Audio seconds, summed loss and utterances of the steps since the last report."""

    def __init__(self) -> None:
        self.audio, self.loss, self.utterances, self.since = 0.0, 0.0, 0, time.time()

    def add(self, audio: float, loss: float, utterances: int) -> None:
        self.audio, self.loss, self.utterances = self.audio + audio, self.loss + loss, self.utterances + utterances

    def take(self) -> tuple[float, float]:
        """(audio seconds per second, mean loss per utterance), and start a new window."""
        result = (self.audio / max(1e-6, time.time() - self.since), self.loss / max(1, self.utterances))
        self.__init__()
        return result


def train(config: TrainConfig, log=print) -> Path:
    """Train (or resume) a model; returns the path of the final model file."""
    run = _TrainingRun(config, log)
    while run.epoch < config.epochs:
        run.train_epoch()
        if run.stopped_early:
            run.save_state()
            break
        run.end_epoch()
    return run.finish()
