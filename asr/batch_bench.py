"""Batch throughput (`asr bench batch`): the same inputs transcribed into a folder with each setup, side by side.

Each setup is a fresh `asr transcribe INPUTS -o TMP ...` process (model loading included, as a real run pays it), so
the numbers are what a user's command gets: files, audio hours, wall seconds, hours of audio per hour of wall time,
and wall seconds per file. Setups are named by their extra options, e.g. ``"--jobs 2"`` or ``"--ray --jobs 2"``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .batch import STATUS_FILE, collect_inputs


def _run(inputs: list[str], setup: str, options: str, log) -> dict:
    """One setup's run into a temporary folder; the status rows give the audio seconds and the failures."""
    with tempfile.TemporaryDirectory(prefix="asr-bench-batch-") as out:
        command = [sys.executable, "-m", "asr", "transcribe", *inputs, "-o", out, "--no-progress"]
        command += shlex.split(options) + shlex.split(setup)
        log(f"{setup}: {len(inputs)} files ...")
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - started
        status = Path(out) / STATUS_FILE
        rows = [json.loads(line) for line in status.read_text().splitlines()] if status.is_file() else []
    if result.returncode not in (0, 1) or not rows:
        raise RuntimeError(f"`{' '.join(command)}` failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    audio = sum(r["audio_seconds"] for r in rows if not r["error"])
    return {
        "setup": setup,
        "files": len(rows),
        "failed": sum(1 for r in rows if r["error"]),
        "audio_hours": round(audio / 3600, 4),
        "wall_seconds": round(wall, 1),
        "audio_hours_per_hour": round(audio / wall, 2),
        "seconds_per_file": round(wall / len(rows), 3),
    }


def batch_benchmark(paths: list[str], setups: list[str], options: str = "", limit: int = 0, log=print) -> dict:
    """Transcribe the inputs (files, folders, manifests; the first ``limit`` in sorted order) with each setup."""
    inputs, missing = collect_inputs(paths)
    if missing:
        raise ValueError(f"no such file or folder: {', '.join(missing)}")
    sources = sorted(item.source for item in inputs)[: limit or None]
    if not sources:
        raise ValueError("no audio to benchmark")
    runs = [_run(sources, setup, options, log) for setup in setups]
    base = runs[0]
    for run in runs[1:]:  # what each setup adds per file, against the first
        run["extra_seconds_per_file"] = round((run["wall_seconds"] - base["wall_seconds"]) / run["files"], 3)
        run["throughput_vs_first"] = round(run["audio_hours_per_hour"] / base["audio_hours_per_hour"], 3)
    return {"options": options, "runs": runs, "date": time.strftime("%Y-%m-%d")}
