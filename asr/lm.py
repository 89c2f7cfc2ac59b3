"""Beam-search CTC decoding with a lexicon and a word n-gram language model (flashlight-text's decoder, ``asr.flashlight``).

A language-model folder holds ``decoder.json`` (file names and tuned decoder settings), ``lexicon.txt``
(word -> characters) and a KenLM model (``lm.bin`` or ``lm.arpa``); optionally also a phone lexicon (word ->
ARPAbet phones, ``lexicon-phones.txt``) with its own tuned settings, for models with a phone output layer.
flashlight-text is imported lazily: the greedy decoder works without it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from . import flashlight
from .decoding import Alternative, Transcript, Word
from .grammar import UNK, Grammar, GrammarAutomaton
from .nnlm import NeuralLM
from .text import Vocabulary, normalize_text

CONFIG_FILE = "decoder.json"
LEXICON_FILE = "lexicon.txt"
PHONE_LEXICON_FILE = "lexicon-phones.txt"
LSTM_FILE = "lstm.pt"  # the LSTM language model that rescores final hypotheses (asr.nnlm)
UNITS = ("chars", "phones")
BLANK_SYMBOL, WORD_BOUNDARY = "-", "|"  # how the search names our blank and space tokens
UNK_WORD = "<unk>"
KENLM_BINARY_MAGIC = b"mmap lm http://kheafield.com/code"
HOTWORD_BONUS = 8.0  # added to the LM score of each hotword, in natural-log units before lm_weight
UNK_PENALTY = 2.0  # cost (nats) per character of speech that a grammar's "[unk]" stands for
EMPTY_PENALTY = 4.0  # cost (nats) of a grammar's empty result, relative to any other


class LanguageModelError(ValueError):
    """Raised for a missing or unusable language-model folder, or when the decoder cannot be loaded."""


@dataclass(frozen=True)
class DecoderSettings:
    beam_size: int = 32
    beam_size_token: int = 12  # tokens considered per frame
    beam_threshold: float = 20.0
    lm_weight: float = 0.8
    word_score: float = 0.0
    unk_score: float = -math.inf  # score of the LM's <unk> word; -inf: only lexicon words
    hotword_bonus: float = HOTWORD_BONUS
    unk_penalty: float = UNK_PENALTY  # grammars: nats per character that "[unk]" stands for
    empty_penalty: float = EMPTY_PENALTY  # grammars: nats charged for no word at all (CTC leans to blanks)
    char_weight: float = 0.0  # phones: weight of the character layer's CTC log-likelihood when reranking finals
    lstm_weight: float = 0.5  # weight of the LSTM LM's log-probability when rescoring finals (LM folders with one)
    rescored_texts: int = 16  # distinct final texts that the character layer and the LSTM LM rerank

    def __post_init__(self) -> None:
        if self.beam_size < 1 or self.beam_size_token < 1 or self.rescored_texts < 1:
            raise ValueError("beam sizes and rescored_texts must be at least 1")
        if self.beam_threshold <= 0:
            raise ValueError("beam_threshold must be positive")
        if not math.isfinite(self.lm_weight) or not math.isfinite(self.word_score):
            raise ValueError("lm_weight and word_score must be finite")
        if not 0 <= self.unk_penalty < math.inf or not math.isfinite(self.empty_penalty):
            raise ValueError("unk_penalty must be a finite number >= 0 and empty_penalty finite")
        if not 0 <= self.char_weight < math.inf or not 0 <= self.lstm_weight < math.inf:
            raise ValueError("char_weight and lstm_weight must be finite numbers >= 0")

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> DecoderSettings:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if values.get("unk_score", 0) is None:
            values["unk_score"] = -math.inf
        return cls(**values)


def spell(word: str) -> str:
    """Lexicon spelling of a word: 'it's' -> "i t ' s |"."""
    return " ".join(word) + f" {WORD_BOUNDARY}"


