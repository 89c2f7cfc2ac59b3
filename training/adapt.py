"""Speaker adaptation from a few utterances (``asr adapt``): the model learns one person's voice in about a minute.

With ten sentences, overfitting is the enemy, so few numbers change. By default (``lin+lhuc``) two small sets:
an affine map of each normalised log-mel frame before the first layer (a linear input network, n_mels x (n_mels + 1)
numbers), and LHUC (learning hidden unit contributions), one scale in (0, 2) per output unit of every encoder layer
(2 x hidden x layers numbers). A model with a phone output layer, which the default decoder reads, learns from the
utterances' phones as well as their characters. A few of the speaker's utterances are held out; full-batch steps run
until their CTC loss has not fallen for a while, the best number of steps is kept, and the speaker's model is then
refit on all the utterances for that many steps. The map and the scales are folded into the weights that read their
outputs, so the result is an ordinary model file that works everywhere a model does. Without dropout, the same
enrolment gives the same model.

Other methods, for comparison (``AdaptOptions.method``): each part alone, the LSTM biases (``bias``), the feature
normalisation re-estimated on the speaker's audio (``normalisation``), and a fine-tune of every weight held close to
the original model (``finetune``: KL divergence to its outputs, a small learning rate).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from asr.audio import AUDIO_SUFFIXES, SAMPLE_RATE, AudioError, load_audio
from asr.checkpoint import ModelBundle, save_model
from asr.features import LogMelExtractor
from asr.phones import PronunciationError, shared_pronouncer
from asr.text import normalize_text

from .data import SpecAugment
from .precision import precision_named
from .shards import file_sha256
from .trainer import CTCStep

PARTS = ("lhuc", "lin", "bias", "normalisation", "finetune")  # a method is one part or several joined by "+"
METHODS = ("lhuc", "lin", "bias", "lin+lhuc", "bias+lhuc", "normalisation", "lhuc+normalisation", "finetune")
LEARNING_RATES = {"lhuc": 0.05, "lin": 0.0005, "bias": 0.01, "finetune": 5e-5, "normalisation": 0.0}  # per part
MIN_UTTERANCES, MAX_UTTERANCES = 3, 200
SEARCH_SHARE = 0.55  # of the time budget: the refit on all the utterances takes about 1.4 times the search's best steps
MAX_UTTERANCE_SECONDS = 30.0
SILENCE_PEAK = 0.01  # an utterance whose loudest sample is below this (-40 dBFS) holds no speech
# a transcript is taken for another recording's when the unadapted model's CTC loss per character is above both of these
MISMATCH_NATS_PER_CHARACTER = 3.0
MISMATCH_TIMES_MEDIAN = 2.5  # times the median of the speaker's utterances


class AdaptationError(ValueError):
    """Raised when the data cannot adapt the model, or adaptation did not help (nothing is written then)."""


@dataclass(frozen=True)
class AdaptOptions:
    method: str = "lin+lhuc"
    max_steps: int = 40  # full-batch steps tried on the utterances not held out
    check_every: int = 4  # steps between held-out scores
    patience: int = 2  # the search stops after this many held-out scores without a new best
    learning_rate: float = 0.0  # one rate for every part; 0: each part its own (LEARNING_RATES)
    kl_weight: float = 0.0  # weight of the KL divergence to the original model's outputs (per frame); 0: 1 for finetune, else none
    specaugment: bool = False  # mask time and frequency bands of the enrolment features at each step
    dropout: bool = False  # the model's own dropout during the steps (off: the steps add no noise to a few utterances)
    seed: int = 0  # of the dropout and masks: the same enrolment gives the same model
    held_out: float = 0.3  # share of the utterances held out to choose the number of steps (at least one)
    seconds: float = 55.0  # wall-clock budget of the whole adaptation: the search ends at SEARCH_SHARE of it, the refit at the end

    def __post_init__(self) -> None:
        unknown = [part for part in self.method.split("+") if part not in PARTS]
        if unknown or not self.method:
            raise ValueError(f"method must be one of {', '.join(PARTS)} or several joined by '+', got {self.method!r}")
        if min(self.max_steps, self.check_every, self.patience) < 1 or self.learning_rate < 0 or self.kl_weight < 0:
            raise ValueError("max_steps, check_every and patience >= 1, learning_rate and kl_weight >= 0 are needed")
        if not 0 < self.held_out < 1 or self.seconds <= 0:
            raise ValueError("held_out must be in (0, 1) and seconds positive")

    @property
    def parts(self) -> frozenset[str]:
        return frozenset(self.method.split("+"))

    def rate(self, part: str) -> float:
        return self.learning_rate or LEARNING_RATES[part]

    @property
    def kl(self) -> float:
        return self.kl_weight or (1.0 if "finetune" in self.parts else 0.0)


@dataclass
class Utterance:
    """One enrolment utterance: features (frames, n_mels), target character ids (and phone ids for a model with a phone
    output layer, which the default decoder reads), and where it came from."""

    name: str
    text: str
    features: np.ndarray
    targets: list[int]
    seconds: float
    phone_targets: list[int] = field(default_factory=list)


@dataclass
class AdaptationReport:
    method: str
    utterances: int
    audio_seconds: float
    held_out: int
    steps: int
    held_out_loss_before: float  # CTC loss per character on the held-out utterances
    held_out_loss_after: float
    seconds: float
    rejected: list[str] = field(default_factory=list)  # utterances left out, with the reason

    def to_dict(self) -> dict:
        return asdict(self)


def enrolment_pairs(data: list[str]) -> list[tuple[str, str]]:
    """(audio path, transcript) of each utterance: JSONL manifests, and folders of audio files with a .txt beside each."""
    pairs: list[tuple[str, str]] = []
    for item in data:
        path = Path(item)
        if path.is_dir():
            pairs += _folder_pairs(path)
        elif path.suffix == ".jsonl" and path.is_file():
            pairs += _manifest_pairs(path)
        else:
            raise AdaptationError(f"{item}: not a JSONL manifest or a folder of audio files with transcripts")
    if not pairs:
        raise AdaptationError("no utterances found in " + ", ".join(data))
    return pairs


def _folder_pairs(folder: Path) -> list[tuple[str, str]]:
    audio = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    missing = [p.name for p in audio if not p.with_suffix(".txt").is_file()]
    if missing:
        raise AdaptationError(
            f"{folder}: no transcript (.txt beside the audio) for {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
        )
    return [(str(p), p.with_suffix(".txt").read_text(encoding="utf-8", errors="replace").strip()) for p in audio]


def _manifest_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append((str(path.parent / row["audio"]), str(row["text"])))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise AdaptationError(f"{path} line {number}: not a manifest line with audio and text ({error})") from None
    return pairs


def prepare_utterances(pairs: list[tuple[str, str]], bundle: ModelBundle) -> tuple[list[Utterance], list[str]]:
    """Features and targets of the usable utterances, and why each other one was left out."""
    extractor = LogMelExtractor(bundle.feature_config)
    usable, rejected = [], []
    for audio_path, transcript in pairs:
        name = Path(audio_path).name
        text = normalize_text(transcript)
        try:
            audio = load_audio(audio_path)
        except (AudioError, OSError) as error:
            rejected.append(f"{name}: cannot read the audio ({error})")
            continue
        seconds = len(audio) / SAMPLE_RATE
        reason = _unusable(audio, seconds, text, bundle)
        phones: list[int] = []
        if not reason and bundle.phone_vocabulary is not None:
            try:
                phones = bundle.phone_vocabulary.encode(shared_pronouncer().phones_of_text(text))
            except PronunciationError as error:
                reason = f"no pronunciation for a word ({error})"
        if reason:
            rejected.append(f"{name}: {reason}")
            continue
        usable.append(Utterance(name, text, extractor(audio), bundle.vocabulary.encode(text), seconds, phones))
    return usable, rejected


def _unusable(audio: np.ndarray, seconds: float, text: str, bundle: ModelBundle) -> str:
    if not text:
        return "the transcript has no words"
    if any(ch not in bundle.vocabulary.tokens for ch in text):
        return "the transcript has characters the model cannot write"
    if seconds > MAX_UTTERANCE_SECONDS or seconds < 0.3:
        return f"{seconds:.1f} s long (0.3 to {MAX_UTTERANCE_SECONDS:.0f} s are used)"
    if float(np.abs(audio).max(initial=0.0)) < SILENCE_PEAK:
        return "silent (no sample above -40 dBFS)"
    return ""


def collate_utterances(utterances: list[Utterance]) -> dict[str, torch.Tensor]:
    """features (B, T, n_mels), lengths (B,), targets (sum U,), target_lengths (B,), duration: a training batch; with
    phone targets also phone_targets (sum P,) and phone_target_lengths (B,)."""
    longest = max(len(u.features) for u in utterances)
    features = np.zeros((len(utterances), longest, utterances[0].features.shape[1]), dtype=np.float32)
    for row, u in enumerate(utterances):
        features[row, : len(u.features)] = u.features
    batch = {
        "features": torch.from_numpy(features),
        "lengths": torch.tensor([len(u.features) for u in utterances]),
        "targets": torch.tensor([t for u in utterances for t in u.targets]),
        "target_lengths": torch.tensor([len(u.targets) for u in utterances]),
        "duration": torch.tensor(sum(u.seconds for u in utterances)),
    }
    if all(u.phone_targets for u in utterances):
        batch["phone_targets"] = torch.tensor([t for u in utterances for t in u.phone_targets])
        batch["phone_target_lengths"] = torch.tensor([len(u.phone_targets) for u in utterances])
    return batch


@torch.no_grad()
def ctc_losses(model: nn.Module, batch: dict, vocabulary_size: int) -> torch.Tensor:
    """Each utterance's CTC loss per target character (B,), in eval mode; for a batch with phone targets, the mean of
    that and the loss per target phone."""
    was_training = model.training
    model.eval()
    phones = "phone_targets" in batch
    log_probs, out_lengths, _ = model(batch["features"], batch["lengths"], head="both" if phones else "chars")
    log_probs = log_probs.transpose(0, 1)
    losses = _per_unit_ctc(log_probs[:, :, :vocabulary_size], batch["targets"], out_lengths, batch["target_lengths"])
    if phones:
        phone_losses = _per_unit_ctc(log_probs[:, :, vocabulary_size:], batch["phone_targets"], out_lengths, batch["phone_target_lengths"])
        losses = (losses + phone_losses) / 2
    model.train(was_training)
    return losses


def _per_unit_ctc(log_probs: torch.Tensor, targets: torch.Tensor, out_lengths: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """log_probs (T, B, units) -> each utterance's CTC loss per target unit (B,)."""
    loss = nn.functional.ctc_loss(log_probs, targets, out_lengths, target_lengths, reduction="none", zero_infinity=True)
    return loss / target_lengths.clamp_min(1)


