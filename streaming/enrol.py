"""Enrolment: read prompts aloud, record each, and adapt a model to the voice (`asr mic --enroll`).

The recordings are cut by energy (from the first loud frame to a pause after the last), written with their prompts
as transcripts, and adapted by `asr adapt` in a separate process, so this package needs nothing of ``training``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import soundfile as sf

from asr.errors import CommandError

PROMPTS_FILE = Path(__file__).parent / "prompts.txt"
FRAME_SECONDS = 0.03
SPEECH_DBFS = -40.0  # a frame louder than this is speech
END_PAUSE_SECONDS = 0.8  # quiet after speech that ends a recording
MAX_PROMPT_SECONDS = 15.0
WAIT_SECONDS = 20.0  # for the first word of a prompt


class EnrolmentError(CommandError):
    """Raised when a prompt gets no speech, or adaptation fails."""


def load_prompts(path: str | Path | None = None, count: int = 10) -> list[str]:
    """The first ``count`` prompts of ``path`` (default: the bundled Harvard sentences), one a line; # starts a comment."""
    source = Path(path) if path else PROMPTS_FILE
    lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise EnrolmentError(f"{source} has no prompts")
    return prompts[:count]


class UtteranceCutter:
    """Cuts utterances out of audio pushed in pieces at ``sample_rate``: each runs from a little before its first loud
    frame to the pause after its last (or ``MAX_PROMPT_SECONDS``)."""

    def __init__(self, sample_rate: int) -> None:
        self.rate = sample_rate
        self.frame = max(1, int(FRAME_SECONDS * sample_rate))
        self._pending = np.zeros(0, dtype=np.float32)
        self._kept: list[np.ndarray] = []
        self._heard = self._quiet = 0
        self.waited = 0.0  # seconds of audio since the last utterance ended, while none has begun

    def push(self, audio: np.ndarray) -> list[np.ndarray]:
        """audio (samples,) float in [-1, 1] or int16 -> the utterances it completed (samples,) each."""
        audio = audio.astype(np.float32) / 32768.0 if audio.dtype == np.int16 else audio.astype(np.float32)
        self._pending = np.concatenate([self._pending, audio.reshape(-1)])
        done = []
        while len(self._pending) >= self.frame:
            frame, self._pending = self._pending[: self.frame], self._pending[self.frame :]
            utterance = self._frame(frame)
            if utterance is not None:
                done.append(utterance)
        return done

    def _frame(self, frame: np.ndarray) -> np.ndarray | None:
        loud = 20 * np.log10(np.sqrt(np.mean(frame**2)) + 1e-10) > SPEECH_DBFS
        self._kept.append(frame)
        if not self._heard:
            self._kept = self._kept[-int(0.2 / FRAME_SECONDS) :]  # keep a little of the lead-in
            self._heard, self.waited = int(loud), self.waited + FRAME_SECONDS
            return None
        self._quiet = 0 if loud else self._quiet + 1
        if self._quiet * FRAME_SECONDS < END_PAUSE_SECONDS and len(self._kept) * FRAME_SECONDS < MAX_PROMPT_SECONDS:
            return None
        utterance = np.concatenate(self._kept)
        self._kept, self._heard, self._quiet, self.waited = [], 0, 0, 0.0
        return utterance


class UtteranceRecorder:
    """Records one utterance at a time from a stream of audio blocks (a microphone)."""

    def __init__(self, sample_rate: int) -> None:
        self.cutter = UtteranceCutter(sample_rate)
        self._ready: list[np.ndarray] = []

    def record(self, blocks: Iterator[np.ndarray]) -> np.ndarray | None:
        """The next utterance (samples,); None when no speech begins within ``WAIT_SECONDS`` or the blocks end."""
        while not self._ready:
            block = next(blocks, None)
            if block is None or self.cutter.waited > WAIT_SECONDS:
                return None
            self._ready += self.cutter.push(block)
        return self._ready.pop(0)


def record_prompts(prompts: list[str], blocks: Iterator[np.ndarray], sample_rate: int, folder: Path, show: Callable[[str], None]) -> None:
    """Show each prompt, record it, and write NN.wav with NN.txt (the prompt) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    recorder = UtteranceRecorder(sample_rate)
    for number, prompt in enumerate(prompts, 1):
        show(f"[{number}/{len(prompts)}] read aloud:  {prompt}")
        audio = recorder.record(blocks)
        if audio is None:
            raise EnrolmentError(f"no speech heard for prompt {number} within {WAIT_SECONDS:.0f} s (is the microphone on?)")
        sf.write(folder / f"{number:02d}.wav", audio, sample_rate)
        (folder / f"{number:02d}.txt").write_text(prompt + "\n", encoding="utf-8")
        show(f"      recorded {len(audio) / sample_rate:.1f} s")


def adapt_in_process(folder: Path, output: str, model: str | None, show: Callable[[str], None]) -> None:
    """Run `asr adapt` on the recordings in a separate process, showing what it says; raises when it fails."""
    command = [sys.executable, "-m", "asr", "adapt", str(folder), "-o", output, "--model", model or "bundled"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:
        lines.append(line.rstrip())
        show("      " + line.rstrip())
    if process.wait() != 0:
        raise EnrolmentError(next((line for line in reversed(lines) if line.startswith("error:")), "adaptation failed"))
