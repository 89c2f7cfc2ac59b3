"""Training the punctuation and casing model (``asr.punctuation``) on cased, punctuated text, on the CPU, resumably.

``prepare_punctuation_corpus`` turns the text once into a work folder: every word normalised as a recogniser writes
it, with its case and the mark that follows it as labels. Whole books of the Project Gutenberg files are held out
(none is in both parts). ``train_punctuator`` trains for a wall-clock budget, checkpoints every few minutes (a run
started again resumes), and returns the model; ``punctuation_scores`` measures it on held-out books.
"""

from __future__ import annotations

import array
import collections
import functools
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from asr.punctuation import (
    CAPITALISED,
    COMMA,
    EXCLAMATION,
    FULL_STOP,
    LOWER,
    MARKS,
    NO_MARK,
    QUESTION,
    UPPER,
    PunctuationModel,
    Punctuator,
    PunctuatorConfig,
    word_ngrams,
)
from asr.text import normalize_text

from .lm import LanguageModelBuildError, read_lines, source_name
from .nnlm import time_budget_learning_rate

META_FILE, TYPES_FILE, MIXED_CASE_FILE, CHECKPOINT_FILE = "corpus.json", "types.txt", "mixed-case.json", "checkpoint.pt"
HELD_OUT_EVERY = 25  # one book in this many is held out
BOOK_START = re.compile(  # the producer's credit that opens a Project Gutenberg book
    r"^(Produced by|This etext|This e-text|E-text prepared|Etext prepared|Transcribed from|Transcribed by|Prepared by"
    r"|This eBook|Produced from)"
)
_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")
SPOKEN_ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "dr": "doctor"}  # "Mr." is read "mister", and its dot ends nothing
MIN_MIXED_CASE_COUNT = 5


class PunctuationCorpusError(LanguageModelBuildError):
    """Raised for text the punctuation model cannot be trained on."""


def gap_mark(gap: str) -> int:
    """The mark that the characters between two words stand for: ? ! . then , ; : and dashes as commas."""
    if "?" in gap:
        return QUESTION
    if "!" in gap:
        return EXCLAMATION
    if "." in gap:
        return FULL_STOP
    if any(ch in gap for ch in ",;:\u2014\u2013") or "--" in gap:
        return COMMA
    return NO_MARK


def word_case(core: str) -> int:
    letters = [ch for ch in core if ch.isalpha()]
    if not letters:
        return LOWER
    if len(letters) > 1 and all(ch.isupper() for ch in letters):
        return UPPER
    return CAPITALISED if letters[0].isupper() else LOWER


@functools.lru_cache(maxsize=500_000)
def _spoken_words(lower: str) -> tuple[str, ...]:
    return tuple(normalize_text(lower).split())


class Labeller:
    """Cased, punctuated text (fed a line at a time) -> normalised words with their case and following mark."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.labels: list[tuple[int, int]] = []  # (case, mark)
        self.mixed_case: collections.Counter[tuple[str, str]] = collections.Counter()
        self.capitalised: collections.Counter[str] = collections.Counter()
        self._gap = ""

    def feed(self, line: str) -> None:
        position = 0
        for match in _WORD.finditer(line):
            gap, core, position = self._gap + line[position : match.start()], match.group(), match.end()
            lower = core.lower().replace("\u2019", "'")
            if lower in SPOKEN_ABBREVIATIONS and line.startswith(".", position):
                words, position = (SPOKEN_ABBREVIATIONS[lower],), position + 1
            else:
                words = _spoken_words(lower)
            if not words:  # no letters a recogniser writes (a word in another script)
                self._gap = gap + " "
                continue
            self._gap = ""
            if self.labels:
                self.labels[-1] = (self.labels[-1][0], gap_mark(gap))
            self._add(core, words)
        self._gap += line[position:] + " "

    def _add(self, core: str, words: tuple[str, ...]) -> None:
        case = word_case(core)
        if case == CAPITALISED and len(words) == 1:
            self.capitalised[words[0]] += 1
            form = core.replace("\u2019", "'")
            if form[1:] != form[1:].lower() and form.lower() == words[0]:
                self.mixed_case[(words[0], form)] += 1
        self.words.extend(words)
        self.labels.extend([(case, NO_MARK)] + [(LOWER, NO_MARK)] * (len(words) - 1))

    def finish(self) -> None:
        """The end of a document: the text after its last word gives that word's mark."""
        if self.labels and self._gap:
            self.labels[-1] = (self.labels[-1][0], gap_mark(self._gap))
        self._gap = ""

    def mixed_case_forms(self) -> dict[str, str]:
        """Names written with inner capitals (McDonald, O'Brien) where that is their usual capitalised form."""
        best: dict[str, tuple[int, str]] = {}
        for (word, form), count in self.mixed_case.items():
            if count > best.get(word, (0, ""))[0]:
                best[word] = (count, form)
        return {
            word: form
            for word, (count, form) in sorted(best.items())
            if count >= MIN_MIXED_CASE_COUNT and count * 2 >= self.capitalised[word]
        }


