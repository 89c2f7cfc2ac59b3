"""CTC-CRF loss (Xiang and Ou, "CRF-based single-stage acoustic modeling with CTC topology", ICASSP 2019).

The network's outputs are read as log-potentials over CTC paths. A path's score is the sum of its frames'
potentials plus a phone language model's log-probability of the label sequence the path collapses to:

    log p(labels | x) = log sum_{paths of labels} exp(score)  -  log sum_{all paths} exp(score)
                        (numerator)                              (denominator)

The numerator is ordinary CTC plus the LM score of the utterance's labels (a constant). The denominator sums over
every label sequence the LM allows; with a bigram LM over K labels it is a forward pass over 2K + 1 states (K "the
last frame emitted label a", K + 1 "blank after history h", h = start or a label), two small matrix products per
frame. Both terms are invariant to adding a constant to all potentials of a frame, so log-softmax outputs can be
given as they are (and decoders read them as they read a CTC model's).

The denominator is an ``autograd.Function`` with an explicit backward pass (forward-backward in scaled probability
space): memory is one (batch, frames, 2K + 1) table, and the gradient is each frame's state occupancy.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

PHONE_LM_FORMAT = "bilstm-asr phone n-gram 1"
BIGRAM_FORMAT = "bilstm-asr phone bigram 1"  # the first version's files (a bigram table), still read
ORDERS = (2, 3)


class PhoneLMError(ValueError):
    """A phone LM file that cannot be read, or one for another phone vocabulary."""


def histories(order: int, num_labels: int) -> list[tuple[int, ...]]:
    """The LM states of an n-gram over labels 1..K: the last ``order - 1`` labels, 0 standing for the sentence start.

    Bigram: (0,), (1,), ..., (K,). Trigram: (0, 0), then (0, a) and (a, b) for every label a, b.
    """
    labels = range(1, num_labels + 1)
    if order == 2:
        return [(0,), *((a,) for a in labels)]
    if order == 3:
        return [(0, 0), *((0, a) for a in labels), *((a, b) for a in labels for b in labels)]
    raise PhoneLMError(f"phone LMs are of order {' or '.join(map(str, ORDERS))}, not {order}")


@dataclass(frozen=True)
class PhoneNgram:
    """A smoothed n-gram LM over the non-blank labels 1..K of a CTC vocabulary (blank = 0), as explicit states.

    ``log_probs`` (S, K + 1): row s is the history ``histories(order, K)[s]``, column j the next event (0 = the
    sentence end, b = label b); every row is a normalised distribution. ``next_state`` (S, K + 1): the history after
    label j (column 0 unused). ``last_label`` (S,): each history's last label (0 for the start).
    """

    tokens: tuple[str, ...]  # the CTC vocabulary it was built for, blank first
    order: int
    log_probs: Tensor

    def __post_init__(self) -> None:
        states = histories(self.order, self.num_labels)
        if tuple(self.log_probs.shape) != (len(states), len(self.tokens)):
            raise PhoneLMError(
                f"an order-{self.order} phone LM over {len(self.tokens)} tokens needs a ({len(states)}, {len(self.tokens)}) "
                f"table, got {tuple(self.log_probs.shape)}"
            )
        if not torch.allclose(self.log_probs.double().exp().sum(1), torch.ones(len(states), dtype=torch.float64), atol=1e-4):
            raise PhoneLMError("every row of a phone LM must be a probability distribution")
        index = {history: i for i, history in enumerate(states)}
        following = [[index[(*h[1:], c)] if c else 0 for c in range(len(self.tokens))] for h in states]
        object.__setattr__(self, "next_state", torch.tensor(following, dtype=torch.long))
        object.__setattr__(self, "last_label", torch.tensor([h[-1] for h in states], dtype=torch.long))

    @property
    def num_labels(self) -> int:
        """K, the non-blank labels."""
        return len(self.tokens) - 1

    @property
    def num_states(self) -> int:
        return self.log_probs.shape[0]

    def sequence_log_prob(self, labels: Sequence[int]) -> float:
        """log p(labels) including the sentence end; labels are ids in 1..K."""
        state, total = 0, 0.0
        for label in labels:
            total += float(self.log_probs[state, label])
            state = int(self.next_state[state, label])
        return total + float(self.log_probs[state, 0])

    def batch_log_probs(self, targets: Tensor, target_lengths: Tensor) -> Tensor:
        """log p of each of a batch's label sequences (flat ``targets`` (sum U,), ``target_lengths`` (B,)) -> (B,)."""
        flat, lengths = targets.long().cpu().tolist(), target_lengths.long().cpu().tolist()
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        values = [self.sequence_log_prob(flat[a : a + n]) for a, n in zip(starts, lengths)]
        return torch.tensor(values, dtype=self.log_probs.dtype)

    def save(self, path: str | os.PathLike) -> None:
        payload = {"format": PHONE_LM_FORMAT, "order": self.order, "tokens": list(self.tokens), "log_probs": self.log_probs.tolist()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(f"{path}.tmp")
        temporary.write_text(json.dumps(payload))
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str | os.PathLike, tokens: Sequence[str] | None = None) -> PhoneNgram:
        """Read a file written by ``save``; with ``tokens``, it must be for that vocabulary."""
        try:
            payload = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise PhoneLMError(f"cannot read phone LM {path}: {error}") from None
        if not isinstance(payload, dict) or payload.get("format") not in (PHONE_LM_FORMAT, BIGRAM_FORMAT):
            raise PhoneLMError(f"{path} is not a phone LM file (from `asr lm phones`)")
        if tokens is not None and tuple(payload["tokens"]) != tuple(tokens):
            raise PhoneLMError(f"{path} was built for another phone vocabulary ({len(payload['tokens'])} tokens)")
        order = payload.get("order", 2)
        return cls(tuple(payload["tokens"]), order, torch.tensor(payload["log_probs"], dtype=torch.float32))