class Lhuc(nn.Module):
    """One scale 2 * sigmoid(a) per output unit of every encoder layer (a = 0: scale 1, the model unchanged)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        width = 2 * model.config.hidden_size
        self.amounts = nn.Parameter(torch.zeros(len(model.layers), width))
        self._hooks = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(model.layers)]

    def scales(self) -> torch.Tensor:
        """(layers, 2 * hidden)"""
        return 2 * torch.sigmoid(self.amounts)

    def _hook(self, index: int) -> Callable:
        def scale(_module, _inputs, outputs):
            main, context, state = outputs
            s = self.scales()[index]
            return main * s, context * s, state

        return scale

    def fold(self, model: nn.Module) -> None:
        """Multiply the scales into the weights that read each layer's output, and remove the hooks."""
        for hook in self._hooks:
            hook.remove()
        scales = self.scales().detach()
        with torch.no_grad():
            for i, s in enumerate(scales):
                for weight in _readers(model, i):
                    weight.mul_(s)


def _readers(model: nn.Module, index: int) -> list[torch.Tensor]:
    """The input weights (out, 2 * hidden) that read encoder layer ``index``'s output."""
    if index + 1 < len(model.layers):
        following = [model.layers[index + 1]]
        outputs = []
    else:
        following = list(model.char_branch[:1])
        outputs = [layer for layer in (model.output, model.phone_output) if layer is not None]
    weights = [layer.weight for layer in outputs]
    for layer in following:
        weights += [rnn.weight_ih_l0 for rnn in (layer.forward_rnn, layer.backward_rnn)]
    return weights


