"""Character vocabulary and the text normaliser shared by transcripts and language models."""

from __future__ import annotations

import re
import string

BLANK = "<blank>"
DEFAULT_TOKENS: tuple[str, ...] = (BLANK, " ", "'", *string.ascii_lowercase)

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**9, "billion"), (10**6, "million"), (1000, "thousand"), (100, "hundred"))


def number_to_words(number: int) -> str:
    """Spell a non-negative integer: 42 -> 'forty two'."""
    if number < 20:
        return _ONES[number]
    if number < 100:
        tens, ones = divmod(number, 10)
        return _TENS[tens] + (f" {_ONES[ones]}" if ones else "")
    for value, name in _SCALES:
        if number >= value:
            head, rest = divmod(number, value)
            return f"{number_to_words(head)} {name}" + (f" {number_to_words(rest)}" if rest else "")
    raise AssertionError("unreachable")


def normalize_text(text: str) -> str:
    """Lower-case a-z, apostrophes and single spaces; digits spelled out, hyphens to spaces."""
    text = text.lower().replace("\u2019", "'").replace("-", " ")
    text = re.sub(r"\d+", lambda m: f" {number_to_words(int(m.group()))} " if len(m.group()) < 12 else " ", text)
    text = re.sub(r"[^a-z' ]+", " ", text)
    text = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text)  # quotes, not contractions
    return " ".join(text.split())


class Vocabulary:
    """Maps characters to CTC token ids; id 0 is the blank."""

    def __init__(self, tokens: tuple[str, ...] | list[str] = DEFAULT_TOKENS) -> None:
        tokens = tuple(tokens)
        if not tokens or tokens[0] != BLANK or len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary must start with the blank token and have no duplicates")
        self.tokens = tokens
        self._index = {token: i for i, token in enumerate(tokens)}
        self.space_id = self._index.get(" ")

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Normalised text -> token ids; unknown characters are an error."""
        try:
            return [self._index[ch] for ch in text]
        except KeyError as error:
            raise ValueError(f"character {error.args[0]!r} is not in the vocabulary (normalise the text first)") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.tokens[i] for i in ids if i != 0)