def estimate_ngram(sequences: Iterable[Sequence[int]], tokens: Sequence[str], order: int = 2, discount: float = 0.5) -> PhoneNgram:
    """An n-gram over labels 1..K from label sequences: interpolated absolute discounting (Kneser-Ney's, with plain
    counts), each order down to the one below, the unigram add-one smoothed: every label may follow every history."""
    size = len(tokens)
    if not 0 < discount < 1:
        raise ValueError("discount must be in (0, 1)")
    states = histories(order, size - 1)
    counts = [torch.zeros(len(histories(n, size - 1)), size, dtype=torch.float64) for n in (2, 3)[: order - 1]]
    for labels in (list(s) for s in sequences):
        if any(not 1 <= label < size for label in labels):
            raise ValueError(f"labels must be in 1..{size - 1}")
        padded, events = [0, 0, *labels], [*labels, 0]
        for i, event in enumerate(events):  # the labels before events[i] are padded[: i + 2]
            counts[0][padded[i + 1], event] += 1
            if order == 3:
                counts[1][_row(3, (padded[i], padded[i + 1]), size - 1), event] += 1
    unigram = counts[0].sum(0) + 1
    probs = _discounted(counts[0], (unigram / unigram.sum()).expand(size, size), discount)
    if order == 3:
        lower = torch.stack([probs[h[1]] for h in states])  # the bigram of each history's last label
        probs = _discounted(counts[1], lower, discount)
    return PhoneNgram(tuple(tokens), order, (probs / probs.sum(1, keepdim=True)).log().float())


def _row(order: int, history: tuple[int, ...], num_labels: int) -> int:
    """The row of ``history`` in ``histories(order, num_labels)``."""
    if order == 2:
        return history[0]
    first, second = history
    return second if first == 0 else num_labels + (first - 1) * num_labels + second  # (0, 0) is row 0, (0, a) row a


def _discounted(counts: Tensor, lower: Tensor, discount: float) -> Tensor:
    """Interpolated absolute discounting: counts (S, V) of events after each history, ``lower`` (S, V) the lower
    order's distribution for each history."""
    totals = counts.sum(1, keepdim=True)
    seen = (counts > 0).sum(1, keepdim=True).double()
    backoff = torch.where(totals > 0, discount * seen / totals.clamp(min=1), torch.ones_like(totals))
    direct = torch.where(totals > 0, (counts - discount).clamp(min=0) / totals.clamp(min=1), torch.zeros_like(counts))
    return direct + backoff * lower