def documents(path: str | os.PathLike) -> Iterator[tuple[list[str], bool]]:
    """A text file's documents (lines, whether it is a book): a Project Gutenberg collection (gutenberg_*) splits into
    books where a producer's credit opens one; any other file is one document, not a book."""
    lines: list[str] = []
    collection = Path(path).name.startswith("gutenberg_")
    for line in read_lines(path):
        if collection and lines and BOOK_START.match(line):
            yield lines, BOOK_START.match(lines[0]) is not None
            lines = []
        lines.append(line)
    if lines:
        yield lines, collection and BOOK_START.match(lines[0]) is not None


@dataclass
class _Part:
    """Word type ids and labels (case * 8 + mark) of one part of the corpus."""

    words: array.array
    labels: array.array

    @classmethod
    def empty(cls) -> _Part:
        return cls(array.array("i"), array.array("B"))


def prepare_punctuation_corpus(sources: list[str], work: Path) -> dict:
    """Label ``sources`` into ``work`` once (a work folder made from other sources is an error); returns its description.

    Every ``HELD_OUT_EVERY``-th book of the Gutenberg collections goes to the held-out part, whole, together with
    every copy of it (collections repeat books under other names); text shared with any other document keeps a book
    in training.
    """
    meta_path = work / META_FILE
    names = [source_name(s) for s in sources]
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta["sources"] != names:
            raise PunctuationCorpusError(f"{work} holds a corpus of other texts ({', '.join(meta['sources'])}); use another --work")
        return meta
    docs = [(source, lines, book) for source in sources for lines, book in documents(source)]
    held_out_docs = _held_out_documents([lines for _, lines, _ in docs], [book for _, _, book in docs])
    types: dict[str, int] = {}
    parts = {"train": _Part.empty(), "held-out": _Part.empty()}
    train_labeller, held_out_books = Labeller(), []
    for index, (source, lines, _) in enumerate(docs):
        held_out = index in held_out_docs
        labeller = Labeller() if held_out else train_labeller
        for line in lines:
            labeller.feed(line)
        labeller.finish()
        part = parts["held-out" if held_out else "train"]
        part.words.extend(types.setdefault(w, len(types)) for w in labeller.words)
        part.labels.extend(case * 8 + mark for case, mark in labeller.labels)
        if held_out:
            held_out_books.append({"source": source_name(source), "opening": lines[0][:160], "words": len(labeller.words)})
        labeller.words, labeller.labels = [], []
    if not parts["train"].words or not parts["held-out"].words:
        raise PunctuationCorpusError(
            "the text has no words to train on, or no whole book to hold out (the Gutenberg collections hold the books)"
        )
    _write_corpus(work, types, parts, train_labeller.mixed_case_forms())
    meta = {"sources": names, "types": len(types), "train_words": len(parts["train"].words), "held_out_words": len(parts["held-out"].words)}
    meta |= {"books": sum(book for _, _, book in docs), "held_out_books": held_out_books}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


SHARED_LINE_WORDS = 8  # lines at least this long identify a text
SHARED_LINES = 10  # documents sharing this many such lines hold the same text (copies, volumes of one edition)