class InputTransform(nn.Module):
    """An affine map A x + b of every normalised log-mel frame x (n_mels,) before the first layer (A = I, b = 0 at first):
    a linear input network, the neural form of a speaker's feature-space transform."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        size = model.config.n_mels
        self.stack = model.config.stack_frames
        self.matrix = nn.Parameter(torch.eye(size))
        self.shift = nn.Parameter(torch.zeros(size))
        self._hook = model.layers[0].register_forward_pre_hook(self._transform)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, stack * n_mels) stacked frames -> the same with each frame mapped."""
        frames = x.unflatten(-1, (self.stack, -1))
        return (frames @ self.matrix.T + self.shift).flatten(-2)

    def _transform(self, _module, inputs):
        main, context, *rest = inputs
        return (self.transform(main), self.transform(context), *rest)

    def fold(self, model: nn.Module) -> None:
        """Fold the map into the first layer's input weights and biases, and remove the hook."""
        self._hook.remove()
        with torch.no_grad():
            for rnn in (model.layers[0].forward_rnn, model.layers[0].backward_rnn):
                blocks = rnn.weight_ih_l0.unflatten(1, (self.stack, -1))  # (4 * hidden, stack, n_mels)
                rnn.bias_ih_l0.add_(torch.einsum("hsn,n->h", blocks, self.shift))
                rnn.weight_ih_l0.copy_((blocks @ self.matrix).flatten(1))