def estimate_bigram(sequences: Iterable[Sequence[int]], tokens: Sequence[str], discount: float = 0.5) -> PhoneNgram:
    return estimate_ngram(sequences, tokens, 2, discount)


class _Topology:
    """The CTC topology composed with an n-gram, on a dense grid of histories: G = (K + 1)^(n - 1) cells, a history
    (x, ..., y) at the cell of those digits in base K + 1 (unused cells, such as (a, 0), stay zero). 2G states: G
    "the last frame emitted the history's last label y" (none for y = 0) and G "blank after the history".

    A label c after history (x, rest) goes to (rest, c): the move sums over x, one batched matrix product per frame
    (one plain product for a bigram, whose rest is empty).
    """

    def __init__(self, lm: PhoneNgram, dtype: torch.dtype, device: torch.device) -> None:
        k = lm.num_labels
        self.outputs = k + 1
        self.width, self.rest = k + 1, (k + 1) ** (lm.order - 2)  # the grid is (first label x, rest)
        self.cells = self.width * self.rest
        grid = torch.tensor([sum(v * self.width**i for i, v in enumerate(reversed(h))) for h in histories(lm.order, k)])
        probs = torch.zeros(self.cells, k + 1, dtype=dtype, device=device)
        probs[grid.to(device)] = lm.log_probs.to(device=device, dtype=dtype).exp()
        last = torch.arange(self.cells, device=device) % self.width  # each cell's last label
        self.has_label = (last > 0).to(dtype)
        self.label_of = last
        into = probs[:, 1:]  # (G, K): label c after each history
        own = torch.arange(1, k + 1, device=device).unsqueeze(0) == last.unsqueeze(1)  # CTC's self-loop, not a new label
        self.into = into.view(self.width, self.rest, k)
        self.from_label = (into * ~own).view(self.width, self.rest, k)
        # a bigram's moves in one matrix product: label and blank states (B, 2G) @ (2G, K)
        self.bigram_moves = torch.cat([self.from_label[:, 0], self.into[:, 0]]) if self.rest == 1 else None
        self.end = torch.cat([probs[:, 0] * self.has_label, probs[:, 0]])  # (2G,)

    def label_emissions(self, emissions: Tensor) -> Tensor:
        """emissions (..., K + 1) -> each label state's emission (..., G), zero where the last label is none."""
        return emissions[..., self.label_of] * self.has_label

    def _arriving(self, labels: Tensor, blanks: Tensor) -> Tensor:
        """(B, G) label and blank states -> what moves into each label state through the LM (B, G)."""
        batch = labels.shape[0]
        if self.bigram_moves is not None:
            return torch.nn.functional.pad(torch.cat([labels, blanks], dim=1) @ self.bigram_moves, (1, 0))
        by_first = lambda x: x.view(batch, self.width, self.rest).transpose(0, 2)  # noqa: E731 - (rest, x, B)
        moves = torch.bmm(by_first(labels).transpose(1, 2), self.from_label.transpose(0, 1))
        moves = moves + torch.bmm(by_first(blanks).transpose(1, 2), self.into.transpose(0, 1))  # (rest, B, K)
        arriving = labels.new_zeros(batch, self.rest, self.width)
        arriving[:, :, 1:] = moves.transpose(0, 1)
        return arriving.view(batch, self.cells)

    def forward_step(self, state: Tensor, label_emissions: Tensor, blank_emissions: Tensor) -> Tensor:
        """state (B, 2G) before a frame, its exp-potentials of the label states (B, G) and of blank (B, 1) -> the
        state after it."""
        labels, blanks = state[:, : self.cells], state[:, self.cells :]
        new_labels = label_emissions * (labels + self._arriving(labels, blanks))
        new_blanks = blank_emissions * (blanks + labels)
        return torch.cat([new_labels, new_blanks], dim=1)

    def backward_step(self, after: Tensor, label_emissions: Tensor, blank_emissions: Tensor) -> Tensor:
        """``after`` (B, 2G) the next frame's beta, and that frame's exp-potentials as for ``forward_step`` -> this
        frame's beta."""
        batch = after.shape[0]
        label_part = label_emissions * after[:, : self.cells]
        blank_part = blank_emissions * after[:, self.cells :]
        if self.bigram_moves is not None:
            onward = label_part[:, 1:] @ self.bigram_moves.T  # (B, 2G)
            return torch.cat([label_part + blank_part, blank_part], dim=1) + onward
        onward = label_part.view(batch, self.rest, self.width)[:, :, 1:].transpose(0, 1)  # (rest, B, K): the state reached
        from_labels = torch.bmm(onward, self.from_label.permute(1, 2, 0))  # (rest, B, x)
        from_blanks = torch.bmm(onward, self.into.permute(1, 2, 0))
        regrid = lambda x: x.permute(1, 2, 0).reshape(batch, self.cells)  # noqa: E731 - (rest, B, x) -> (B, G)
        return torch.cat([label_part + blank_part + regrid(from_labels), blank_part + regrid(from_blanks)], dim=1)