def spell_phones(pronunciation: tuple[str, ...] | list[str]) -> str:
    """Lexicon spelling of a pronunciation: ('IH', 'T', 'S') -> 'IH T S |'."""
    return " ".join(pronunciation) + f" {WORD_BOUNDARY}"


@dataclass(frozen=True)
class LanguageModel:
    """A language-model folder; ``lexicon_file`` and ``settings`` are those of ``units`` (see ``for_units``)."""

    folder: Path
    model_file: Path
    lexicon_file: Path
    settings: DecoderSettings
    units: str = "chars"
    phone_lexicon_file: Path | None = None  # word -> phones, when the folder has one
    phone_settings: DecoderSettings | None = None  # tuned for a phone output layer
    lstm_file: Path | None = None  # the LSTM LM that rescores final hypotheses, when the folder has one

    @property
    def has_phones(self) -> bool:
        return self.phone_lexicon_file is not None

    def for_units(self, units: str) -> LanguageModel:
        """This language model with the lexicon and settings of ``units`` ("chars" or "phones")."""
        if units not in UNITS:
            raise ValueError(f"units must be one of {UNITS}, got {units!r}")
        if units == self.units:
            return self
        if units == "phones" and self.phone_lexicon_file is None:
            raise LanguageModelError(f"language model {self.folder} has no phone lexicon (add one with `asr lm add-phones`)")
        if units == "phones":
            return replace(self, units=units, lexicon_file=self.phone_lexicon_file, settings=self.phone_settings or self.settings)
        return LanguageModel.load(self.folder)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> LanguageModel:
        folder = Path(folder)
        config_path = folder / CONFIG_FILE
        if not config_path.is_file():
            raise LanguageModelError(f"language model folder {folder} has no {CONFIG_FILE} (build one with `asr lm build`)")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            model_file, lexicon_file = folder / config["lm"], folder / config["lexicon"]
            settings = DecoderSettings.from_dict(config)
            phone_lexicon = folder / config["phone_lexicon"] if config.get("phone_lexicon") else None
            phone_settings = DecoderSettings.from_dict({**config, **config.get("phone_settings", {})}) if phone_lexicon else None
            lstm_file = folder / config["lstm"] if config.get("lstm") else None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise LanguageModelError(f"{config_path} is damaged: {error}") from error
        for path in (model_file, lexicon_file, phone_lexicon, lstm_file):
            if path is not None and not path.is_file():
                raise LanguageModelError(f"language model file missing: {path}")
        with model_file.open("rb") as handle:
            head = handle.read(64)
        if not (head.startswith(KENLM_BINARY_MAGIC) or head.lstrip().startswith(b"\\data\\")):
            raise LanguageModelError(f"{model_file} is neither a KenLM binary nor an ARPA file")
        return cls(folder, model_file, lexicon_file, settings, "chars", phone_lexicon, phone_settings, lstm_file)

    def save_settings(self, settings: DecoderSettings) -> None:
        """Store tuned decoder settings (of this object's units) in decoder.json."""
        path = self.folder / CONFIG_FILE
        config = json.loads(path.read_text(encoding="utf-8"))
        if self.units == "phones":
            config["phone_settings"] = settings.to_dict()
        else:
            config.update(settings.to_dict())
        path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _flashlight(call: Callable, *args, **kwargs):
    """``call`` from ``asr.flashlight``; flashlight-text missing is a LanguageModelError that says what to do."""
    try:
        return call(*args, **kwargs)
    except flashlight.FlashlightUnavailable as error:
        raise LanguageModelError(f"{error}, or use --decoder greedy") from None


def _pronounced(words: list[str]) -> dict[str, list[list[str]]]:
    """Phone-lexicon entries of hotwords; a word with no pronunciation is left out with a ``PronunciationWarning``."""
    from .phones import PronunciationError, PronunciationWarning, shared_pronouncer

    entries = {}
    for word in words:
        try:
            entries[word] = [spell_phones(p).split() for p in shared_pronouncer().variants(word)]
        except PronunciationError as error:
            warnings.warn(f"hotword {word!r} left out of the phone search: {error}", PronunciationWarning, stacklevel=2)
    return entries


