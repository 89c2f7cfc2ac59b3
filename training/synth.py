"""Synthetic training speech: sentences from text files rendered by every installed offline English voice.

``synthesize`` draws sentences (seeded) from plain-text files, leaves out any that appear in the ``exclude`` manifests,
renders an equal share of the requested hours with each engine (``training.tts``), a random voice, speaking rate and
pitch per utterance, and writes ``train.jsonl`` (the ordinary manifest format) beside ``audio/``. Audio files are named
by a hash of what they say and how, so a rerun reuses them: the command is idempotent and resumes where it stopped.
"""

from __future__ import annotations

import concurrent.futures as futures
import gzip
import hashlib
import json
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import soundfile as sf

from asr.text import normalize_text

from .manifest import ManifestError, read_manifest
from .tts import ENGINES, SAMPLE_RATE, Job, VoiceReport, audio_extension, discover_voices, render_jobs

BATCH = {"festival": 8, "piper": 4, "espeak": 4, "flite": 4}
# Characters a sentence may hold: letters, spaces, and punctuation the engines read as pauses or intonation. Anything
# else (digits, symbols, accented letters) is read differently by the engines and by the normaliser, so it is skipped.
_ALLOWED = re.compile(r"[A-Za-z ,.;:!?'\"\u2018\u2019\u201c\u201d\-\u2013\u2014\u2015()]+")
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u2019\u201d)]*\s+(?=[\"'\u2018\u201c(]*[A-Z])")
_CLAUSE = re.compile(r"\s*(?:[;:]|--|[\u2013\u2014\u2015]+)\s*")
_ABBREVIATION = re.compile(
    r"\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Messrs|Mme|Mlle|Capt|Col|Gen|Lt|Sgt|Rev|Hon|Prof|Gov|Sen|Rep|Vol|Ch|Co|Inc|Ltd|vs|etc|viz|cf|ibid)\.",
)
_ABBREVIATION_END = re.compile(_ABBREVIATION.pattern + "$")
_INITIAL = re.compile(r"(?:^|\s)[A-HJ-Z]\.$")  # a sentence cut after an initial ("J. Smith")
_DOTTED = re.compile(r"[A-Za-z]\.[A-Za-z]")  # e.g., U.S., v.t.
_CAPS = re.compile(r"\b[A-Z]{2,}\b")  # acronyms and roman numerals are spelled or read unlike their normalised form


class SynthError(ValueError):
    """Raised when nothing can be synthesised: no voices, no usable text, bad settings."""


@dataclass(frozen=True)
class SynthConfig:
    texts: tuple[str, ...]
    output_dir: str
    hours: float = 1.0
    voices: tuple[str, ...] = ("all",)  # engine names, voice-id prefixes (espeak:en-gb, flite:slt), or "all"
    seed: int = 1
    exclude: tuple[str, ...] = ()  # manifests whose transcripts must never be rendered (dev and test sets)
    jobs: int = 1
    rate: tuple[float, float] = (0.85, 1.2)  # speaking-rate factor, > 1 faster
    pitch: tuple[float, float] = (0.85, 1.2)  # F0 factor
    min_words: int = 3
    max_words: int = 25


@dataclass
class EngineStats:
    utterances: int = 0
    seconds: float = 0.0
    rendered: int = 0  # newly rendered in this run (the rest existed)
    render_seconds: float = 0.0  # wall time spent rendering them
    rendered_audio_seconds: float = 0.0
    failed: int = 0
    voices: dict[str, float] = field(default_factory=dict)  # voice id -> seconds
    errors: list[str] = field(default_factory=list)

    @property
    def speed(self) -> float:
        """Audio seconds per wall second of rendering (per process)."""
        return self.rendered_audio_seconds / self.render_seconds if self.render_seconds else 0.0


@dataclass
class SynthReport:
    voices: VoiceReport
    engines: dict[str, EngineStats]
    manifest: Path
    excluded: int  # candidate sentences dropped because an exclude manifest holds them
    sentences_used: int
    ran_out_of_text: bool = False

    def to_dict(self) -> dict:
        return {
            "manifest": str(self.manifest),
            "voices_found": self.voices.found,
            "voices_missing": self.voices.missing,
            "excluded_sentences": self.excluded,
            "sentences_used": self.sentences_used,
            "ran_out_of_text": self.ran_out_of_text,
            "engines": {name: {**asdict(s), "speed": round(s.speed, 2)} for name, s in self.engines.items()},
        }


# ---------------------------------------------------------------------------------------------------------------- text


def read_lines(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Non-empty lines of plain-text files (.gz read compressed)."""
    lines: list[str] = []
    for path in paths:
        path = Path(path)
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
                lines.extend(line.strip() for line in handle if line.strip())
        except OSError as error:
            raise SynthError(f"cannot read {path}: {error}") from error
    return lines


def split_sentences(paragraph: str, max_words: int = 25) -> list[str]:
    """Sentences of a paragraph; a sentence longer than ``max_words`` is cut at semicolons, colons and dashes."""
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(paragraph):
        piece = paragraph[start : match.end()].strip()
        if _ABBREVIATION_END.search(piece) or _INITIAL.search(piece):
            continue  # "Mr. Smith", "J. Smith": not a sentence end
        pieces.append(piece)
        start = match.end()
    pieces.append(paragraph[start:].strip())
    sentences = []
    for piece in pieces:
        if len(piece.split()) > max_words:
            sentences.extend(p.strip() for p in _CLAUSE.split(piece))
        else:
            sentences.append(piece)
    return [s for s in sentences if s]


def speakable(sentence: str, min_words: int = 3, max_words: int = 25) -> str | None:
    """The normalised text of a sentence that every engine reads as the normaliser writes it, else None."""
    if not _ALLOWED.fullmatch(sentence) or _ABBREVIATION.search(sentence) or _DOTTED.search(sentence) or _INITIAL.search(sentence):
        return None
    if _CAPS.search(sentence):
        return None
    text = normalize_text(sentence)
    return text if min_words <= len(text.split()) <= max_words else None


class Exclusions:
    """Normalised transcripts that must not be rendered: a sentence is excluded when it equals one, lies within one
    (five words or more: shorter ones are common phrases), or holds one of four words or more."""

    def __init__(self, texts: Iterable[str]) -> None:
        texts = {t for t in texts if t}
        self.exact = texts
        self.blob = " " + " | ".join(sorted(texts)) + " "
        self.long = sorted({t for t in texts if len(t.split()) >= 4})
        self.dropped = 0  # sentences found here by sentence_stream

    @classmethod
    def from_manifests(cls, manifests: Sequence[str | os.PathLike]) -> Exclusions:
        try:
            return cls(u.text for m in manifests for u in read_manifest(m))
        except ManifestError as error:
            raise SynthError(f"exclude: {error}") from error

    def __contains__(self, text: str) -> bool:
        if text in self.exact or (text.count(" ") >= 4 and f" {text} " in self.blob):
            return True
        padded = f" {text} "
        return any(f" {t} " in padded for t in self.long)


def sentence_stream(lines: Sequence[str], seed: int, exclusions: Exclusions, min_words: int, max_words: int) -> Iterator[tuple[str, str]]:
    """(raw, normalised) sentences from the lines in a seeded random order, each normalised text once; sentences in
    ``exclusions`` are counted in its ``dropped``."""
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    seen: set[str] = set()
    for index in order:
        for sentence in split_sentences(lines[index], max_words):
            text = speakable(sentence, min_words, max_words)
            if text is None or text in seen:
                continue
            seen.add(text)
            if text in exclusions:
                exclusions.dropped += 1
                continue
            yield sentence, text


# -------------------------------------------------------------------------------------------------------------- voices


def select_voices(spec: Sequence[str], report: VoiceReport) -> dict[str, list[str]]:
    """Voices per engine matching ``spec`` (``all``, engine names, or voice-id prefixes such as ``espeak:en-gb``)."""
    wanted = [s.strip() for item in spec for s in item.split(",") if s.strip()]
    if not wanted or "all" in wanted:
        return {e: v for e, v in report.found.items() if v}
    selected: dict[str, list[str]] = {}
    for token in wanted:
        engine = token.split(":", 1)[0]
        if engine not in ENGINES:
            raise SynthError(f"unknown voice {token!r}: use all, {', '.join(ENGINES)}, or a voice id such as espeak:en-us+f3")
        matches = [v for v in report.found.get(engine, []) if ":" not in token or v == token or v.startswith(token)]
        for voice in matches:
            selected.setdefault(engine, [])
            if voice not in selected[engine]:
                selected[engine].append(voice)
    return selected


def requested_engines(spec: Sequence[str]) -> list[str]:
    wanted = [s.strip().split(":", 1)[0] for item in spec for s in item.split(",") if s.strip()]
    if not wanted or "all" in wanted:
        return list(ENGINES)
    return [e for e in ENGINES if e in wanted] + [w for w in dict.fromkeys(wanted) if w not in ENGINES]


# ----------------------------------------------------------------------------------------------------------- rendering


def _timed_render(jobs: Sequence[Job], seed: int) -> tuple[list[float | str], float]:
    start = time.perf_counter()
    results = render_jobs(jobs, seed)
    return results, time.perf_counter() - start


class _Inline:
    """A stand-in for an executor that renders in this process (``jobs`` = 1)."""

    def submit(self, fn, *args) -> futures.Future:
        future: futures.Future = futures.Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def _job_path(root: Path, engine: str, voice: str, text: str, rate: float, pitch: float, ext: str) -> str:
    digest = hashlib.sha1(f"{voice}|{rate}|{pitch}|{text}".encode()).hexdigest()[:16]
    return str(root / "audio" / engine / (digest + ext))


def _check(config: SynthConfig) -> None:
    if config.hours <= 0:
        raise SynthError("hours must be positive")
    if not (0 < config.rate[0] <= config.rate[1]) or not (0 < config.pitch[0] <= config.pitch[1]):
        raise SynthError("rate and pitch ranges must be positive, low to high")
    if not 1 <= config.min_words <= config.max_words:
        raise SynthError("need 1 <= min_words <= max_words")


class SentencePool:
    """The sentence stream dealt out to the engines: sentence k goes to engine k % engines, in a fixed order."""

    def __init__(self, sentences: Iterator[tuple[str, str]], engines: int) -> None:
        self._sentences, self._engines, self._pool = sentences, engines, []

    def get(self, index: int, engine_number: int) -> tuple[str, str] | None:
        """The engine's ``index``-th (raw, normalised) sentence, or None when the text ran out."""
        k = index * self._engines + engine_number
        while len(self._pool) <= k:
            following = next(self._sentences, None)
            if following is None:
                return None
            self._pool.append(following)
        return self._pool[k]


class EngineQueue:
    """One engine's share of the work: its jobs in plan order, their results, and its running totals.

    Jobs are planned in a fixed order (so the plan never depends on timing) and counted in that order once their
    results are in, until the engine's quota of audio is reached, it fails too often, or the sentences run out.
    """

    def __init__(self, name: str, number: int, voices: list[str], quota: float, config: SynthConfig, root: Path, ext: str) -> None:
        self.name, self.number, self.voices, self.quota = name, number, voices, quota
        self.config, self.root, self.ext = config, root, ext
        self.rng = random.Random(f"{config.seed}:{name}")
        self.planned: list[Job] = []
        self.texts: list[str] = []
        self.stats = EngineStats()
        self.durations: dict[int, float | str] = {}  # job index -> seconds or error
        self.accounted = 0  # jobs 0..accounted-1 are counted in stats
        self.done = self.exhausted = False

    def plan(self, pool: SentencePool) -> Job | None:
        """The next job, or None (and ``exhausted``) when the sentences ran out."""
        found = pool.get(len(self.planned), self.number)
        if found is None:
            self.exhausted = True
            return None
        raw, text = found
        voice = self.rng.choice(self.voices)
        rate, pitch = round(self.rng.uniform(*self.config.rate), 3), round(self.rng.uniform(*self.config.pitch), 3)
        job = Job(voice, raw, rate, pitch, _job_path(self.root, self.name, voice, raw, rate, pitch, self.ext))
        self.planned.append(job)
        self.texts.append(text)
        return job

    def wants_more(self) -> bool:
        """Not done, and its counted seconds plus an estimate for its unfinished jobs fall short of its quota."""
        if self.done or self.exhausted:
            return False
        s = self.stats
        mean = s.seconds / s.utterances if s.utterances else 4.0
        return s.seconds + mean * (len(self.planned) - self.accounted) < self.quota

    def record(self, indices: list[int], results: list[float | str], seconds: float) -> None:
        """Results of a rendered batch of jobs (seconds of audio, or an error message each)."""
        self.stats.render_seconds += seconds
        for i, result in zip(indices, results):
            self.durations[i] = result
            if not isinstance(result, str):
                self.stats.rendered += 1
                self.stats.rendered_audio_seconds += result

    def account(self, log: Callable[[str], None]) -> None:
        """Count the results that are in, in plan order; decide whether the engine is done."""
        s = self.stats
        while not self.done and self.accounted in self.durations:
            result, job = self.durations[self.accounted], self.planned[self.accounted]
            self.accounted += 1
            if isinstance(result, str):
                s.failed += 1
                if len(s.errors) < 5:
                    s.errors.append(result)
                if s.failed >= 20 and s.utterances == 0:
                    self.done = True
                    log(f"{self.name}: giving up after {s.failed} failures, first: {s.errors[0]}")
                continue
            s.utterances += 1
            s.seconds += result
            s.voices[job.voice] = s.voices.get(job.voice, 0.0) + result
            if s.seconds >= self.quota:
                self.done = True
                log(f"{self.name}: {s.utterances} utterances, {s.seconds / 3600:.2f} h")
        if not self.done and self.exhausted and self.accounted == len(self.planned):
            self.done = True
            log(f"{self.name}: ran out of sentences at {s.seconds / 3600:.2f} h")

    def next_batch(self, pool: SentencePool) -> list[int]:
        """Plan up to a batch of jobs; those rendered by an earlier run are taken as they are. Returns the indices to render."""
        batch: list[int] = []
        for _ in range(BATCH[self.name]):
            job = self.plan(pool)
            if job is None:
                break
            index = len(self.planned) - 1
            if os.path.isfile(job.path):  # rendered by an earlier run
                self.durations[index] = _existing_duration(job.path)
            else:
                batch.append(index)
        return batch

    def entry(self, index: int) -> dict | None:
        """The manifest line of a counted job, None for a failed one."""
        result = self.durations[index]
        if isinstance(result, str):
            return None
        job = self.planned[index]
        return {
            "audio": os.path.relpath(job.path, self.root),
            "duration": round(result, 3),
            "text": self.texts[index],
            "raw_text": job.text,
            "speaker": job.voice,
            "sample_rate": SAMPLE_RATE,
        }


def _render(queues: list[EngineQueue], pool: SentencePool, config: SynthConfig, log: Callable[[str], None]) -> None:
    """Render jobs until every engine is done: up to 2 x ``config.jobs`` batches in flight, engines taking turns."""
    # Threads suffice: espeak-ng, flite and festival run as child processes, and piper's onnxruntime, libsndfile and
    # soxr release the GIL. (Processes would have to re-import the caller's main module, or fork onnxruntime's threads.)
    executor = _Inline() if config.jobs <= 1 else futures.ThreadPoolExecutor(config.jobs, thread_name_prefix="synth")
    window = 1 if config.jobs <= 1 else 2 * config.jobs
    inflight: dict[futures.Future, tuple[EngineQueue, list[int]]] = {}
    turn = 0
    try:
        while True:
            while len(inflight) < window:
                candidates = [q for q in queues if q.wants_more()]
                if not candidates:
                    break
                queue = candidates[turn % len(candidates)]
                turn += 1
                batch = queue.next_batch(pool)
                if batch:
                    future = executor.submit(_timed_render, [queue.planned[i] for i in batch], config.seed)
                    inflight[future] = (queue, batch)
                queue.account(log)
            if not inflight:
                if not any(q.wants_more() for q in queues):
                    break
                continue
            finished, _ = futures.wait(list(inflight), return_when=futures.FIRST_COMPLETED)
            for future in finished:
                queue, indices = inflight.pop(future)
                queue.record(indices, *future.result())
                queue.account(log)
    finally:
        executor.shutdown(cancel_futures=True)


def _write_manifest(root: Path, queues: list[EngineQueue]) -> tuple[Path, int]:
    """train.jsonl of every counted utterance, the engines' n-th utterances together; (its path, its lines)."""
    entries = []
    for index in range(max((q.accounted for q in queues), default=0)):
        entries += [entry for q in queues if index < q.accounted and (entry := q.entry(index)) is not None]
    if not entries:
        errors = "; ".join(e for q in queues for e in q.stats.errors[:1])
        raise SynthError(f"nothing was rendered ({errors or 'no usable sentences'})")
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / "train.jsonl"
    partial = manifest.with_name(manifest.name + ".part")
    partial.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
    os.replace(partial, manifest)
    return manifest, len(entries)


def synthesize(config: SynthConfig, log: Callable[[str], None] = lambda _: None) -> SynthReport:
    """Render ``config.hours`` of speech, an equal share per engine, and write ``train.jsonl`` in ``output_dir``."""
    _check(config)
    engines_wanted = [e for e in requested_engines(config.voices) if e in ENGINES]
    if not engines_wanted:
        raise SynthError(f"no known engine in {list(config.voices)}; known: all, {', '.join(ENGINES)}")
    report = discover_voices(engines_wanted)
    voices = select_voices(config.voices, report)
    if not voices:
        hints = "; ".join(f"{k}: {v}" for k, v in report.missing.items())
        raise SynthError(f"no voice found for {','.join(config.voices)} ({hints or 'no voice matches'})")
    lines = read_lines(config.texts)
    if not lines:
        raise SynthError("the text files are empty")
    exclusions = Exclusions.from_manifests(config.exclude)
    pool = SentencePool(sentence_stream(lines, config.seed, exclusions, config.min_words, config.max_words), len(voices))
    root, ext = Path(config.output_dir), audio_extension()
    quota = config.hours * 3600 / len(voices)
    queues = [EngineQueue(name, number, names, quota, config, root, ext) for number, (name, names) in enumerate(voices.items())]
    _render(queues, pool, config, log)
    manifest, count = _write_manifest(root, queues)
    stats = {q.name: q.stats for q in queues}
    result = SynthReport(report, stats, manifest, exclusions.dropped, count, any(q.exhausted for q in queues))
    settings = {**asdict(config), "texts": list(config.texts), "exclude": list(config.exclude)}
    (root / "synth.json").write_text(json.dumps({"settings": settings, **result.to_dict()}, indent=2) + "\n")
    return result


def _existing_duration(path: str) -> float | str:
    try:
        return sf.info(path).duration
    except Exception as error:  # soundfile raises several types
        return f"unreadable {path}: {error}"
