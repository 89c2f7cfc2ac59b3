"""Transcript output formats: txt, json, srt, vtt, tsv; cased and punctuated where the transcript has formatted words."""

from __future__ import annotations

import json

from .decoding import Transcript, Word

FORMATS = ("txt", "json", "srt", "vtt", "tsv")
MAX_CUE_SECONDS = 6.0
MAX_CUE_CHARS = 84
CUE_BREAK_GAP = 1.0  # a pause this long starts a new cue
MIN_SENTENCE_CUE_CHARS = 24  # a cue this long ends where a sentence does


def cues(words: list[Word], texts: list[str] | None = None) -> list[list[int]]:
    """Group words into subtitle cues (lists of word indices), breaking at pauses, length and duration limits.

    ``texts``: what is shown for each word (cased and punctuated), default the words' own. A cue ends at a sentence
    end once it holds ``MIN_SENTENCE_CUE_CHARS``; a cue that must break keeps its last sentence end when it has one.
    """
    texts = texts or [w.text for w in words]
    groups: list[list[int]] = []
    for i, word in enumerate(words):
        current = groups[-1] if groups else None
        if current is not None and word.start - words[current[-1]].end < CUE_BREAK_GAP and not _sentence_break(current, texts):
            if _fits(current + [i], words, texts):
                current.append(i)
                continue
            cut = _last_sentence_end(current, texts)
            if cut is not None and _fits(current[cut:] + [i], words, texts):
                groups[-1], tail = current[:cut], current[cut:]
                groups.append(tail + [i])
                continue
        groups.append([i])
    return groups


def _fits(group: list[int], words: list[Word], texts: list[str]) -> bool:
    chars = sum(len(texts[i]) for i in group) + len(group) - 1
    return words[group[-1]].end - words[group[0]].start <= MAX_CUE_SECONDS and chars <= MAX_CUE_CHARS


def _ends_sentence(text: str) -> bool:
    return text.endswith((".", "?", "!"))


def _sentence_break(group: list[int], texts: list[str]) -> bool:
    """The cue ends a sentence and is long enough to stand alone."""
    return _ends_sentence(texts[group[-1]]) and sum(len(texts[i]) + 1 for i in group) >= MIN_SENTENCE_CUE_CHARS


def _last_sentence_end(group: list[int], texts: list[str]) -> int | None:
    """Where the cue's last sentence after its first word begins (an index into ``group``), or None."""
    return next((k + 1 for k in range(len(group) - 2, -1, -1) if _ends_sentence(texts[group[k]])), None)


def _timestamp(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _subtitles(transcript: Transcript, separator: str) -> list[tuple[str, str, str]]:
    out, words = [], transcript.words
    texts = transcript.formatted_words or [w.text for w in words]
    for group in cues(words, texts):
        start, end = words[group[0]].start, max(words[group[-1]].end, words[group[0]].start + 0.001)
        out.append((_timestamp(start, separator), _timestamp(end, separator), " ".join(texts[i] for i in group)))
    return out


def format_transcript(transcript: Transcript, fmt: str, source: str = "") -> str:
    """Render a transcript in one of ``FORMATS``; ``source`` names the audio in json output."""
    if fmt == "txt":
        return transcript.display_text + "\n"
    if fmt == "json":
        return json.dumps({"audio": source, **transcript.to_dict()}, indent=2) + "\n"
    if fmt == "srt":
        return "".join(f"{i}\n{a} --> {b}\n{text}\n\n" for i, (a, b, text) in enumerate(_subtitles(transcript, ","), 1))
    if fmt == "vtt":
        return "WEBVTT\n\n" + "".join(f"{a} --> {b}\n{text}\n\n" for a, b, text in _subtitles(transcript, "."))
    if fmt == "tsv":
        rows = [f"{w.start:.3f}\t{w.end:.3f}\t{w.confidence:.4f}\t{w.text}" for w in transcript.words]
        if transcript.formatted_words is None:
            return "start\tend\tconfidence\tword\n" + "".join(r + "\n" for r in rows)
        return "start\tend\tconfidence\tword\tformatted\n" + "".join(f"{r}\t{f}\n" for r, f in zip(rows, transcript.formatted_words))
    raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