def _biases(model: nn.Module) -> list[nn.Parameter]:
    """The encoder's LSTM biases and the character output layer's."""
    return [p for name, p in model.layers.named_parameters() if ".bias_" in name] + [model.output.bias]


def speaker_normalisation(model: nn.Module, utterances: list[Utterance]) -> None:
    """Set the model's feature mean and standard deviation to those of the speaker's frames."""
    frames = np.concatenate([u.features for u in utterances])
    model.set_normalization(torch.from_numpy(frames.mean(axis=0)), torch.from_numpy(frames.std(axis=0)))


class _Adapter:
    """Adapts a copy of a model with one method: ``run(batch, steps)`` and a held-out score every few steps."""

    def __init__(self, bundle: ModelBundle, options: AdaptOptions, utterances: list[Utterance]) -> None:
        self.options = options
        parts = options.parts
        self.model = copy.deepcopy(bundle.model).float().train(options.dropout)
        self.vocabulary_size = len(bundle.vocabulary)
        if "normalisation" in parts:
            speaker_normalisation(self.model, utterances)
        self.model.requires_grad_("finetune" in parts)
        self.lhuc = Lhuc(self.model) if "lhuc" in parts else None
        self.lin = InputTransform(self.model) if "lin" in parts else None
        groups = self._parameter_groups()
        self.original = copy.deepcopy(bundle.model).float().eval() if options.kl else None
        self.step = None
        if groups:
            optimizer = torch.optim.Adam(groups)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
            augment = SpecAugment(freq_masks=1, time_masks=1) if options.specaugment else None
            head = "both" if all(u.phone_targets for u in utterances) else "chars"  # the phones are what beam search reads
            self.step = CTCStep(
                self.model, optimizer, scheduler, precision_named("float32"), self.vocabulary_size, 5.0, head=head, augment=augment
            )

    def _parameter_groups(self) -> list[dict]:
        parts, groups = self.options.parts, []
        if "finetune" in parts:
            groups.append({"params": list(self.model.parameters()), "lr": self.options.rate("finetune")})
        elif "bias" in parts:
            biases = _biases(self.model)
            for bias in biases:
                bias.requires_grad_(True)
            groups.append({"params": biases, "lr": self.options.rate("bias")})
        if self.lhuc is not None:
            groups.append({"params": [self.lhuc.amounts], "lr": self.options.rate("lhuc")})
        if self.lin is not None:
            groups.append({"params": list(self.lin.parameters()), "lr": self.options.rate("lin")})
        return groups

    def kl_to_original(self, batch: dict) -> Callable:
        """Per-frame KL(original || adapted) of ``batch``'s outputs, summed, times the KL weight."""
        with torch.no_grad():
            reference, _, _ = self.original(batch["features"], batch["lengths"])
        reference = reference[:, :, : self.vocabulary_size].transpose(0, 1)
        weight = self.options.kl

        def loss(log_probs: torch.Tensor, out_lengths: torch.Tensor, _batch: dict) -> torch.Tensor:
            mask = (torch.arange(log_probs.shape[0])[:, None] < out_lengths[None, :]).unsqueeze(-1)
            kl = reference.exp() * (reference - log_probs[:, :, : self.vocabulary_size])
            return weight * (kl * mask).sum()

        return loss

    def run(self, batch: dict, steps: int, score: Callable[[int], bool] | None = None, deadline: float = math.inf) -> int:
        """Up to ``steps`` full-batch steps on ``batch`` that end before ``deadline`` (by the last step's time), calling
        ``score(step)`` every ``check_every`` (it returns False to stop); the steps taken."""
        if self.step is None:
            return 0
        self.step.extra_loss = self.kl_to_original(batch) if self.original is not None else None
        taken, last = 0, 0.0
        with torch.random.fork_rng():
            torch.manual_seed(self.options.seed)
            while taken < steps and time.monotonic() + last < deadline:  # no step that would end past the deadline
                began = time.monotonic()
                self.step(batch)
                last = time.monotonic() - began
                taken += 1
                if score is not None and taken % self.options.check_every == 0 and not score(taken):
                    break
        return taken

    def result(self) -> nn.Module:
        """The adapted model with the LHUC scales and input map folded in (``run`` can no longer be called)."""
        for module in (self.lhuc, self.lin):
            if module is not None:
                module.fold(self.model)
        self.model.requires_grad_(True)
        return self.model.eval()


