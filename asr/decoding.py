"""CTC decoding to text with per-word times and confidences."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .text import Vocabulary


@dataclass(frozen=True)
class Word:
    text: str
    start: float  # seconds
    end: float  # seconds
    confidence: float  # 0..1


@dataclass
class Alternative:
    """One entry of an N-best list."""

    text: str
    confidence: float  # 0..1: the hypothesis' share of the probability mass in the decoder's beam
    words: list[Word] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"text": self.text, "confidence": self.confidence, "words": [asdict(w) for w in self.words]}


@dataclass
class Segment:
    """One decoded stretch of a recording between pauses (``asr.segmenter``); times in seconds from its start."""

    index: int  # among the recording's segments with words
    start: float
    end: float
    text: str
    words: list[Word] = field(default_factory=list)
    alternatives: list[Alternative] = field(default_factory=list)
    formatted_text: str | None = None  # cased and punctuated (``asr.punctuation``), when asked for

    def to_dict(self) -> dict:
        data = {"start": self.start, "end": self.end, "text": self.text}
        if self.formatted_text is not None:
            data["formatted_text"] = self.formatted_text
        if self.alternatives:
            data["alternatives"] = [{"text": a.text, "confidence": a.confidence} for a in self.alternatives]
        return data


@dataclass
class Transcript:
    text: str
    words: list[Word] = field(default_factory=list)
    duration: float = 0.0  # seconds of audio
    alternatives: list[Alternative] = field(default_factory=list)  # N-best, most likely first, when asked for
    segments: list[Segment] = field(default_factory=list)  # the stretches between pauses that were decoded one by one
    formatted_words: list[str] | None = None  # each word cased and punctuated (``asr.punctuation``), when asked for

    @property
    def formatted_text(self) -> str | None:
        """The transcript cased and punctuated, or None when it was not punctuated."""
        return None if self.formatted_words is None else " ".join(self.formatted_words)

    @property
    def display_text(self) -> str:
        """What a person reads: the formatted text when there is one, else the recogniser's words."""
        return self.text if self.formatted_words is None else self.formatted_text

    def to_dict(self) -> dict:
        """text, duration, words (text, start, end, confidence; and formatted), alternatives, segments; and formatted_text."""
        data = {"text": self.text, "duration": self.duration, "words": [asdict(w) for w in self.words]}
        if self.formatted_words is not None:
            data = {"text": self.text, "formatted_text": self.formatted_text, **data}
            for entry, formatted in zip(data["words"], self.formatted_words):
                entry["formatted"] = formatted
        if self.alternatives:
            data["alternatives"] = [a.to_dict() for a in self.alternatives]
        if self.segments:
            data["segments"] = [s.to_dict() for s in self.segments]
        return data


def check_alternatives(value: object) -> int:
    """A valid N-best size (an int >= 0; 0: no alternatives), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"alternatives must be a whole number >= 0, got {value!r}")
    return value


WORD_BREAK_PAUSE = 0.3  # seconds of blanks that separate words even when no space was emitted


def greedy_decode(
    log_probs: torch.Tensor, vocabulary: Vocabulary, frame_shift: float, offset: float = 0.0, word_break_pause: float = WORD_BREAK_PAUSE
) -> Transcript:
    """Best path of log_probs (frames, vocab): collapse repeats, drop blanks, split words at spaces and pauses.

    A word spans from the first frame of its first character to the end of the last frame of its
    last character; its confidence is the geometric mean of the best-path posteriors of its characters.
    """
    if log_probs.ndim != 2:
        raise ValueError(f"log_probs must be (frames, vocab), got {tuple(log_probs.shape)}")
    best, ids = log_probs.float().max(dim=-1)
    ids_np, best_np = ids.cpu().numpy(), best.cpu().numpy()
    words: list[Word] = []
    chars: list[str] = []
    scores: list[float] = []
    start = end = 0
    previous = 0

    def flush() -> None:
        if chars:
            confidence = float(np.exp(np.mean(scores)))
            words.append(
                Word("".join(chars), round(offset + start * frame_shift, 3), round(offset + end * frame_shift, 3), round(confidence, 4))
            )
            chars.clear()
            scores.clear()

    pause_frames = max(1, round(word_break_pause / frame_shift))
    for t, token in enumerate(ids_np):
        token = int(token)
        if token != 0 and chars and t - end >= pause_frames:
            flush()
        if token != 0 and token == previous:
            if token != vocabulary.space_id:  # a repeated frame extends the current character
                end = t + 1
                scores[-1] = max(scores[-1], float(best_np[t]))
        elif token != 0:
            if token == vocabulary.space_id:
                flush()
            else:
                if not chars:
                    start = t
                chars.append(vocabulary.tokens[token])
                scores.append(float(best_np[t]))
                end = t + 1
        previous = token
    flush()
    return Transcript(" ".join(w.text for w in words), words, 0.0)
