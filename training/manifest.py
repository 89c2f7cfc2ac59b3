"""JSONL manifests (one utterance per line) and converters from other corpus layouts."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

from asr.text import normalize_text

AUDIO_EXTENSIONS = (".flac", ".wav", ".opus", ".ogg", ".mp3")


class ManifestError(ValueError):
    """Raised for an unreadable manifest or a malformed line."""


@dataclass(frozen=True)
class Utterance:
    audio: Path  # absolute path
    duration: float  # seconds
    text: str  # normalised transcript
    speaker: str = ""
    raw_text: str = ""


def read_manifest(path: str | os.PathLike) -> list[Utterance]:
    """Read a JSONL manifest; ``audio`` paths are relative to the manifest's folder."""
    return [utt for utt, _ in read_manifest_entries(path)]


def read_manifest_entries(path: str | os.PathLike) -> list[tuple[Utterance, dict]]:
    """Like ``read_manifest``, with each line's own JSON object (every field, as written) beside its utterance."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    root = path.resolve().parent
    utterances = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                raw = str(entry.get("raw_text", entry["text"]))
                utterance = Utterance(
                    audio=(root / entry["audio"]).resolve(),
                    duration=float(entry["duration"]),
                    text=normalize_text(str(entry["text"])),
                    speaker=str(entry.get("speaker", "")),
                    raw_text=raw,
                )
                utterances.append((utterance, entry))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise ManifestError(f"{path}:{number}: bad manifest line ({error})") from error
    if not utterances:
        raise ManifestError(f"manifest {path} has no utterances")
    return utterances


def write_manifest(utterances: Iterable[Utterance], path: str | os.PathLike) -> int:
    """Write utterances as JSONL with audio paths relative to the manifest; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.resolve().parent
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for utt in utterances:
            audio = os.path.relpath(utt.audio, root)
            info = {"audio": audio, "duration": round(utt.duration, 3), "text": utt.text, "raw_text": utt.raw_text, "speaker": utt.speaker}
            handle.write(json.dumps(info) + "\n")
            count += 1
    return count


def _duration(path: Path) -> float:
    try:
        return sf.info(str(path)).duration
    except Exception as error:  # soundfile raises several types for unreadable files
        raise ManifestError(f"cannot read audio {path}: {error}") from error


def from_librispeech(root: str | os.PathLike) -> list[Utterance]:
    """Utterances of a LibriSpeech-style tree: */*/<spk>-<chapter>.trans.txt beside the audio files."""
    root = Path(root)
    transcripts = sorted(root.rglob("*.trans.txt"))
    if not transcripts:
        raise ManifestError(f"no *.trans.txt files under {root}")
    utterances = []
    for trans in transcripts:
        for line in trans.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            utt_id, _, raw = line.partition(" ")
            audio = next((trans.parent / (utt_id + ext) for ext in AUDIO_EXTENSIONS if (trans.parent / (utt_id + ext)).is_file()), None)
            if audio is None:
                raise ManifestError(f"{trans}: no audio file for {utt_id}")
            utterances.append(Utterance(audio.resolve(), _duration(audio), normalize_text(raw), utt_id.split("-")[0], raw))
    return utterances


def from_table(path: str | os.PathLike, audio_column: str = "path", text_column: str = "sentence") -> list[Utterance]:
    """Utterances from a TSV or CSV file with a header (e.g. Common Voice's ``path``/``sentence``).

    Relative audio paths are resolved against the table's folder, then its ``clips/`` subfolder.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"table not found: {path}")
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    utterances = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        missing = {audio_column, text_column} - set(reader.fieldnames or ())
        if missing:
            raise ManifestError(f"{path}: missing column(s) {sorted(missing)}; have {reader.fieldnames}")
        for row in reader:
            audio = Path(row[audio_column])
            if not audio.is_absolute():
                audio = next((c for c in (path.parent / audio, path.parent / "clips" / audio) if c.is_file()), path.parent / audio)
            if not audio.is_file():
                raise ManifestError(f"{path}: audio file not found: {audio}")
            raw = row[text_column]
            utterances.append(
                Utterance(audio.resolve(), _duration(audio), normalize_text(raw), row.get("client_id", row.get("speaker", "")) or "", raw)
            )
    return utterances
