"""The one module that talks to flashlight-text's CTC beam-search decoder (its public API; tested with 0.0.7).

Everything the project's decoders need from flashlight lives here: token and word dictionaries, lexicons, the lexicon
trie, KenLM, custom language models (hotwords, grammars), the lexicon and lexicon-free searches, and turning search
results into hypotheses. flashlight-text is imported lazily, so the greedy decoder works without it; when it is
missing, ``FlashlightUnavailable`` says how to install it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

INSTALL = "pip install 'flashlight-text>=0.0.7,<0.1'"


class FlashlightUnavailable(ImportError):
    """flashlight-text (or its KenLM) cannot be imported."""


@functools.cache
def _api():
    """flashlight-text's decoder and dictionary modules and its KenLM class."""
    try:
        from flashlight.lib.text import decoder, dictionary
    except ImportError as error:
        raise FlashlightUnavailable(f"beam-search decoding needs flashlight-text ({error}): {INSTALL}") from None
    kenlm = getattr(decoder, "KenLM", None)
    if kenlm is None:
        try:
            from flashlight.lib.text.decoder.kenlm import KenLM as kenlm
        except ImportError:
            kenlm = None
    return decoder, dictionary, kenlm


def lm_base() -> type:
    """The class a custom language model subclasses: start(start_with_nothing) -> state, score(state, word index) ->
    (state, score), finish(state) -> (state, score); states are ``new_lm_state()`` objects."""
    return _api()[0].LM


def new_lm_state():
    return _api()[0].LMState()


class Hypothesis(NamedTuple):
    """One search result: token ids without blanks and repeats, their frames, the lexicon's words, the total score."""

    tokens: list[int]
    timesteps: list[int]
    words: list[str]
    score: float


class Tokens:
    """The search's token dictionary (the blank and word boundary named as flashlight expects)."""

    def __init__(self, tokens: list[str]) -> None:
        self.dictionary = _api()[1].Dictionary(tokens)
        self.size = len(tokens)

    def index(self, token: str) -> int:
        return self.dictionary.get_index(token)


def load_lexicon(path: str) -> dict[str, list[list[str]]]:
    """A lexicon file (word, then its tokens, a spelling a line) -> word -> spellings."""
    return _api()[1].load_words(path)


def kenlm(model_file: str, words) -> object:
    """A KenLM model (binary or ARPA) over a word dictionary."""
    kenlm_class = _api()[2]
    if kenlm_class is None:
        raise FlashlightUnavailable(f"this flashlight-text was built without KenLM: {INSTALL}")
    return kenlm_class(model_file, words)


def zero_lm() -> object:
    return _api()[0].ZeroLM()


@dataclass(frozen=True)
class SearchOptions:
    beam_size: int
    beam_size_token: int
    beam_threshold: float
    lm_weight: float
    log_add: bool = False
    word_score: float = 0.0  # lexicon search only
    unk_score: float = float("-inf")  # lexicon search only


class SearchFactory:
    """Makes independent searches over one lexicon trie and LM (built once; a new search is cheap)."""

    def __init__(self, new_search: Callable[[], object], words, blank: int) -> None:
        self._new_search, self.words, self.blank = new_search, words, blank

    def new(self) -> Search:
        return Search(self._new_search(), self)

    def hypotheses(self, results) -> list[Hypothesis]:
        return [self._hypothesis(result) for result in results]

    def _hypothesis(self, result) -> Hypothesis:
        steps = list(result.tokens)
        tokens, timesteps = [], []
        previous = None
        for frame, token in enumerate(steps):
            if token != previous and token != self.blank:
                tokens.append(token)
                timesteps.append(frame)
            previous = token
        words = [self.words.get_entry(w) for w in result.words if w >= 0] if self.words is not None else []
        return Hypothesis(tokens, timesteps, words, result.score)


def word_dictionary(lexicon: dict[str, list[list[str]]]):
    """The word dictionary of a lexicon (indices a KenLM and the trie share)."""
    return _api()[1].create_word_dict(lexicon)


def lexicon_search(
    tokens: Tokens, lexicon: dict[str, list[list[str]]], words, lm, options: SearchOptions, silence: int, blank: int, unknown_word: str
) -> SearchFactory:
    """A lexicon search (``words``: ``word_dictionary(lexicon)``, spelled in ``tokens``) scored by ``lm`` (a KenLM over
    the same word dictionary, or an LM wrapping one)."""
    decoder = _api()[0]
    trie = decoder.Trie(tokens.size, silence)
    start = lm.start(False)
    for word, spellings in lexicon.items():
        index = words.get_index(word)
        _, score = lm.score(start, index)
        for spelling in spellings:
            trie.insert([tokens.index(token) for token in spelling], index, score)
    trie.smear(decoder.SmearingMode.MAX)
    flashlight_options = decoder.LexiconDecoderOptions(
        beam_size=options.beam_size,
        beam_size_token=options.beam_size_token,
        beam_threshold=options.beam_threshold,
        lm_weight=options.lm_weight,
        word_score=options.word_score,
        unk_score=options.unk_score,
        sil_score=0.0,
        log_add=options.log_add,
        criterion_type=decoder.CriterionType.CTC,
    )
    unknown = words.get_index(unknown_word)
    return SearchFactory(lambda: decoder.LexiconDecoder(flashlight_options, trie, lm, silence, blank, unknown, [], False), words, blank)


def lexicon_free_search(lm, options: SearchOptions, silence: int, blank: int) -> SearchFactory:
    """A search over token sequences (no lexicon), scored by ``lm`` over tokens (``zero_lm()``: none)."""
    decoder = _api()[0]
    flashlight_options = decoder.LexiconFreeDecoderOptions(
        beam_size=options.beam_size,
        beam_size_token=options.beam_size_token,
        beam_threshold=options.beam_threshold,
        lm_weight=options.lm_weight,
        sil_score=0.0,
        log_add=options.log_add,
        criterion_type=decoder.CriterionType.CTC,
    )
    return SearchFactory(lambda: decoder.LexiconFreeDecoder(flashlight_options, lm, silence, blank, []), None, blank)


class Search:
    """One search's state: a whole utterance at once (``decode``), or frames as they come (``begin``/``step``/``end``)."""

    def __init__(self, search, factory: SearchFactory) -> None:
        self._search, self.factory = search, factory

    def decode(self, emissions: torch.Tensor) -> list:
        """emissions (frames, tokens) float32, CPU, contiguous -> flashlight's results."""
        return self._search.decode(emissions.data_ptr(), emissions.shape[0], emissions.shape[1])

    def begin(self) -> None:
        self._search.decode_begin()

    def step(self, emissions: torch.Tensor) -> None:
        """The next frames (frames, tokens) float32, CPU, contiguous."""
        self._search.decode_step(emissions.data_ptr(), emissions.shape[0], emissions.shape[1])

    def end(self) -> None:
        self._search.decode_end()

    def results(self) -> list:
        """Every hypothesis of the search so far (sorted by score only after ``end``)."""
        return self._search.get_all_final_hypothesis()

    def hypotheses(self, results) -> list[Hypothesis]:
        return self.factory.hypotheses(results)