def _held_out_documents(documents: list[list[str]], is_book: list[bool]) -> set[int]:
    """Indices of the held-out documents: every ``HELD_OUT_EVERY``-th group of books that share text only with each other."""
    group = list(range(len(documents)))

    def root(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    owner: dict[int, int] = {}
    shared: collections.Counter[tuple[int, int]] = collections.Counter()
    for index, lines in enumerate(documents):
        for line in lines:
            if line.count(" ") + 1 >= SHARED_LINE_WORDS:
                first = owner.setdefault(hash(line), index)
                if first != index:
                    shared[(first, index)] += 1
    for (a, b), count in shared.items():
        if count >= SHARED_LINES:
            group[root(b)] = root(a)
    members: dict[int, list[int]] = {}
    for index in range(len(documents)):
        members.setdefault(root(index), []).append(index)
    candidates = [m for m in members.values() if all(is_book[i] for i in m)]
    candidates.sort(key=lambda m: m[0])
    return {i for k, m in enumerate(candidates) if k % HELD_OUT_EVERY == HELD_OUT_EVERY // 2 for i in m}


def _write_corpus(work: Path, types: dict[str, int], parts: dict[str, _Part], mixed_case: dict[str, str]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    counts = np.bincount(np.frombuffer(parts["train"].words, dtype=np.int32), minlength=len(types))
    (work / TYPES_FILE).write_text("".join(f"{w}\t{counts[i]}\n" for w, i in types.items()), encoding="utf-8")
    (work / MIXED_CASE_FILE).write_text(json.dumps(mixed_case, indent=0) + "\n", encoding="utf-8")
    for name, part in parts.items():
        np.save(work / f"{name}-words.npy", np.frombuffer(part.words, dtype=np.int32))
        np.save(work / f"{name}-labels.npy", np.frombuffer(part.labels, dtype=np.uint8))


@dataclass(frozen=True)
class PunctuatorTraining:
    minutes: float = 60.0  # wall-clock training budget (the learning rate decays over it)
    batch_size: int = 64  # windows per step
    window: int = 128  # words per window
    learning_rate: float = 3e-3
    warmup_steps: int = 200
    clip: float = 1.0
    checkpoint_minutes: float = 5.0
    held_out_words: int = 60_000  # scored at each checkpoint (the final scores use every held-out word)
    threads: int = 0  # torch threads; 0 = torch's default
    seed: int = 0

    def __post_init__(self) -> None:
        if self.minutes <= 0 or self.checkpoint_minutes <= 0 or self.learning_rate <= 0 or self.clip <= 0:
            raise ValueError("minutes, checkpoint_minutes, learning_rate and clip must be positive")
        if self.batch_size < 1 or self.window < 2 or self.held_out_words < 1:
            raise ValueError("batch_size >= 1, window >= 2 and held_out_words >= 1 are needed")


class _Corpus:
    """The prepared work folder: both parts, the word types with their feature rows, and the model's vocabulary."""

    def __init__(self, work: Path, config: PunctuatorConfig) -> None:
        lines = (work / TYPES_FILE).read_text(encoding="utf-8").split("\n")[:-1]
        self.types = [line.split("\t")[0] for line in lines]
        counts = np.array([int(line.split("\t")[1]) for line in lines])
        frequent = np.argsort(-counts, kind="stable")[: config.vocabulary_size - 1]
        self.vocabulary = ["<other>", *(self.types[i] for i in frequent if counts[i] > 0)]
        index = {w: i for i, w in enumerate(self.vocabulary)}
        self.word_ids = torch.tensor([index.get(w, 0) for w in self.types])
        self.ngram_ids = torch.tensor([_padded(word_ngrams(w, config), config) for w in self.types])
        self.mixed_case = json.loads((work / MIXED_CASE_FILE).read_text(encoding="utf-8"))
        self.train_words = torch.from_numpy(np.load(work / "train-words.npy").astype(np.int64))
        self.train_labels = torch.from_numpy(np.load(work / "train-labels.npy").astype(np.int64))
        self.held_out_words = np.load(work / "held-out-words.npy")
        self.held_out_labels = np.load(work / "held-out-labels.npy")

    def batch(self, generator: torch.Generator, batch_size: int, window: int) -> tuple[torch.Tensor, ...]:
        """Random windows: word ids (batch, window), n-gram ids (batch, window, max_ngrams), case and mark labels."""
        starts = torch.randint(0, len(self.train_words) - window, (batch_size,), generator=generator)
        positions = starts[:, None] + torch.arange(window)
        types, labels = self.train_words[positions], self.train_labels[positions]
        return self.word_ids[types], self.ngram_ids[types], labels // 8, labels % 8


def _padded(ngrams: list[int], config: PunctuatorConfig) -> list[int]:
    return ngrams + [config.ngram_buckets] * (config.max_ngrams - len(ngrams))


class _Run:
    """Model, optimiser, steps and time spent: saved and restored whole."""

    def __init__(self, work: Path, config: PunctuatorConfig, settings: PunctuatorTraining) -> None:
        self.path = work / CHECKPOINT_FILE
        self.model = PunctuationModel(config)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=settings.learning_rate)
        self.step, self.seconds, self.words_seen, self.history = 0, 0.0, 0, []
        self.generator = torch.Generator().manual_seed(settings.seed)
        if self.path.is_file():
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            if saved["config"] != config.to_dict():
                raise PunctuationCorpusError(f"{self.path} is a checkpoint of a model of another shape; use another --work")
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.generator.set_state(saved["generator"])
            self.step, self.seconds, self.words_seen, self.history = saved["step"], saved["seconds"], saved["words_seen"], saved["history"]

    def save(self) -> None:
        state = {"config": self.model.config.to_dict(), "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        state |= {"generator": self.generator.get_state(), "step": self.step, "seconds": self.seconds}
        state |= {"words_seen": self.words_seen, "history": self.history}
        partial = self.path.with_name(self.path.name + ".partial")
        torch.save(state, partial)
        os.replace(partial, self.path)


def train_punctuator(
    work: Path, config: PunctuatorConfig, settings: PunctuatorTraining, log: Callable[[str], None] = lambda line: None
) -> Punctuator:
    """Train (or go on training) on ``work``'s corpus until ``settings.minutes`` of training time are spent.

    Checkpoints (with held-out scores) every ``checkpoint_minutes``; a run started again resumes from the last.
    """
    if settings.threads:
        torch.set_num_threads(settings.threads)
    corpus = _Corpus(work, config)
    run = _Run(work, config, settings)
    budget, losses = settings.minutes * 60, []
    last_save, started = time.monotonic(), time.monotonic() - run.seconds
    loss_function = nn.CrossEntropyLoss()
    while run.seconds < budget:
        word_ids, ngram_ids, cases, marks = corpus.batch(run.generator, settings.batch_size, settings.window)
        for group in run.optimizer.param_groups:
            group["lr"] = time_budget_learning_rate(settings.learning_rate, settings.warmup_steps, run.step, run.seconds / budget)
        run.model.train()
        case_logits, mark_logits = run.model(word_ids, ngram_ids)
        loss = loss_function(case_logits.flatten(0, 1), cases.flatten()) + loss_function(mark_logits.flatten(0, 1), marks.flatten())
        run.optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(run.model.parameters(), settings.clip)
        run.optimizer.step()
        losses.append(loss.item())
        run.step, run.words_seen, run.seconds = run.step + 1, run.words_seen + word_ids.numel(), time.monotonic() - started
        if time.monotonic() - last_save >= settings.checkpoint_minutes * 60 or run.seconds >= budget:
            punctuator = _punctuator(run, corpus)
            entry = {"step": run.step, "minutes": round(run.seconds / 60, 2), "words_seen": run.words_seen}
            entry |= {"train_loss": round(sum(losses) / max(len(losses), 1), 4)}
            entry |= punctuation_scores(punctuator, *_held_out(corpus, settings.held_out_words))
            run.history.append(entry)
            log(json.dumps(entry))
            losses = []
            run.save()
            last_save = time.monotonic()
    punctuator = _punctuator(run, corpus)
    punctuator.info = {
        "steps": run.step,
        "words_seen": run.words_seen,
        "minutes": round(run.seconds / 60, 1),
        "threads": torch.get_num_threads(),
    }
    return punctuator


def _punctuator(run: _Run, corpus: _Corpus) -> Punctuator:
    return Punctuator(run.model, corpus.vocabulary, corpus.mixed_case)


def _held_out(corpus: _Corpus, limit: int | None = None) -> tuple[list[str], np.ndarray]:
    words, labels = corpus.held_out_words[:limit], corpus.held_out_labels[:limit]
    return [corpus.types[i] for i in words], labels


PARAGRAPH_WORDS = 150  # held-out text is read in paragraphs of about this many words, each ending at a sentence end


def held_out_paragraphs(labels: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) spans of at least ``PARAGRAPH_WORDS`` words that end where a sentence does (the last may not)."""
    spans, start = [], 0
    ends = np.flatnonzero(np.isin(labels % 8, (FULL_STOP, QUESTION, EXCLAMATION))) + 1
    for end in ends:
        if end - start >= PARAGRAPH_WORDS:
            spans.append((start, int(end)))
            start = int(end)
    if start < len(labels):
        spans.append((start, len(labels)))
    return spans


def punctuation_scores(punctuator: Punctuator, words: list[str], labels: np.ndarray) -> dict[str, float]:
    """F1 of each mark and of capitalised words, formatting ``words`` (lower case, no marks) in held-out paragraphs.

    Full stop counts ! as a full stop (and exclamation is scored alone too); comma includes ; : and dashes.
    ``overall_f1`` is the micro F1 of comma, full stop and question mark (punctuator2's measure).
    """
    spans = held_out_paragraphs(labels)
    formatted = punctuator.format_paragraphs([words[s:e] for s, e in spans])
    output = [token for paragraph in formatted for token in paragraph]
    predicted_marks = np.array([MARKS.index(t[-1]) if t[-1] in ",.?!" else NO_MARK for t in output])
    predicted_capital = np.array([t[0].isupper() for t in output])
    marks, capital = labels % 8, labels // 8 != LOWER
    full_stop = (FULL_STOP, EXCLAMATION)
    scores = {
        "full_stop_f1": _f1(np.isin(predicted_marks, full_stop), np.isin(marks, full_stop)),
        "comma_f1": _f1(predicted_marks == COMMA, marks == COMMA),
        "question_f1": _f1(predicted_marks == QUESTION, marks == QUESTION),
        "exclamation_f1": _f1(predicted_marks == EXCLAMATION, marks == EXCLAMATION),
        "capitalised_f1": _f1(predicted_capital, capital),
    }
    scored = (COMMA, FULL_STOP, QUESTION)
    hits = sum(int(((predicted_marks == m) & (marks == m)).sum()) for m in scored)
    scores["overall_f1"] = round(2 * hits / max(int(np.isin(predicted_marks, scored).sum() + np.isin(marks, scored).sum()), 1), 4)
    return scores


def _f1(predicted: np.ndarray, reference: np.ndarray) -> float:
    hits = int((predicted & reference).sum())
    return round(2 * hits / max(int(predicted.sum() + reference.sum()), 1), 4)


def score_held_out(work: Path, punctuator: Punctuator, limit: int | None = None) -> dict:
    """Scores of ``punctuator`` on ``work``'s held-out books (all of them unless ``limit`` words), their size, and the
    speed of formatting them (words per second with torch's current threads)."""
    corpus_meta = json.loads((work / META_FILE).read_text(encoding="utf-8"))
    lines = (work / TYPES_FILE).read_text(encoding="utf-8").split("\n")[:-1]
    types = [line.split("\t")[0] for line in lines]
    ids, labels = np.load(work / "held-out-words.npy")[:limit], np.load(work / "held-out-labels.npy")[:limit]
    words = [types[i] for i in ids]
    started = time.perf_counter()
    scores = punctuation_scores(punctuator, words, labels)
    seconds = time.perf_counter() - started
    scores |= {"words": len(ids), "books": len(corpus_meta["held_out_books"]), "seconds": round(seconds, 2)}
    return scores | {"words_per_second": round(len(ids) / seconds), "threads": torch.get_num_threads()}