class _Denominator(torch.autograd.Function):
    @staticmethod
    def forward(ctx, potentials: Tensor, lengths: Tensor, topology: _Topology) -> Tensor:
        batch, frames, _ = potentials.shape
        shift = potentials.detach().amax(dim=2, keepdim=True)
        emissions = (potentials.detach() - shift).exp()
        label_emissions, blank_emissions = topology.label_emissions(emissions), emissions[:, :, :1]
        active = torch.arange(frames, device=potentials.device).unsqueeze(1) < lengths.unsqueeze(0)  # (T, B)
        state = potentials.new_zeros(batch, 2 * topology.cells)
        state[:, topology.cells] = 1.0  # blank after the start history (cell 0), before the first frame
        log_scale = potentials.new_zeros(batch)
        alphas = potentials.new_empty(frames, batch, 2 * topology.cells)
        for t in range(frames):
            new = topology.forward_step(state, label_emissions[:, t], blank_emissions[:, t])
            total = new.sum(1, keepdim=True)
            state = torch.where(active[t].unsqueeze(1), new / total, state)
            log_scale = log_scale + torch.where(active[t], total.squeeze(1).log(), 0.0)
            alphas[t] = state
        log_z = (state @ topology.end).log() + log_scale + (shift.squeeze(2) * active.T).sum(1)
        ctx.topology = topology
        ctx.save_for_backward(label_emissions, blank_emissions, lengths, alphas)
        return log_z

    @staticmethod
    def backward(ctx, grad_log_z: Tensor):
        label_emissions, blank_emissions, lengths, alphas = ctx.saved_tensors
        topology = ctx.topology
        frames, batch, _ = alphas.shape
        s = topology.cells
        last = (lengths - 1).unsqueeze(1)
        beta = topology.end.expand(batch, 2 * s).clone()
        grad = blank_emissions.new_zeros(batch, frames, topology.outputs)
        for t in range(frames - 1, -1, -1):
            if t < frames - 1:
                new = topology.backward_step(beta, label_emissions[:, t + 1], blank_emissions[:, t + 1])
                beta = torch.where(t < last, new / new.sum(1, keepdim=True), beta)
            occupancy = alphas[t] * beta
            occupancy = torch.where(t <= last, occupancy / occupancy.sum(1, keepdim=True), 0.0)
            grad[:, t].index_add_(1, topology.label_of, occupancy[:, :s])
            grad[:, t, 0] = occupancy[:, s:].sum(1)
        return grad * grad_log_z.view(-1, 1, 1), None, None


