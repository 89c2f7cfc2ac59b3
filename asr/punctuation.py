"""Capitals and punctuation for recognised words: a small bidirectional LSTM over the word sequence.

A recogniser writes lower-case words without punctuation. ``Punctuator`` predicts, for each word, its case (lower,
Capitalised or ALL CAPS) and the mark that follows it (none , . ? !), and applies them without adding, dropping or
changing a word. The network sees each word through a vocabulary embedding plus the mean of its hashed character
n-grams (as fastText does), so a word it never saw still gets a representation from its spelling.

>>> from asr.punctuation import punctuate
>>> punctuate("hello there how are you")
'Hello there, how are you?'
"""

from __future__ import annotations

import functools
import os
import re
import threading
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .checkpoint import load_half_precision, save_half_precision

if TYPE_CHECKING:
    from .decoding import Transcript

FORMAT = "asr-punctuator/1"
BUNDLED_PUNCTUATOR = Path(__file__).parent / "models" / "en-punctuator.pt"

CASES = ("lower", "capitalised", "upper")
LOWER, CAPITALISED, UPPER = range(len(CASES))
MARKS = ("", ",", ".", "?", "!")
NO_MARK, COMMA, FULL_STOP, QUESTION, EXCLAMATION = range(len(MARKS))
SENTENCE_ENDS = (FULL_STOP, QUESTION, EXCLAMATION)

WINDOW_WORDS = 192  # words the network reads at once; longer paragraphs are read in overlapping windows
CONTEXT_WORDS = 32  # words of context kept on each side of a window's predictions
WINDOWS_PER_BATCH = 64
ALWAYS_CAPITALISED = frozenset({"i", "i'm", "i'd", "i'll", "i've"})
_HAS_MARK = re.compile(r"[.,?!;:]")
_TAG = re.compile(r"^\[[^\]]*\]$")
_EDGES = re.compile(r"^[^\w']+|[^\w']+$")


class PunctuatorError(ValueError):
    """Raised for a file that is not a punctuation model."""


@dataclass(frozen=True)
class PunctuatorConfig:
    """The network's shape: vocabulary and n-gram tables, embedding widths, LSTM size."""

    vocabulary_size: int = 20_000  # word embeddings; id 0 is every other word
    ngram_buckets: int = 32_768  # hashed character n-grams of "<word>"
    min_n: int = 3
    max_n: int = 5
    max_ngrams: int = 24  # per word; a long word keeps the n-grams nearest its edges
    word_dim: int = 64
    ngram_dim: int = 64
    hidden: int = 128  # per direction
    layers: int = 2
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.vocabulary_size < 1 or self.ngram_buckets < 1 or not 1 <= self.min_n <= self.max_n or self.max_ngrams < 1:
            raise ValueError("vocabulary_size and ngram_buckets >= 1, 1 <= min_n <= max_n and max_ngrams >= 1 are needed")
        if min(self.word_dim, self.ngram_dim, self.hidden, self.layers) < 1 or not 0 <= self.dropout < 1:
            raise ValueError("positive widths and layers and a dropout in [0, 1) are needed")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PunctuatorConfig:
        return cls(**data)


def word_ngrams(word: str, config: PunctuatorConfig) -> list[int]:
    """Bucket ids of the character n-grams of ``<word>``, at most ``config.max_ngrams`` (those nearest the edges)."""
    marked = f"<{word}>"
    grams = [
        (min(i, len(marked) - n - i), marked[i : i + n]) for n in range(config.min_n, config.max_n + 1) for i in range(len(marked) - n + 1)
    ]
    grams.sort(key=lambda item: item[0])
    return [zlib.crc32(gram.encode("utf-8")) % config.ngram_buckets for _, gram in grams[: config.max_ngrams]]


class PunctuationModel(nn.Module):
    """Words -> per-word case and following-mark logits, through a bidirectional LSTM."""

    def __init__(self, config: PunctuatorConfig) -> None:
        super().__init__()
        self.config = config
        self.words = nn.Embedding(config.vocabulary_size, config.word_dim)
        self.ngrams = nn.EmbeddingBag(config.ngram_buckets + 1, config.ngram_dim, mode="mean", padding_idx=config.ngram_buckets)
        dropout = config.dropout if config.layers > 1 else 0.0
        self.lstm = nn.LSTM(
            config.word_dim + config.ngram_dim, config.hidden, config.layers, batch_first=True, bidirectional=True, dropout=dropout
        )
        self.case_head = nn.Linear(2 * config.hidden, len(CASES))
        self.mark_head = nn.Linear(2 * config.hidden, len(MARKS))

    def forward(
        self, word_ids: torch.Tensor, ngram_ids: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """word_ids (batch, time), ngram_ids (batch, time, max_ngrams), lengths (batch,) in decreasing order or None.

        Returns case logits (batch, time, 3) and mark logits (batch, time, 5).
        """
        batch, time = word_ids.shape
        spelled = self.ngrams(ngram_ids.reshape(batch * time, -1)).view(batch, time, -1)
        inputs = torch.cat([self.words(word_ids), spelled], dim=-1)
        if lengths is None:
            hidden, _ = self.lstm(inputs)
        else:
            packed = nn.utils.rnn.pack_padded_sequence(inputs, lengths, batch_first=True)
            hidden, _ = nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=time)
        return self.case_head(hidden), self.mark_head(hidden)


