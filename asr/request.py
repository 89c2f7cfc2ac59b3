"""What one request (a file, a stream, a connection) asks of a recogniser beyond the recogniser's own options.

``RequestOptions`` is what a caller gives: every field None means "the recogniser's own". ``Recognizer.resolve``
turns it into a ``Request`` with every field decided, once; the request then travels whole to the segment decoder
and the search.
"""

from __future__ import annotations

from dataclasses import dataclass

from .decoding import check_alternatives
from .grammar import Grammar


@dataclass(frozen=True)
class RequestOptions:
    """hotwords: words or phrases to favour in beam search; grammar: phrases (and "[unk]") the output is restricted
    to; alternatives: N-best entries per result; lstm: rescore finals with the LSTM LM; punctuate: also give the words
    cased and punctuated. None: the recogniser's own setting."""

    hotwords: tuple[str, ...] | None = None
    grammar: Grammar | tuple[str, ...] | None = None
    alternatives: int | None = None
    lstm: bool | None = None
    punctuate: bool | None = None

    def __post_init__(self) -> None:
        if self.hotwords is not None and self.grammar is not None:
            raise ValueError("give a grammar or hotwords, not both")
        if self.hotwords is not None:
            object.__setattr__(self, "hotwords", tuple(self.hotwords))
        if isinstance(self.grammar, list):  # hashable; anything else is Grammar.parse's to judge
            object.__setattr__(self, "grammar", tuple(self.grammar))
        if self.alternatives is not None:
            check_alternatives(self.alternatives)
        for name in ("lstm", "punctuate"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be True, False or None, got {value!r}")


@dataclass(frozen=True)
class Request:
    """A request with every setting decided (``Recognizer.resolve``); ``grammar`` parsed against the model."""

    hotwords: tuple[str, ...] = ()
    grammar: Grammar | None = None
    alternatives: int = 0
    lstm: bool = True
    punctuate: bool = False
