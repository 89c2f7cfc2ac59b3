"""Grammars: recognition restricted to a list of phrases (vosk's ``phrase_list``), "[unk]" standing for anything else.

A grammar is decoded by beam search over the acoustic model's characters (``asr.lm``) with a character automaton in
place of a language model. Characters that continue a phrase cost nothing; after a complete phrase, a space starts
the next one (an utterance may hold a sequence of phrases, as in Vosk). With "[unk]" in the grammar, any other word
costs ``unk_penalty`` per character, so it wins only where the audio is clearly none of the phrases; without it,
leaving the grammar costs ``FORBIDDEN``. The first word earns ``empty_penalty`` (CTC models lean to blanks). The
decoded words are then parsed into phrases and "[unk]" (``GrammarAutomaton.label``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .text import DEFAULT_TOKENS, normalize_text

UNK = "[unk]"
MAX_PHRASES = 10000
GARBAGE = "#"  # automaton configuration inside a word of "[unk]" (never a phrase prefix)
START = "^"  # automaton configuration before the first word
FORBIDDEN = 1000.0  # cost (nats) of leaving the grammar when it has no "[unk]"
State = tuple[tuple[str, float], ...]


class GrammarError(ValueError):
    """An unusable grammar: empty, or a phrase the model cannot spell."""


@dataclass(frozen=True)
class Grammar:
    """Normalised phrases (lower case, digits spelled out) and whether "[unk]" may stand for anything else."""

    phrases: tuple[str, ...]
    unk: bool = False

    @classmethod
    def parse(cls, phrases: Iterable[str], tokens: Sequence[str] = DEFAULT_TOKENS) -> Grammar:
        """Validate and normalise phrases; ``tokens`` are the model's characters (its vocabulary)."""
        if isinstance(phrases, str | bytes) or not isinstance(phrases, Iterable):
            raise GrammarError("a grammar is a list of phrases, not a single string")
        phrases = list(phrases)
        if not all(isinstance(p, str) for p in phrases):
            raise GrammarError("grammar phrases must be strings")
        if not phrases:
            raise GrammarError("a grammar needs at least one phrase")
        if len(phrases) > MAX_PHRASES:
            raise GrammarError(f"a grammar may hold at most {MAX_PHRASES} phrases, got {len(phrases)}")
        alphabet = {t for t in tokens if len(t) == 1}
        normalised: dict[str, None] = {}
        unk = False
        for phrase in phrases:
            if phrase.strip().lower() == UNK:
                unk = True
                continue
            text = normalize_text(phrase)
            lost = sorted({c for c in phrase.lower() if c.isalpha() and not ("a" <= c <= "z")} | (set(text) - alphabet))
            if lost:
                raise GrammarError(f"grammar phrase {phrase!r} cannot be spelled with the model's characters: {' '.join(lost)}")
            if not text:
                raise GrammarError(f"grammar phrase {phrase!r} has no words")
            normalised[text] = None
        if not normalised:
            raise GrammarError(f"a grammar needs at least one phrase besides {UNK}")
        return cls(tuple(normalised), unk)