class WordFeatures:
    """Word strings -> vocabulary ids and n-gram bucket ids, with a cache of the words seen (rows of growing arrays)."""

    def __init__(self, vocabulary: list[str], config: PunctuatorConfig, cache_words: int = 200_000) -> None:
        self.config = config
        self.index = {word: i for i, word in enumerate(vocabulary)}
        self.cache_words = cache_words
        self._lock = threading.Lock()
        self._clear()

    def _clear(self) -> None:
        self._rows: dict[str, int] = {}
        self._table = np.zeros((1024, self.config.max_ngrams + 1), dtype=np.int64)  # [word id, n-gram ids...] per row

    def row(self, word: str) -> list[int]:
        """[vocabulary id, n-gram ids..., padding...]: ``config.max_ngrams + 1`` ints."""
        ngrams = word_ngrams(word, self.config)
        padding = [self.config.ngram_buckets] * (self.config.max_ngrams - len(ngrams))
        return [self.index.get(word, 0), *ngrams, *padding]

    def encode(self, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Word ids (time,) and n-gram ids (time, max_ngrams), int64. Safe to call from several threads."""
        with self._lock:  # one Punctuator serves every thread (transcribe --jobs, the server's worker)
            if len(self._rows) + len(words) > self.cache_words:
                self._clear()
            rows = [self._rows[word] if word in self._rows else self._add(word) for word in words]
            features = self._table[np.asarray(rows, dtype=np.int64)]
        return features[:, 0], features[:, 1:]

    def _add(self, word: str) -> int:
        row = self._rows[word] = len(self._rows)
        if row == len(self._table):
            self._table = np.concatenate([self._table, np.zeros_like(self._table)])
        self._table[row] = self.row(word)
        return row


def windows(length: int) -> list[tuple[int, int, int, int]]:
    """(start, end, keep_start, keep_end) of the windows that read ``length`` words; every word is kept exactly once."""
    if length <= WINDOW_WORDS:
        return [(0, length, 0, length)]
    spans, keep = [], 0
    while keep < length:
        start = max(0, keep - CONTEXT_WORDS)
        end = min(length, start + WINDOW_WORDS)
        keep_end = end if end == length else end - CONTEXT_WORDS
        spans.append((start, end, keep, keep_end))
        keep = keep_end
    return spans


def word_key(token: str) -> str:
    """What the network reads for a token: lower case, curly apostrophes straightened, edge punctuation dropped."""
    return _EDGES.sub("", token.lower().replace("\u2019", "'"))


class Punctuator:
    """A trained ``PunctuationModel`` with its vocabulary, the mixed-case forms of names, and how it was made."""

    def __init__(self, model: PunctuationModel, vocabulary: list[str], mixed_case: dict[str, str] | None = None, info: dict | None = None):
        self.model = model.eval()
        self.vocabulary = vocabulary
        self.mixed_case = dict(mixed_case or {})
        self.info = dict(info or {})
        self.features = WordFeatures(vocabulary, model.config)

    def predict(self, paragraphs: list[list[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per paragraph of word keys: case ids (words,) and mark probabilities (words, 5). Empty paragraphs give empty arrays."""
        results = [(np.zeros(len(words), dtype=np.int64), np.zeros((len(words), len(MARKS)), dtype=np.float32)) for words in paragraphs]
        jobs = [(p, span) for p, words in enumerate(paragraphs) if words for span in windows(len(words))]
        jobs.sort(key=lambda job: job[1][1] - job[1][0], reverse=True)
        with torch.inference_mode():
            for first in range(0, len(jobs), WINDOWS_PER_BATCH):
                self._predict_batch(paragraphs, jobs[first : first + WINDOWS_PER_BATCH], results)
        return results

    def _predict_batch(self, paragraphs: list[list[str]], jobs: list, results: list[tuple[np.ndarray, np.ndarray]]) -> None:
        lengths = [end - start for _, (start, end, _, _) in jobs]
        word_ids = np.zeros((len(jobs), lengths[0]), dtype=np.int64)
        ngram_ids = np.full((len(jobs), lengths[0], self.model.config.max_ngrams), self.model.config.ngram_buckets, dtype=np.int64)
        for row, (p, (start, end, _, _)) in enumerate(jobs):
            word_ids[row, : end - start], ngram_ids[row, : end - start] = self.features.encode(paragraphs[p][start:end])
        packed_lengths = torch.tensor(lengths) if lengths[-1] != lengths[0] else None
        case_logits, mark_logits = self.model(torch.from_numpy(word_ids), torch.from_numpy(ngram_ids), packed_lengths)
        cases, marks = case_logits.argmax(-1).numpy(), mark_logits.softmax(-1).numpy()
        for row, (p, (start, _, keep_start, keep_end)) in enumerate(jobs):
            kept = slice(keep_start - start, keep_end - start)
            results[p][0][keep_start:keep_end] = cases[row, kept]
            results[p][1][keep_start:keep_end] = marks[row, kept]

    def format_words(self, tokens: list[str], complete: bool = True) -> list[str]:
        """The tokens of one paragraph, cased and punctuated; ``complete``: the paragraph ends a sentence."""
        return self.format_paragraphs([tokens], complete)[0]

    def format_paragraphs(self, paragraphs: list[list[str]], complete: bool = True) -> list[list[str]]:
        """``format_words`` for many paragraphs at once (batched through the network)."""
        predictions = self.predict([[word_key(t) for t in tokens] for tokens in paragraphs])
        return [self._apply(tokens, cases, marks, complete) for tokens, (cases, marks) in zip(paragraphs, predictions)]

    def _apply(self, tokens: list[str], cases: np.ndarray, mark_probabilities: np.ndarray, complete: bool) -> list[str]:
        """Tokens cased and punctuated. A paragraph that already has marks gets none added; one that already has
        capitals keeps its case: formatting formatted text changes nothing."""
        marks = mark_probabilities.argmax(-1)
        if complete and len(tokens) and marks[-1] not in SENTENCE_ENDS:
            marks[-1] = SENTENCE_ENDS[int(mark_probabilities[-1, list(SENTENCE_ENDS)].argmax())]
        add_marks = not any(_HAS_MARK.search(token) for token in tokens)
        add_case = all(token == token.lower() for token in tokens)
        formatted = []
        for i, token in enumerate(tokens):
            if _TAG.match(token):  # [unk] and the like are not words
                formatted.append(token)
                continue
            case = int(cases[i])
            if i == 0 or marks[i - 1] in SENTENCE_ENDS or word_key(token) in ALWAYS_CAPITALISED:
                case = max(case, CAPITALISED)
            formatted.append((self._cased(token, case) if add_case else token) + (MARKS[marks[i]] if add_marks else ""))
        return formatted

    def _cased(self, token: str, case: int) -> str:
        if case == LOWER:
            return token
        if case == UPPER:
            return token.upper()
        if token in self.mixed_case:
            return self.mixed_case[token]
        letter = next((i for i, ch in enumerate(token) if ch.isalpha()), None)
        return token if letter is None else token[:letter] + token[letter].upper() + token[letter + 1 :]

    def punctuate_transcript(self, transcript: Transcript) -> Transcript:
        """Fill in ``transcript``'s formatted words (and its segments' formatted texts), read as one paragraph."""
        formatted = self.format_words([w.text for w in transcript.words]) if transcript.words else []
        transcript.formatted_words = formatted
        first = 0
        for segment in transcript.segments:
            segment.formatted_text = " ".join(formatted[first : first + len(segment.words)])
            first += len(segment.words)
        return transcript

    def punctuate_lines(self, lines: list[str]) -> list[str]:
        """Each line a paragraph: the same words, cased and punctuated, single-spaced. Blank lines stay empty."""
        formatted = self.format_paragraphs([line.split() for line in lines])
        return [" ".join(tokens) for tokens in formatted]

    def punctuate(self, text: str) -> str:
        """One paragraph of text, cased and punctuated."""
        return self.punctuate_lines([text])[0]

    def save(self, path: str | os.PathLike) -> None:
        """One file: config, vocabulary, mixed-case forms, float16 weights and ``info``; written beside ``path`` and moved in."""
        fields = {"config": self.model.config.to_dict(), "vocabulary": self.vocabulary, "mixed_case": self.mixed_case, "info": self.info}
        save_half_precision(path, FORMAT, self.model, fields)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Punctuator:
        """Raises ``PunctuatorError`` for a missing file, another kind of file, or a broken one."""
        build = lambda data: PunctuationModel(PunctuatorConfig.from_dict(data["config"]))  # noqa: E731
        model, data = load_half_precision(path, FORMAT, "a punctuation model", PunctuatorError, build)
        return cls(model, list(data["vocabulary"]), dict(data.get("mixed_case", {})), dict(data.get("info", {})))

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


@functools.lru_cache(maxsize=4)
def load_punctuator(path: str | os.PathLike | None = None) -> Punctuator:
    """The punctuation model at ``path`` (the bundled one by default), loaded once per process."""
    return Punctuator.load(path or BUNDLED_PUNCTUATOR)


def punctuate(text: str, model: str | os.PathLike | None = None) -> str:
    """``text`` with capitals and punctuation restored, one paragraph per line; the words themselves never change."""
    return "\n".join(load_punctuator(model).punctuate_lines(text.split("\n")))
