"""Training the LSTM language model (``asr.nnlm``) on text, on the CPU, resumably.

``prepare_corpus`` normalises the text once into a work folder (word ids as one array, the vocabulary, and held-out
sentences); ``train_neural_lm`` trains for a wall-clock budget with the learning rate following the time spent,
checkpoints every few minutes (an interrupted run resumes where its last checkpoint left off), and finally writes the
model file. Nothing is written to the output until training is complete.
"""

from __future__ import annotations

import collections
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from asr.lm import CONFIG_FILE, LSTM_FILE
from asr.nnlm import SENTENCE_END, UNKNOWN, LstmLanguageModel, NeuralLM, NeuralLMConfig, perplexity

from .lm import LanguageModelBuildError, read_sentences, source_name

CORPUS_FILE, WORDS_FILE, HELD_OUT_FILE = "tokens.npy", "words.txt", "held-out.txt"
META_FILE, CHECKPOINT_FILE = "corpus.json", "checkpoint.pt"
HELD_OUT_EVERY = 500  # one sentence in this many is held out to measure perplexity
HELD_OUT_SENTENCES = 2000


@dataclass(frozen=True)
class NeuralLMTraining:
    minutes: float = 60.0  # wall-clock training budget (the learning rate decays over it)
    batch_size: int = 64  # parallel streams of text
    bptt: int = 32  # words per step of each stream
    learning_rate: float = 2e-3
    warmup_steps: int = 200
    clip: float = 1.0
    checkpoint_minutes: float = 5.0
    threads: int = 0  # torch threads; 0 = torch's default
    seed: int = 0

    def __post_init__(self) -> None:
        if self.minutes <= 0 or self.checkpoint_minutes <= 0:
            raise ValueError("minutes and checkpoint_minutes must be positive")
        if self.batch_size < 1 or self.bptt < 2 or self.learning_rate <= 0 or self.clip <= 0:
            raise ValueError("batch_size >= 1, bptt >= 2, and a positive learning rate and clip are needed")