def _hotword_lm(base_lm, word_ids: set[int], bonus: float):
    """Wrap a KenLM so that completing a hotword adds ``bonus`` to its score."""

    class HotwordLM(flashlight.lm_base()):
        def __init__(self) -> None:
            super().__init__()
            self.base = base_lm

        def start(self, start_with_nothing: bool):
            return self.base.start(start_with_nothing)

        def score(self, state, usr_token_idx: int):
            next_state, score = self.base.score(state, usr_token_idx)
            return next_state, score + (bonus if usr_token_idx in word_ids else 0.0)

        def finish(self, state):
            return self.base.finish(state)

    return HotwordLM()


def _grammar_lm(automaton: GrammarAutomaton, chars: list[str]):
    """A character-level "language model" that walks a grammar's automaton (one LM state per automaton state)."""
    import threading

    class GrammarLM(flashlight.lm_base()):
        def __init__(self) -> None:
            super().__init__()
            self._states: dict = {}  # automaton state -> LM state; equal states merge hypotheses in the search
            self._keys: dict = {}  # LM state -> automaton state
            self._moves: dict = {}  # (LM state, token) -> (LM state, score)
            self._lock = threading.Lock()
            self._root = self._state(automaton.start)

        def _state(self, key):
            with self._lock:
                if key not in self._states:
                    state = flashlight.new_lm_state()
                    self._keys[state] = key
                    self._states[key] = state
                return self._states[key]

        def start(self, start_with_nothing: bool):
            return self._root

        def score(self, state, usr_token_idx: int):
            move = self._moves.get((state, usr_token_idx))
            if move is None:
                key, cost = automaton.step(self._keys[state], chars[usr_token_idx])
                move = self._moves.setdefault((state, usr_token_idx), (self._state(key), -cost))
            return move

        def finish(self, state):
            return state, -automaton.finish(self._keys[state])

    return GrammarLM()


def ctc_log_likelihoods(log_probs: torch.Tensor, targets: list[list[int]]) -> list[float]:
    """log P(target | frames) under CTC (blank id 0) for each target: log_probs (frames, vocab), targets token ids.

    An empty target is the all-blank path; a target too long for the frames scores -inf.
    """
    if not targets:
        return []
    frames = log_probs.shape[0]
    batch = log_probs.float().unsqueeze(1).expand(frames, len(targets), log_probs.shape[1])
    lengths = torch.tensor([len(t) for t in targets])
    padded = torch.zeros(len(targets), max(1, int(lengths.max())), dtype=torch.long)
    for i, target in enumerate(targets):
        padded[i, : len(target)] = torch.tensor(target, dtype=torch.long)
    losses = torch.nn.functional.ctc_loss(
        batch, padded, torch.full((len(targets),), frames), lengths, blank=0, reduction="none", zero_infinity=False
    )
    return (-losses).tolist()


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


