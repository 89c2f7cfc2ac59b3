"""A word-level LSTM language model that rescores the beam search's final hypotheses.

The model reads words and predicts the next one: tied adaptive input embeddings and an adaptive softmax (Grave et
al. 2017, Baevski & Auli 2019) over a large vocabulary, so that rare words cost few parameters and little compute,
around one LSTM layer. Words outside its vocabulary share the ``<unk>`` class. ``</s>`` both starts and ends a sentence.

One file holds everything (``save``/``load``): config, words, weights (float16) and how it was trained.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from .checkpoint import load_half_precision, save_half_precision

SENTENCE_END, UNKNOWN = "</s>", "<unk>"  # ids 0 and 1
FORMAT = "asr-lstm-lm/1"


class NeuralLMError(ValueError):
    """Raised for a missing or unreadable LSTM language-model file."""


@dataclass(frozen=True)
class NeuralLMConfig:
    vocab_size: int  # words including </s> and <unk>, most frequent first
    embed_dim: int = 256
    hidden_size: int = 512
    layers: int = 1
    cutoffs: tuple[int, ...] = (2000, 10000)  # word ids where the adaptive softmax's clusters start
    div_value: float = 4.0  # each cluster's embeddings are this many times narrower than the previous one's
    dropout: float = 0.0

    def __post_init__(self) -> None:
        cutoffs = tuple(c for c in self.cutoffs if c < self.vocab_size)
        object.__setattr__(self, "cutoffs", cutoffs or (max(2, self.vocab_size // 2),))  # torch's softmax needs a cluster
        if self.vocab_size < 4 or self.embed_dim < 1 or self.hidden_size < 1 or self.layers < 1:
            raise ValueError("vocab_size must be at least 4, and the sizes positive")
        if list(self.cutoffs) != sorted(set(self.cutoffs)) or (self.cutoffs and self.cutoffs[0] < 2):
            raise ValueError("cutoffs must increase and start at 2 or more")
        if not 0 <= self.dropout < 1 or self.div_value < 1:
            raise ValueError("dropout must be in [0, 1) and div_value at least 1")
        if int(self.embed_dim // self.div_value ** len(self.cutoffs)) < 1:
            raise ValueError(f"embed_dim {self.embed_dim} is too small for {len(self.cutoffs)} clusters narrowed by {self.div_value}")

    def to_dict(self) -> dict:
        return {**asdict(self), "cutoffs": list(self.cutoffs)}

    @classmethod
    def from_dict(cls, data: dict) -> NeuralLMConfig:
        return cls(**{**data, "cutoffs": tuple(data["cutoffs"])})


class LstmLanguageModel(nn.Module):
    """tokens (batch, time) -> log P(next token) via ``forward`` (hidden states) and ``target_log_probs``.

    The input embedding of a word is its output embedding in the adaptive softmax (the head's row, or its cluster's
    narrow vector times the cluster's projection): the two are tied, which halves the parameters.
    """

    def __init__(self, config: NeuralLMConfig) -> None:
        super().__init__()
        self.config = config
        self.lstm = nn.LSTM(config.embed_dim, config.hidden_size, config.layers, batch_first=True, proj_size=0)
        self.project = nn.Linear(config.hidden_size, config.embed_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.softmax = nn.AdaptiveLogSoftmaxWithLoss(
            config.embed_dim, config.vocab_size, list(config.cutoffs), div_value=config.div_value, head_bias=True
        )
        self.bounds = [0, *config.cutoffs, config.vocab_size]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, time) -> embeddings (batch, time, embed_dim), from the adaptive softmax's weights."""
        out = torch.zeros(*tokens.shape, self.config.embed_dim, dtype=self.softmax.head.weight.dtype, device=tokens.device)
        for cluster, (low, high) in enumerate(zip(self.bounds, self.bounds[1:])):
            mask = (tokens >= low) & (tokens < high)
            if not mask.any():
                continue
            ids = tokens[mask] - low
            if cluster == 0:
                out[mask] = self.softmax.head.weight[ids]
            else:
                narrow, wide = self.softmax.tail[cluster - 1][1].weight, self.softmax.tail[cluster - 1][0].weight
                out[mask] = narrow[ids] @ wide
        return out

    def forward(self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        """tokens (batch, time) -> (outputs (batch, time, embed_dim), LSTM state)."""
        hidden, state = self.lstm(self.dropout(self.embed(tokens)), state)
        return self.dropout(self.project(hidden)), state

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood (nats) of targets (batch, time) given outputs (batch, time, embed_dim)."""
        return self.softmax(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1)).loss

    def target_log_probs(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log P(target) (n,) for outputs (n, embed_dim) and targets (n,)."""
        return self.softmax(outputs, targets).output


@dataclass
class NeuralLM:
    """An LSTM language model with its words: scores whole sentences (``score``); inference only, thread-safe."""

    model: LstmLanguageModel
    words: list[str]
    info: dict = field(default_factory=dict)  # how it was trained: data, tokens, time, perplexity

    def __post_init__(self) -> None:
        if self.words[:2] != [SENTENCE_END, UNKNOWN] or len(self.words) != self.model.config.vocab_size:
            raise NeuralLMError("an LSTM LM's words must start with </s> and <unk> and match its vocab_size")
        self.ids = {word: i for i, word in enumerate(self.words)}
        self.model.eval()

    def encode(self, sentence: str) -> list[int]:
        """Word ids of a normalised sentence (unknown words -> <unk>), without the sentence end."""
        return [self.ids.get(word, 1) for word in sentence.split()]

    @torch.inference_mode()
    def score(self, sentences: list[str]) -> list[float]:
        """Natural-log probability of each normalised sentence, its end included (``</s>`` precedes its first word).

        The sentences' word sequences form a prefix tree, and the LSTM runs once per node, depth by depth: N-best texts
        share most of their words, so this costs a few sentences' worth, not one per text.
        """
        if not sentences:
            return []
        tree = _PrefixTree([self.encode(s) for s in sentences])
        outputs = self._node_outputs(tree)  # (nodes, embed_dim): what follows each prefix
        parents = torch.tensor(tree.parents[1:] + tree.ends, dtype=torch.long)
        targets = torch.tensor(tree.words[1:] + [0] * len(tree.ends), dtype=torch.long)
        log_probs = self.model.target_log_probs(outputs[parents], targets).double()
        node_log_probs = torch.cat([torch.zeros(1, dtype=torch.float64), log_probs[: len(tree.words) - 1]])
        return [float(node_log_probs[path].sum() + log_probs[len(tree.words) - 1 + i]) for i, path in enumerate(tree.paths)]

    def _node_outputs(self, tree: _PrefixTree) -> torch.Tensor:
        """The model's output after each node's prefix: (nodes, embed_dim); the root reads ``</s>``.

        One LSTM step per depth for all nodes of that depth, from their parents' states. The first layer's input
        transform is done for all nodes at once, so each step reads only the recurrent weights (the cost of a step is
        reading the weights, whatever the batch).
        """
        lstm = self.model.lstm
        layer_inputs = self.model.embed(torch.tensor(tree.words, dtype=torch.long))  # (nodes, embed_dim)
        size = (len(tree.words), lstm.hidden_size)
        for layer in range(lstm.num_layers):
            w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}")
            bias = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
            input_gates = torch.addmm(bias, layer_inputs, w_ih.t())  # (nodes, 4 * hidden)
            hidden, cell = torch.zeros(size), torch.zeros(size)
            for depth, nodes in enumerate(tree.levels):
                index = torch.tensor(nodes, dtype=torch.long)
                gates = input_gates[index]
                if depth:
                    parents = torch.tensor([tree.parents[n] for n in nodes], dtype=torch.long)
                    gates = gates + hidden[parents] @ w_hh.t()
                    previous = cell[parents]
                else:
                    previous = torch.zeros(len(nodes), lstm.hidden_size)
                i, f, g, o = gates.chunk(4, dim=1)  # torch's gate order
                cell[index] = torch.sigmoid(f) * previous + torch.sigmoid(i) * torch.tanh(g)
                hidden[index] = torch.sigmoid(o) * torch.tanh(cell[index])
            layer_inputs = hidden
        return self.model.project(layer_inputs)

    def save(self, path: str | os.PathLike) -> None:
        """One file: config, words, float16 weights and ``info``; written beside ``path`` and moved into place."""
        save_half_precision(path, FORMAT, self.model, {"config": self.model.config.to_dict(), "words": self.words, "info": self.info})

    @classmethod
    def load(cls, path: str | os.PathLike) -> NeuralLM:
        """Raises ``NeuralLMError`` for a missing file, another kind of file, or a broken one."""
        build = lambda data: LstmLanguageModel(NeuralLMConfig.from_dict(data["config"]))  # noqa: E731
        model, data = load_half_precision(path, FORMAT, "an LSTM language model", NeuralLMError, build)
        return cls(model, list(data["words"]), dict(data.get("info", {})))

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def perplexity(lm: NeuralLM, sentences: list[str], batch: int = 64) -> float:
    """Per-word perplexity (sentence ends counted as words) of normalised sentences."""
    total, words = 0.0, 0
    for start in range(0, len(sentences), batch):
        chunk = sentences[start : start + batch]
        total += sum(lm.score(chunk))
        words += sum(len(s.split()) + 1 for s in chunk)
    return math.exp(-total / max(words, 1))


class _PrefixTree:
    """Word-id sequences as a prefix tree: node 0 is the root (word ``</s>``, the sentence start); ``paths`` lists each
    sequence's nodes after the root, ``ends`` its last node, and ``levels`` the nodes of each depth."""

    def __init__(self, sequences: list[list[int]]) -> None:
        self.words, self.parents, self.levels = [0], [0], [[0]]
        children: dict[tuple[int, int], int] = {}
        self.paths: list[list[int]] = []
        for sequence in sequences:
            node, path = 0, []
            for depth, word in enumerate(sequence, 1):
                child = children.get((node, word))
                if child is None:
                    child = children[(node, word)] = len(self.words)
                    self.words.append(word)
                    self.parents.append(node)
                    if len(self.levels) <= depth:
                        self.levels.append([])
                    self.levels[depth].append(child)
                node = child
                path.append(node)
            self.paths.append(path)
        self.ends = [path[-1] if path else 0 for path in self.paths]