def _split(utterances: list[Utterance], share: float) -> tuple[list[Utterance], list[Utterance]]:
    """(adaptation, held-out): the held-out ones are spread over the list (every k-th), at least one."""
    count = max(1, round(share * len(utterances)))
    step = len(utterances) / count
    held = {min(len(utterances) - 1, int(step * k + step / 2)) for k in range(count)}
    return [u for i, u in enumerate(utterances) if i not in held], [u for i, u in enumerate(utterances) if i in held]


def _best_step(scores: dict[int, float]) -> int:
    """The step with the lowest held-out loss (the earliest of equal ones, to 4 decimals)."""
    return min(scores, key=lambda step: (round(scores[step], 4), step))


def adapt(
    bundle: ModelBundle, utterances: list[Utterance], options: AdaptOptions = AdaptOptions(), log: Callable[[str], None] = lambda _: None
) -> tuple[ModelBundle, AdaptationReport]:
    """Adapt ``bundle``'s model to the speaker of ``utterances``; the adapted bundle and a report.

    Raises ``AdaptationError`` for too few or too many utterances, and when no step improved the held-out utterances.
    """
    if not MIN_UTTERANCES <= len(utterances) <= MAX_UTTERANCES:
        raise AdaptationError(
            f"{len(utterances)} usable utterance(s): adaptation needs {MIN_UTTERANCES} to {MAX_UTTERANCES} "
            "(more than that: fine-tune with `asr train --init`)"
        )
    started = time.monotonic()
    fit, held_out = _split(utterances, options.held_out)
    fit_batch, held_batch = collate_utterances(fit), collate_utterances(held_out)
    vocabulary_size = len(bundle.vocabulary)
    before = float(ctc_losses(bundle.model, held_batch, vocabulary_size).mean())
    scores: dict[int, float] = {}
    search = _Adapter(bundle, options, fit)

    def score(step: int) -> bool:
        scores[step] = float(ctc_losses(search.model, held_batch, vocabulary_size).mean())
        log(f"step {step}: held-out loss {scores[step]:.3f} per character (unadapted {before:.3f})")
        return step - _best_step(scores) < options.patience * options.check_every

    score(0)
    search.run(fit_batch, options.max_steps, score, deadline=started + SEARCH_SHARE * options.seconds)
    best_step = _best_step(scores)
    if scores[best_step] > before or (best_step == 0 and options.parts != {"normalisation"}):
        raise AdaptationError(
            f"adaptation did not improve the held-out utterances (loss {before:.3f} per character unadapted, "
            f"{min(scores.values()):.3f} at best): nothing was written"
        )
    final = _Adapter(bundle, options, utterances)
    steps = final.run(collate_utterances(utterances), best_step, deadline=started + options.seconds)  # fewer when time ran out
    if steps == 0 and best_step > 0:
        raise AdaptationError(f"the time budget ({options.seconds:.0f} s) ran out: give more seconds, or fewer or shorter utterances")
    adapted = ModelBundle(final.result(), bundle.feature_config, bundle.vocabulary, dict(bundle.metadata), bundle.phone_vocabulary)
    report = AdaptationReport(
        options.method, len(utterances), round(sum(u.seconds for u in utterances), 1), len(held_out), steps,
        round(before, 4), round(scores[best_step], 4), round(time.monotonic() - started, 1),
    )  # fmt: skip
    return adapted, report