class BeamSearchDecoder:
    """log_probs (frames, vocab) -> Transcript, with lexicon + LM, or lexicon-free without one, or over a grammar.

    ``vocabulary`` is that of the log-probs: characters, or phones with an LM whose ``units`` are phones (its
    lexicon spells words in phones). ``hotwords`` are words or phrases to favour: their words join the lexicon if
    missing (spelled by ``asr.phones.Pronouncer`` for phones), and each gets ``settings.hotword_bonus`` when the
    decoder completes it. A ``grammar`` restricts the output to its
    phrases (``asr.grammar``): lexicon-free search with the grammar's automaton as the LM (weight 1); it needs no
    language model, and ``lm`` and ``hotwords`` are then unused.

    A phone search can rerank its final hypotheses with the model's character layer: given ``char_vocabulary`` and,
    at decode time, the character log-probs of the same frames, each of the best ``settings.rescored_texts`` texts gains
    ``settings.char_weight`` x its CTC log-likelihood under the characters. Given a ``neural_lm`` (``asr.nnlm``),
    each also gains ``settings.lstm_weight`` x its log-probability under that LSTM LM. Partial results are not
    reranked: they stay on the search's fast path.
    """

    def __init__(
        self,
        vocabulary: Vocabulary,
        lm: LanguageModel | None = None,
        settings: DecoderSettings | None = None,
        hotwords: list[str] | tuple[str, ...] = (),
        grammar: Grammar | None = None,
        char_vocabulary: Vocabulary | None = None,
        neural_lm: NeuralLM | None = None,
    ) -> None:
        self.vocabulary = vocabulary
        self.char_vocabulary = char_vocabulary
        self.units = lm.units if lm is not None and grammar is None else "chars"
        self.settings = settings or (lm.settings if lm else DecoderSettings())
        self.grammar = grammar
        self.automaton = GrammarAutomaton(grammar, self.settings.unk_penalty, self.settings.empty_penalty) if grammar is not None else None
        if grammar is not None:
            lm, hotwords = None, ()
        self.neural_lm = neural_lm if lm is not None else None
        self.hotwords = sorted({w for phrase in hotwords for w in normalize_text(phrase).split()})
        # The lexicon trie and LM are built once here (seconds for a 100k-word lexicon); fork() starts another search
        # over them.
        self._searches = _flashlight(self._search_factory, lm)
        self._search_state = self._searches.new()

    def _search_factory(self, lm: LanguageModel | None) -> flashlight.SearchFactory:
        vocabulary, s = self.vocabulary, self.settings
        tokens = flashlight.Tokens(
            [BLANK_SYMBOL if t == vocabulary.tokens[0] else WORD_BOUNDARY if t == " " else t for t in vocabulary.tokens]
        )
        silence, blank = tokens.index(WORD_BOUNDARY), tokens.index(BLANK_SYMBOL)
        options = flashlight.SearchOptions(
            beam_size=s.beam_size,
            beam_size_token=min(s.beam_size_token, tokens.size),
            beam_threshold=s.beam_threshold,
            lm_weight=s.lm_weight,
            word_score=s.word_score,
            unk_score=s.unk_score,
        )
        if lm is None and self.automaton is not None:
            # log-add: a grammar's hypotheses are scored by the sum over their alignments (the CTC posterior), which
            # beats the best alignment alone on short words (fsdd dev digits: 31 vs 36 errors in 300)
            grammar_options = replace(options, lm_weight=1.0, log_add=True)
            return flashlight.lexicon_free_search(_grammar_lm(self.automaton, list(vocabulary.tokens)), grammar_options, silence, blank)
        if lm is None:
            return flashlight.lexicon_free_search(flashlight.zero_lm(), options, silence, blank)
        try:
            lexicon = flashlight.load_lexicon(str(lm.lexicon_file))
            missing = [w for w in self.hotwords if w not in lexicon]
            if self.units == "phones":
                lexicon.update(_pronounced(missing))
            else:
                lexicon.update({word: [spell(word).split()] for word in missing})
            words = flashlight.word_dictionary(lexicon)
            language_model = flashlight.kenlm(str(lm.model_file), words)
            if self.hotwords:
                ids = {words.get_index(w) for w in self.hotwords if w in lexicon}
                language_model = _hotword_lm(language_model, ids, s.hotword_bonus)
            return flashlight.lexicon_search(tokens, lexicon, words, language_model, options, silence, blank, UNK_WORD)
        except (RuntimeError, ValueError, OSError) as error:  # flashlight raises RuntimeError for unreadable files
            raise LanguageModelError(f"cannot load language model {lm.folder}: {error}") from error

    def fork(self, rescore: bool = True) -> BeamSearchDecoder:
        """A decoder with its own search state over this one's lexicon and LM: one per concurrent stream (cheap).

        ``rescore=False``: without this decoder's LSTM LM."""
        clone = copy.copy(self)
        if not rescore:
            clone.neural_lm = None
        clone._search_state = self._searches.new()
        return clone

    def decode(
        self,
        log_probs: torch.Tensor,
        frame_shift: float,
        offset: float = 0.0,
        alternatives: int = 0,
        char_log_probs: torch.Tensor | None = None,
    ) -> Transcript:
        """Best hypothesis for one utterance (and up to ``alternatives`` N-best entries); word times come from the
        decoder's token timesteps. ``char_log_probs`` (frames, chars): the character layer, to rerank a phone search."""
        emissions, results = self._search(log_probs)
        if results is None:
            return Transcript("", [], 0.0)
        return self._result(results, emissions, frame_shift, offset, alternatives, False, char_log_probs)

    def decode_reranked(
        self,
        log_probs: torch.Tensor,
        frame_shift: float,
        char_log_probs: torch.Tensor | None,
        weights: list[tuple[float, float]],
    ) -> list[Transcript]:
        """``decode`` once per (char_weight, lstm_weight) pair (for tuning): one search, its final texts reranked each
        way (the character layer and the LSTM LM score each text once)."""
        emissions, results = self._search(log_probs)
        if results is None:
            return [Transcript("", [], 0.0) for _ in weights]
        texts = self._final_texts(results)
        likelihoods = self._char_likelihoods(texts, char_log_probs)
        lstm = self._lstm_scores(texts) if any(w > 0 for _, w in weights) else None
        return [
            self._reranked(texts, emissions, frame_shift, 0.0, 0, likelihoods, lstm, c, w)
            if (c > 0 and likelihoods is not None) or (w > 0 and lstm is not None)
            else self._plain(results, emissions, frame_shift, 0.0, 0, False)
            for c, w in weights
        ]

    def _search(self, log_probs: torch.Tensor) -> tuple[torch.Tensor, list | None]:
        """One whole-utterance search: (the emissions as searched, flashlight's results; None for no frames)."""
        emissions = log_probs.detach().float().cpu().contiguous()
        if emissions.shape[0] == 0:
            return emissions, None
        return emissions, self._search_state.decode(emissions)

    def begin(self) -> None:
        """Start incremental decoding of a new utterance (``step`` ... ``end``)."""
        self._search_state.begin()

    def step(self, log_probs: torch.Tensor) -> None:
        """Feed the next frames (frames, vocab) of the current utterance."""
        if log_probs.shape[0]:
            self._search_state.step(log_probs.detach().float().cpu().contiguous())

    def best(
        self,
        emissions: torch.Tensor,
        frame_shift: float,
        offset: float = 0.0,
        final: bool = False,
        alternatives: int = 0,
        char_log_probs: torch.Tensor | None = None,
    ) -> Transcript:
        """Current best hypothesis; ``emissions`` are all frames fed since ``begin`` (for confidences), and
        ``char_log_probs`` the character layer's for the same frames (to rerank a phone search's final result).

        Before ``final``, a grammar's hypothesis shows only the words it has finished (a prefix of its phrases).
        """
        if final:
            self._search_state.end()
        results = self._search_state.results()
        if not results or emissions.shape[0] == 0:
            return Transcript("", [], 0.0)
        emissions = emissions.detach().float().cpu()
        return self._result(results, emissions, frame_shift, offset, alternatives if final else 0, not final, char_log_probs)

    def _result(
        self,
        results,
        emissions: torch.Tensor,
        frame_shift: float,
        offset: float,
        alternatives: int,
        partial: bool,
        char_log_probs: torch.Tensor | None = None,
    ) -> Transcript:
        """The best of flashlight's hypotheses (they are sorted by score only after ``decode_end``) and the N-best;
        final results are reranked (``_reranked``) when the character layer or an LSTM LM has a weight.

        An alternative's confidence is its share of the probability mass of all hypotheses left in the beam
        (softmax of their total scores; hypotheses with the same text are summed), so the N-best sum to at most 1.
        """
        s = self.settings
        chars = self.units == "phones" and s.char_weight > 0 and self.char_vocabulary is not None and char_log_probs is not None
        if not partial and (chars or self.rescores):
            texts = self._final_texts(results)
            likelihoods = self._char_likelihoods(texts, char_log_probs if chars else None)
            lstm = self._lstm_scores(texts) if self.rescores else None
            return self._reranked(texts, emissions, frame_shift, offset, alternatives, likelihoods, lstm, s.char_weight, s.lstm_weight)
        return self._plain(results, emissions, frame_shift, offset, alternatives, partial)

    def _plain(self, results, emissions: torch.Tensor, frame_shift: float, offset: float, alternatives: int, partial: bool) -> Transcript:
        """The search's best hypothesis, and its N-best texts by their summed probability (not reranked)."""
        best = max(results, key=lambda r: r.score)
        transcript = self._to_transcript(self._searches.hypotheses([best])[0], emissions, frame_shift, offset, partial)
        if alternatives > 0:
            texts: dict[str, tuple[list[float], Transcript]] = {}
            for result, hypothesis in sorted(zip(results, self._searches.hypotheses(results)), key=lambda pair: -pair[0].score):
                candidate = self._to_transcript(hypothesis, emissions, frame_shift, offset, partial)
                texts.setdefault(candidate.text, ([], candidate))[0].append(result.score)
            total = _logsumexp([r.score for r in results])
            ranked = sorted(((_logsumexp(scores) - total, candidate) for scores, candidate in texts.values()), key=lambda p: -p[0])
            transcript.alternatives = [Alternative(c.text, min(1.0, math.exp(lp)), c.words) for lp, c in ranked[:alternatives]]
        return transcript

    @property
    def rescores(self) -> bool:
        """Whether this decoder's final results are rescored with an LSTM language model."""
        return self.neural_lm is not None and self.settings.lstm_weight > 0

    def _final_texts(self, results) -> dict[str, tuple[float, object]]:
        """The ``settings.rescored_texts`` best distinct texts of a search: text -> (log-sum of its hypotheses' scores, the best)."""
        ranked = sorted(results, key=lambda r: -r.score)
        texts: dict[str, tuple[list[float], object]] = {}
        for result, hypothesis in zip(ranked, self._searches.hypotheses(ranked)):
            text = " ".join(w for w in hypothesis.words if w != UNK_WORD)
            if text not in texts and len(texts) == self.settings.rescored_texts:
                continue
            texts.setdefault(text, ([], hypothesis))[0].append(result.score)
        return {text: (_logsumexp(scores), hypothesis) for text, (scores, hypothesis) in texts.items()}

    def _char_likelihoods(self, texts: dict, char_log_probs: torch.Tensor | None) -> dict[str, float] | None:
        """log P(text | character frames) of each text; None without character frames. A text the characters cannot
        spell (a hotword with a character the model cannot write) gets -inf."""
        if char_log_probs is None or self.char_vocabulary is None:
            return None
        encoded: dict[str, list[int]] = {}
        for text in texts:
            try:
                encoded[text] = self.char_vocabulary.encode(text)
            except ValueError:
                pass
        likelihoods = dict.fromkeys(texts, -math.inf)
        likelihoods.update(zip(encoded, ctc_log_likelihoods(char_log_probs.detach().float().cpu(), list(encoded.values()))))
        return likelihoods

    def _lstm_scores(self, texts: dict) -> dict[str, float] | None:
        """The LSTM LM's log-probability of each text (None without one)."""
        if self.neural_lm is None:
            return None
        return dict(zip(texts, self.neural_lm.score(list(texts))))

    def _reranked(
        self,
        texts: dict[str, tuple[float, object]],
        emissions: torch.Tensor,
        frame_shift: float,
        offset: float,
        alternatives: int,
        char_likelihoods: dict[str, float] | None,
        lstm_scores: dict[str, float] | None,
        char_weight: float,
        lstm_weight: float,
    ) -> Transcript:
        """Final texts reranked: each scores its search score + ``char_weight`` x log P(text | character frames) +
        ``lstm_weight`` x its LSTM LM log-probability; the N-best confidences are the softmax of these over the texts."""
        # with no text the characters can spell in these frames, the search's order stands
        if char_likelihoods is None or not any(math.isfinite(v) for v in char_likelihoods.values()):
            char_weight = 0.0
        if lstm_scores is None:
            lstm_weight = 0.0
        scored = []
        for text, (score, hypothesis) in texts.items():
            score += char_weight * char_likelihoods[text] if char_weight else 0.0
            score += lstm_weight * lstm_scores[text] if lstm_weight else 0.0
            scored.append((score, hypothesis))
        scored.sort(key=lambda pair: -pair[0])
        transcript = self._to_transcript(scored[0][1], emissions, frame_shift, offset)
        if alternatives > 0:
            total = _logsumexp([score for score, _ in scored])
            transcript.alternatives = []
            for score, hypothesis in scored[:alternatives]:
                candidate = self._to_transcript(hypothesis, emissions, frame_shift, offset)
                transcript.alternatives.append(Alternative(candidate.text, min(1.0, math.exp(score - total)), candidate.words))
        return transcript

    def _to_transcript(self, hypothesis, emissions: torch.Tensor, frame_shift: float, offset: float, partial: bool = False) -> Transcript:
        """A hypothesis' words with times and confidences from its tokens (characters or phones) and their frames.

        With characters a word is its tokens between word boundaries; with phones the words come from the lexicon
        decoder's word sequence, in the same order as their phone groups.
        """
        tokens, steps = hypothesis.tokens, hypothesis.timesteps
        words: list[Word] = []
        ids: list[int] = []
        id_steps: list[int] = []
        space = self.vocabulary.space_id
        spoken = [w for w in hypothesis.words if w != UNK_WORD] if self.units == "phones" else []

        def flush() -> None:
            if ids:
                confidence = float(np.exp(emissions[id_steps, ids].mean().item()))
                start, end = id_steps[0], id_steps[-1] + 1
                if self.units == "phones":
                    text = spoken[len(words)] if len(words) < len(spoken) else ""
                else:
                    text = "".join(self.vocabulary.tokens[i] for i in ids)
                if text:
                    words.append(
                        Word(text, round(offset + start * frame_shift, 3), round(offset + end * frame_shift, 3), round(confidence, 4))
                    )
                ids.clear()
                id_steps.clear()

        for token, step in zip(tokens, steps):
            if token == space:
                flush()
            elif token != 0:
                ids.append(token)
                # flashlight's paths start with an initial silence step, so its timesteps are one frame late
                id_steps.append(min(max(int(step) - 1, 0), emissions.shape[0] - 1))
        flush()
        if self.automaton is not None:
            words = self._grammar_words(words, partial)
        return Transcript(" ".join(w.text for w in words), words, 0.0)

    def _grammar_words(self, words: list[Word], partial: bool) -> list[Word]:
        """Decoded words parsed into the grammar's phrases; garbage runs become one "[unk]" (or nothing without it)."""
        out: list[Word] = []
        previous = ""
        # a final without "[unk]" keeps an unfinished phrase: the best reading rather than nothing (vosk-server does the same)
        unfinished = not partial and not self.grammar.unk
        for first, end, kind in self.automaton.label([w.text for w in words], partial, unfinished):
            if kind != "unk":
                out.extend(words[first:end])
            elif self.grammar.unk:
                covered = words[first:end]
                if previous == "unk":
                    covered = [out.pop(), *covered]
                confidence = round(float(np.mean([w.confidence for w in covered])), 4)
                out.append(Word(UNK, covered[0].start, covered[-1].end, confidence))
            previous = kind
        return out