def prepare_corpus(sources: list[str], work: Path, max_words: int = 100_000, min_count: int = 2) -> dict:
    """Normalise ``sources`` into ``work`` (done once; a work folder made from other sources is an error).

    Returns the corpus description: sources, words kept, tokens and sentences. Raises ``LanguageModelBuildError`` for
    an empty, binary or line-less text.
    """
    meta_path = work / META_FILE
    sources = [str(s) for s in sources]
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta["sources"] != [source_name(s) for s in sources]:
            raise LanguageModelBuildError(f"{work} holds a corpus of other texts ({', '.join(meta['sources'])}); use another --work")
        return meta
    counts: collections.Counter[str] = collections.Counter()
    sentences, held_out = [], []
    for source in sources:
        for sentence in read_sentences(source):
            if len(sentences) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 and len(held_out) < HELD_OUT_SENTENCES:
                held_out.append(sentence)
                sentences.append(None)
                continue
            counts.update(sentence.split())
            sentences.append(sentence)
    if not counts:
        raise LanguageModelBuildError("the text sources contain no words")
    kept = [w for w, c in counts.most_common(max_words) if c >= min_count] or [w for w, _ in counts.most_common(max_words)]
    words = [SENTENCE_END, UNKNOWN, *kept]
    ids = {w: i for i, w in enumerate(words)}
    tokens = np.fromiter((ids.get(w, 1) for s in sentences if s is not None for w in [*s.split(), SENTENCE_END]), dtype=np.int32)
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / CORPUS_FILE, tokens)
    (work / WORDS_FILE).write_text("\n".join(words) + "\n", encoding="utf-8")
    (work / HELD_OUT_FILE).write_text("\n".join(held_out) + "\n", encoding="utf-8")
    unknown = float((tokens == 1).mean())
    meta = {"sources": [source_name(s) for s in sources], "words": len(words), "tokens": len(tokens), "unknown_rate": unknown}
    meta["sentences"] = len(sentences) - len(held_out)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def time_budget_learning_rate(peak: float, warmup_steps: int, step: int, progress: float) -> float:
    """Linear warm-up over ``warmup_steps``, then a cosine decay to a tenth of ``peak`` over the time budget (``progress`` in [0, 1])."""
    warm = min(1.0, (step + 1) / warmup_steps)
    return peak * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class _Run:
    """The state of one training run: model, optimiser, position in the text, time spent; saved and restored whole."""

    def __init__(self, work: Path, config: NeuralLMConfig, settings: NeuralLMTraining) -> None:
        self.work, self.settings = work, settings
        self.model = LstmLanguageModel(config)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=settings.learning_rate)
        self.step, self.seconds, self.tokens_seen, self.history = 0, 0.0, 0, []
        path = work / CHECKPOINT_FILE
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["config"] != config.to_dict():
                raise LanguageModelBuildError(f"{path} is a checkpoint of a model of another shape; use another --work")
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.step, self.seconds, self.tokens_seen = saved["step"], saved["seconds"], saved["tokens_seen"]
            self.history = saved["history"]

    def save(self) -> None:
        path = self.work / CHECKPOINT_FILE
        state = {"config": self.model.config.to_dict(), "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        state |= {"step": self.step, "seconds": self.seconds, "tokens_seen": self.tokens_seen, "history": self.history}
        partial = path.with_name(path.name + ".partial")
        torch.save(state, partial)
        os.replace(partial, path)


def _streams(tokens: np.ndarray, batch_size: int) -> torch.Tensor:
    """The token array cut into ``batch_size`` equal streams: (batch, length)."""
    length = len(tokens) // batch_size
    return torch.from_numpy(tokens[: length * batch_size].astype(np.int64)).view(batch_size, length)


def train_neural_lm(
    work: Path, config: NeuralLMConfig, settings: NeuralLMTraining, log: Callable[[str], None] = lambda line: None
) -> NeuralLM:
    """Train (or go on training) the model of ``work``'s corpus until ``settings.minutes`` of training time are spent.

    Each step reads the next ``bptt`` words of every stream, carrying the LSTM state along. Checkpoints are written
    every ``checkpoint_minutes``; a run started again resumes from the last. Returns the trained model.
    """
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    words = (work / WORDS_FILE).read_text(encoding="utf-8").split("\n")[:-1]
    streams = _streams(np.load(work / CORPUS_FILE, mmap_mode="r"), settings.batch_size)
    held_out = [s for s in (work / HELD_OUT_FILE).read_text(encoding="utf-8").split("\n") if s][:HELD_OUT_SENTENCES]
    run = _Run(work, config, settings)
    budget = settings.minutes * 60
    state, last_save, started = None, time.monotonic(), time.monotonic() - run.seconds
    losses: list[float] = []
    while run.seconds < budget:
        position = (run.step * settings.bptt) % (streams.shape[1] - 1)
        if position + settings.bptt + 1 > streams.shape[1]:
            position, state = 0, None  # the next epoch
        inputs = streams[:, position : position + settings.bptt]
        targets = streams[:, position + 1 : position + settings.bptt + 1]
        for group in run.optimizer.param_groups:
            group["lr"] = time_budget_learning_rate(settings.learning_rate, settings.warmup_steps, run.step, run.seconds / budget)
        run.model.train()
        outputs, state = run.model(inputs, state)
        state = tuple(s.detach() for s in state)
        loss = run.model.loss(outputs, targets)
        run.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), settings.clip)
        run.optimizer.step()
        losses.append(loss.item())
        run.step += 1
        run.tokens_seen += inputs.numel()
        run.seconds = time.monotonic() - started
        if time.monotonic() - last_save >= settings.checkpoint_minutes * 60 or run.seconds >= budget:
            entry = _evaluate(run, words, held_out, losses)
            log(json.dumps(entry))
            losses = []
            run.save()
            last_save = time.monotonic()
    lm = NeuralLM(run.model, words)
    lm.info = {"steps": run.step, "tokens_seen": run.tokens_seen, "minutes": round(run.seconds / 60, 1), "threads": torch.get_num_threads()}
    lm.info |= {"held_out_perplexity": run.history[-1]["held_out_perplexity"] if run.history else None}
    return lm


def _evaluate(run: _Run, words: list[str], held_out: list[str], losses: list[float]) -> dict:
    run.model.eval()
    entry = {
        "step": run.step,
        "minutes": round(run.seconds / 60, 2),
        "tokens_seen": run.tokens_seen,
        "train_perplexity": round(math.exp(sum(losses) / max(len(losses), 1)), 1),
        "held_out_perplexity": round(perplexity(NeuralLM(run.model, words), held_out), 1),
    }
    run.history.append(entry)
    return entry


def install_neural_lm(lm: NeuralLM, output: str | os.PathLike) -> Path:
    """Write ``lm`` to a file, or into a language-model folder as ``LSTM_FILE`` named in its decoder.json; returns the file.

    The file is written beside its place and moved in; decoder.json is rewritten (atomically) only after that.
    """
    output = Path(output)
    if not (output / CONFIG_FILE).is_file():
        if output.is_dir() or output.suffix != ".pt":
            raise LanguageModelBuildError(f"{output} is neither a language-model folder (with {CONFIG_FILE}) nor a .pt file")
        lm.save(output)
        return output
    path = output / LSTM_FILE
    lm.save(path)
    config_path = output / CONFIG_FILE
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("lstm") != LSTM_FILE:
        config["lstm"] = LSTM_FILE
        partial = config_path.with_name(f".{CONFIG_FILE}.partial")
        partial.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        os.replace(partial, config_path)
    return path