def denominator_log_z(potentials: Tensor, lengths: Tensor, lm: PhoneNgram) -> Tensor:
    """log of the sum over all CTC paths of exp(frame potentials + phone LM score of the labels): (B,).

    potentials (batch, frames, K + 1) with blank at 0; lengths (batch,) valid frames, each >= 1.
    """
    if potentials.shape[2] != lm.num_labels + 1:
        raise ValueError(f"potentials have {potentials.shape[2]} outputs; the phone LM is for {lm.num_labels + 1}")
    topology = _Topology(lm, potentials.dtype, potentials.device)
    return _Denominator.apply(potentials, lengths.to(potentials.device), topology)


class CTCCRFLoss(torch.nn.Module):
    """Summed negative log-likelihood of a batch under the CTC-CRF, plus ``ctc_weight`` x the plain CTC loss.

    forward(log_probs (T, B, K + 1), targets (sum U,), input_lengths (B,), target_lengths (B,)) -> (summed loss,
    per-utterance CRF loss (B,)). An utterance whose targets CTC cannot align in its frames (speed perturbation can
    shorten one too much) adds nothing and gets an infinite per-utterance loss, as ``zero_infinity`` does for CTC.
    """

    def __init__(self, lm: PhoneNgram, ctc_weight: float = 0.01) -> None:
        super().__init__()
        if ctc_weight < 0:
            raise ValueError("ctc_weight must be >= 0")
        self.lm, self.ctc_weight = lm, ctc_weight

    def forward(self, log_probs: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor) -> tuple[Tensor, Tensor]:
        ctc = torch.nn.functional.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=0, reduction="none", zero_infinity=True)
        feasible = alignable(targets, input_lengths, target_lengths).to(ctc.device)
        numerator = -ctc + self.lm.batch_log_probs(targets, target_lengths).to(ctc)
        denominator = denominator_log_z(log_probs.transpose(0, 1), input_lengths, self.lm)
        crf = torch.where(feasible, denominator - numerator, 0.0)  # no gradient for the others
        total = crf.sum()
        if self.ctc_weight:
            total = total + self.ctc_weight * ctc.sum()
        return total, torch.where(feasible, crf.detach(), math.inf)


def alignable(targets: Tensor, input_lengths: Tensor, target_lengths: Tensor) -> Tensor:
    """Whether CTC can align each utterance's targets in its frames (a blank between repeated labels): (B,) bool."""
    flat, lengths = targets.long().cpu(), target_lengths.long().cpu()
    owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    repeated = torch.zeros(len(flat), dtype=torch.long)
    repeated[1:] = ((flat[1:] == flat[:-1]) & (owner[1:] == owner[:-1])).long()
    repeats = torch.zeros(len(lengths), dtype=torch.long).index_add_(0, owner, repeated)
    return input_lengths.long().cpu() >= lengths + repeats


def training_phone_sequences(manifests: Sequence[str], tokens: Sequence[str]) -> tuple[list[list[int]], int]:
    """Label-id sequences of the manifests' transcripts (CMUdict, espeak-ng for the rest), and how many utterances
    were left out because a word has no pronunciation."""
    from asr.phones import Pronouncer, PronunciationError
    from asr.text import Vocabulary

    from .manifest import read_manifest

    pronouncer, vocabulary = Pronouncer(), Vocabulary(tuple(tokens))
    texts = [utt.text for manifest in manifests for utt in read_manifest(manifest)]
    unknown = sorted({w for text in texts for w in text.split() if not pronouncer.in_dictionary(w)})
    if unknown and pronouncer.has_fallback:  # one espeak-ng call for all of them
        try:
            pronouncer.guess(unknown)
        except PronunciationError:
            pass  # each utterance is tried on its own below
    sequences, left_out = [], 0
    for text in texts:
        try:
            sequences.append(vocabulary.encode(pronouncer.phones_of_text(text)))
        except PronunciationError:
            left_out += 1
    return sequences, left_out


def perplexity(lm: PhoneNgram, sequences: Iterable[Sequence[int]]) -> float:
    """Per-event perplexity (labels and sentence ends) of ``lm`` on label sequences."""
    total, events = 0.0, 0
    for labels in sequences:
        total += lm.sequence_log_prob(labels)
        events += len(labels) + 1
    return math.exp(-total / max(1, events))