def adapt_model_file(
    model_path: str | Path,
    data: list[str],
    output: str | Path,
    options: AdaptOptions = AdaptOptions(),
    log: Callable[[str], None] = lambda _: None,
) -> AdaptationReport:
    """Adapt the model file ``model_path`` to the speaker of ``data`` and write ``output`` (only when adaptation worked)."""
    from asr.checkpoint import load_model_file

    pairs = enrolment_pairs(data)
    if len(pairs) > MAX_UTTERANCES:
        raise AdaptationError(
            f"{len(pairs)} utterances: adaptation uses at most {MAX_UTTERANCES} (for more, fine-tune with `asr train --init`)"
        )
    bundle = load_model_file(model_path)
    utterances, rejected = prepare_utterances(pairs, bundle)
    for reason in rejected:
        log(f"left out {reason}")
    utterances, mismatched = drop_mismatched(bundle, utterances)
    rejected += mismatched
    for reason in mismatched:
        log(f"left out {reason}")
    adapted, report = adapt(bundle, utterances, options, log)
    report.rejected = rejected
    adapted.metadata["adapted_from"] = adapted_from(bundle, model_path)
    adapted.metadata["adaptation"] = report.to_dict()
    save_model(adapted, output)
    return report


def adapted_from(bundle: ModelBundle, model_path: str | Path) -> dict:
    """What an adapted model records of its origin; ``bundled``: it is (or was adapted from) the bundled model, whose
    language model it then decodes with."""
    from asr.recognizer import BUNDLED_MODEL

    earlier = bundle.metadata.get("adapted_from", {})
    bundled = bool(earlier.get("bundled")) or Path(model_path).resolve() == BUNDLED_MODEL.resolve()
    return {"model": str(model_path), "sha256": file_sha256(Path(model_path))[:16], "bundled": bundled}


def drop_mismatched(bundle: ModelBundle, utterances: list[Utterance]) -> tuple[list[Utterance], list[str]]:
    """Utterances whose transcript the unadapted model finds plausible, and why the others were left out."""
    if not utterances:
        return [], []
    losses = ctc_losses(bundle.model, collate_utterances(utterances), len(bundle.vocabulary)).tolist()
    # a voice the model finds hard raises every utterance's loss; a wrong transcript stands out from the speaker's others
    limit = max(MISMATCH_NATS_PER_CHARACTER, MISMATCH_TIMES_MEDIAN * float(np.median(losses)))
    kept = [u for u, loss in zip(utterances, losses) if loss <= limit]
    reasons = [
        f'{u.name}: the transcript does not seem to match the audio ({loss:.1f} nats per character; "{u.text[:60]}")'
        for u, loss in zip(utterances, losses)
        if loss > limit
    ]
    return kept, reasons
