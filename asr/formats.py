"""Transcript output formats: txt, json, srt, vtt, tsv."""

from __future__ import annotations

import json

from .decoding import Transcript, Word

FORMATS = ("txt", "json", "srt", "vtt", "tsv")
MAX_CUE_SECONDS = 6.0
MAX_CUE_CHARS = 84
CUE_BREAK_GAP = 1.0  # a pause this long starts a new cue


def cues(words: list[Word]) -> list[list[Word]]:
    """Group words into subtitle cues, breaking at pauses, length and duration limits."""
    groups: list[list[Word]] = []
    for word in words:
        if groups:
            current = groups[-1]
            chars = sum(len(w.text) + 1 for w in current) + len(word.text)
            if word.start - current[-1].end < CUE_BREAK_GAP and word.end - current[0].start <= MAX_CUE_SECONDS and chars <= MAX_CUE_CHARS:
                current.append(word)
                continue
        groups.append([word])
    return groups


def _timestamp(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _subtitles(transcript: Transcript, separator: str) -> list[tuple[str, str, str]]:
    out = []
    for group in cues(transcript.words):
        start, end = group[0].start, max(group[-1].end, group[0].start + 0.001)
        out.append((_timestamp(start, separator), _timestamp(end, separator), " ".join(w.text for w in group)))
    return out


def format_transcript(transcript: Transcript, fmt: str, source: str = "") -> str:
    """Render a transcript in one of ``FORMATS``; ``source`` names the audio in json output."""
    if fmt == "txt":
        return transcript.text + "\n"
    if fmt == "json":
        return json.dumps({"audio": source, **transcript.to_dict()}, indent=2) + "\n"
    if fmt == "srt":
        return "".join(f"{i}\n{a} --> {b}\n{text}\n\n" for i, (a, b, text) in enumerate(_subtitles(transcript, ","), 1))
    if fmt == "vtt":
        return "WEBVTT\n\n" + "".join(f"{a} --> {b}\n{text}\n\n" for a, b, text in _subtitles(transcript, "."))
    if fmt == "tsv":
        rows = [f"{w.start:.3f}\t{w.end:.3f}\t{w.confidence:.4f}\t{w.text}" for w in transcript.words]
        return "start\tend\tconfidence\tword\n" + "".join(r + "\n" for r in rows)
    raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