class GrammarAutomaton:
    """Deterministic character automaton of a grammar, for beam search: ``step`` and ``finish`` return costs in nats.

    Underneath is a nondeterministic automaton whose configurations are phrase prefixes ("" between phrases) and
    ``GARBAGE`` (inside a word of "[unk]", entered at a word boundary, left at a space). A state is the set of
    configurations that the text so far can be in, each with its cost above the cheapest (weighted subset
    construction), so the decoder is charged the cost of the best parse of every hypothesis.
    """

    def __init__(self, grammar: Grammar, unk_penalty: float = 2.0, empty_penalty: float = 4.0) -> None:
        self.grammar = grammar
        self.unk_penalty = unk_penalty if grammar.unk else FORBIDDEN
        self.empty_penalty = empty_penalty
        self.phrases = frozenset(grammar.phrases)
        self.prefixes = frozenset(p[:i] for p in grammar.phrases for i in range(len(p) + 1))
        self.phrase_words = {tuple(p.split()) for p in grammar.phrases}
        self.word_prefixes = {words[:i] for words in self.phrase_words for i in range(len(words) + 1)}
        self.start: State = ((START, 0.0),)
        self.step = functools.lru_cache(maxsize=None)(self._step)
        self.finish = functools.lru_cache(maxsize=None)(self._finish)

    def _moves(self, config: str, char: str) -> list[tuple[str, float]]:
        if config == GARBAGE:
            return [("", 0.0)] if char == " " else [(GARBAGE, self.unk_penalty)]
        if char == " " and (config in ("", START) or config.endswith(" ")):
            return [(config, 0.0)]  # leading or repeated spaces
        if config == START:  # the first word earns empty_penalty (up front: its hypotheses survive pruning)
            return [(target, cost - self.empty_penalty) for target, cost in self._moves("", char)]
        moves = [(config + char, 0.0)] if config + char in self.prefixes else []
        if char == " " and config in self.phrases:
            moves.append(("", 0.0))  # the next phrase of a sequence
        if config == "" and self.grammar.unk:
            moves.append((GARBAGE, self.unk_penalty))
        return moves

    def _step(self, state: State, char: str) -> tuple[State, float]:
        """Next state after ``char`` (a letter, apostrophe or space) and its cost."""
        reached: dict[str, float] = {}
        for config, offset in state:
            for target, cost in self._moves(config, char):
                reached[target] = min(reached.get(target, math.inf), offset + cost)
        if not reached:  # no parse left (only without "[unk]"): forbidden, restart between phrases
            return (("", 0.0),), FORBIDDEN
        best = min(reached.values())
        return tuple(sorted((config, round(cost - best, 6)) for config, cost in reached.items())), best

    def _finish(self, state: State) -> float:
        """Cost of ending the utterance in ``state`` (forbidden inside a phrase)."""
        ends = [offset for config, offset in state if config in ("", START, GARBAGE) or config.rstrip(" ") in self.phrases]
        return min(ends, default=FORBIDDEN)

    def label(self, words: Sequence[str], partial: bool = False, unfinished: bool = False) -> list[tuple[int, int, str]]:
        """Parse decoded words into spans ``(first, end, kind)``: kind "phrase", "unk" (garbage) or "prefix".

        The parse has the fewest garbage characters. With ``partial`` (an utterance still in progress), the last span
        may be the start of a phrase, its last word possibly unfinished ("prefix"; ``end`` excludes such a word).
        With ``unfinished`` (a final result), the last span may be the first whole words of a phrase ("prefix"): the
        best reading of audio that ended inside a phrase, as Kaldi's decoder gives it when no state is final.
        """
        n = len(words)
        best: list[tuple[int, int] | None] = [None] * (n + 1)  # (garbage characters, spans) per position
        back: list[tuple[int, int, str] | None] = [None] * (n + 1)
        best[0] = (0, 0)

        def offer(start: int, end: int, shown: int, kind: str, cost: int) -> None:
            candidate = (best[start][0] + cost, best[start][1] + 1)
            if best[end] is None or candidate < best[end]:
                best[end], back[end] = candidate, (start, shown, kind)

        for i in range(n):
            if best[i] is None:
                continue
            offer(i, i + 1, i + 1, "unk", len(words[i]))
            for j in range(i + 1, n + 1):
                span = tuple(words[i:j])
                if span in self.phrase_words:
                    offer(i, j, j, "phrase", 0)
                if (partial or unfinished) and j == n and span in self.word_prefixes:
                    offer(i, j, j, "prefix", 0)
                elif partial and j == n and self._unfinished_word(span):
                    offer(i, j, j - 1, "prefix", 0)
                if span not in self.word_prefixes:
                    break
        spans = []
        end = n
        while end > 0:
            start, shown, kind = back[end]
            spans.append((start, shown, kind))
            end = start
        return spans[::-1]

    def _unfinished_word(self, span: tuple[str, ...]) -> bool:
        """Whether ``span`` is the start of a phrase whose last word is still being spoken (a prefix of the phrase's word)."""
        done, last = span[:-1], span[-1]
        return done in self.word_prefixes and any(
            len(p) > len(done) and p[: len(done)] == done and p[len(done)].startswith(last) for p in self.phrase_words
        )
