"""Voices learned on the server: enrolment over the websocket, adaptation in a separate process, per-owner models.

A connection that presents a token may enrol: it sends ``{"enroll": {"name": "me"}}``, the server answers with the
prompts, and the client streams audio while its user reads them; the server cuts one utterance per prompt
(``enrol.UtteranceCutter``). After the last prompt the server runs `asr adapt` in a separate, low-priority process (at
most ``max_enrolments`` at once, so live streams keep their CPU), and keeps the model as ``VOICES/<owner>/<name>.pt``,
where the owner is a digest of the token: only connections with the same token can use it, as ``{"config": {"model":
"me"}}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from asr.checkpoint import load_model_file
from asr.recognizer import Recognizer

from .enrol import MAX_PROMPT_SECONDS, UtteranceCutter, load_prompts

VOICE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
MAX_VOICES_PER_OWNER = 5
LOADED_VOICES = 8  # adapted models kept in memory (least recently used ones are dropped)
ADAPT_TIMEOUT_SECONDS = 600.0


class EnrolmentRefused(ValueError):
    """An enrolment request the server turns down; the message says why."""


def owner_of(token: str | None) -> str | None:
    """The owner key of a token: a digest that names its voices' folder (None: no token, no voices)."""
    return hashlib.sha256(token.encode()).hexdigest()[:16] if token else None


@dataclass
class Enrolment:
    """One connection's enrolment: its prompts, the utterances cut so far, and the folder they are written to."""

    name: str
    prompts: list[str]
    sample_rate: int
    folder: Path
    recorded: list[float] = field(default_factory=list)  # seconds of each prompt's utterance
    cutter: UtteranceCutter | None = None
    adapting: bool = False
    received_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.cutter = UtteranceCutter(self.sample_rate)

    @property
    def complete(self) -> bool:
        return len(self.recorded) >= len(self.prompts)

    def accept(self, pcm: np.ndarray) -> int:
        """Audio (samples,) int16 at ``sample_rate``; writes each completed utterance with its prompt; how many it completed."""
        self.received_seconds += len(pcm) / self.sample_rate
        if self.received_seconds > len(self.prompts) * 2 * MAX_PROMPT_SECONDS:
            raise EnrolmentRefused(f"enrolment audio longer than {2 * MAX_PROMPT_SECONDS:.0f} s per prompt: enrolment cancelled")
        completed = 0
        for utterance in self.cutter.push(pcm):
            if self.complete:
                break
            number = len(self.recorded) + 1
            sf.write(self.folder / f"{number:02d}.wav", utterance, self.sample_rate)
            (self.folder / f"{number:02d}.txt").write_text(self.prompts[number - 1] + "\n", encoding="utf-8")
            self.recorded.append(round(len(utterance) / self.sample_rate, 2))
            completed += 1
        return completed

    def status(self) -> dict:
        data = {"type": "enrolment", "name": self.name, "recorded": len(self.recorded), "prompts": len(self.prompts)}
        if self.adapting:
            data["adapting"] = True
        elif not self.complete:
            data["prompt"] = len(self.recorded)  # the index of the prompt to read now
        return data


class VoiceStore:
    """The learned voices in ``folder``: enrolment limits, adaptation processes, and the loaded models."""

    def __init__(self, folder: str | Path, base: Recognizer, prompts_file: str | None = None, prompts: int = 10, max_enrolments: int = 1):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.base = base
        self.prompts = load_prompts(prompts_file, prompts)
        self.running = asyncio.Semaphore(max_enrolments)
        self.max_enrolments = max_enrolments
        self.waiting = 0
        self._loaded: OrderedDict[tuple[str, str], Recognizer] = OrderedDict()
        self._lock = threading.Lock()

    def path(self, owner: str, name: str) -> Path:
        return self.folder / owner / f"{name}.pt"

    def names(self, owner: str | None) -> list[str]:
        folder = self.folder / owner if owner else None
        return sorted(p.stem for p in folder.glob("*.pt")) if folder is not None and folder.is_dir() else []

    def has(self, owner: str | None, name: str) -> bool:
        return owner is not None and VOICE_NAME.match(str(name)) is not None and self.path(owner, name).is_file()

    def recognizer(self, owner: str, name: str) -> Recognizer:
        """The voice's recogniser, loaded on first use (call it off the event loop), with the base model's options."""
        key = (owner, name)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
        bundle = load_model_file(self.path(owner, name))
        recognizer = Recognizer(bundle, self.base.options)
        with self._lock:
            self._loaded[key] = recognizer
            while len(self._loaded) > LOADED_VOICES:
                self._loaded.popitem(last=False)
        return recognizer

    def start(self, owner: str | None, request: object, sample_rate: int, served: set[str]) -> Enrolment:
        """A new enrolment for ``{"enroll": {"name": ...}}``, or ``EnrolmentRefused``."""
        if owner is None:
            raise EnrolmentRefused("learning a voice needs a token: connect with ?token=... or an Authorization header")
        name = request.get("name", "me") if isinstance(request, dict) else None
        if not isinstance(name, str) or not VOICE_NAME.match(name) or name in served:
            raise EnrolmentRefused("enroll needs a name of 1-32 letters, digits, _ or - that is not a served model's")
        if name not in self.names(owner) and len(self.names(owner)) >= MAX_VOICES_PER_OWNER:
            raise EnrolmentRefused(f"this token already has {MAX_VOICES_PER_OWNER} voices ({', '.join(self.names(owner))})")
        if self.waiting >= 4 * self.max_enrolments:
            raise EnrolmentRefused("too many enrolments waiting: try again in a few minutes")
        return Enrolment(name, list(self.prompts), sample_rate, Path(tempfile.mkdtemp(prefix="asr-voice-")))

    async def adapt(self, owner: str, enrolment: Enrolment) -> dict:
        """Adapt the base model to the enrolment's recordings in a separate low-priority process (at most
        ``max_enrolments`` at once); returns its report, or raises ``EnrolmentRefused`` with its error."""
        output = self.path(owner, enrolment.name)
        output.parent.mkdir(parents=True, exist_ok=True)
        base = self.base.bundle.metadata.get("source_path") or "bundled"
        command = [sys.executable, "-m", "asr", "adapt", str(enrolment.folder), "-o", str(output), "--model", base]
        self.waiting += 1
        try:
            async with self.running:
                report = await _run_low_priority(command)
        finally:
            self.waiting -= 1
            shutil.rmtree(enrolment.folder, ignore_errors=True)
        with self._lock:
            self._loaded.pop((owner, enrolment.name), None)  # a voice learned again is loaded again
        return report


async def _run_low_priority(command: list[str]) -> dict:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, preexec_fn=lambda: os.nice(19)
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), ADAPT_TIMEOUT_SECONDS)
    except TimeoutError:
        process.kill()
        raise EnrolmentRefused(f"adaptation took longer than {ADAPT_TIMEOUT_SECONDS:.0f} s") from None
    except asyncio.CancelledError:  # the server is shutting down
        process.kill()
        raise
    if process.returncode != 0:
        lines = err.decode(errors="replace").splitlines()
        raise EnrolmentRefused(
            next((line.removeprefix("error: ") for line in reversed(lines) if line.startswith("error:")), "adaptation failed")
        )
    return json.loads(out)
