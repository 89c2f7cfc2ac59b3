import json
import os
import re
import shutil
import subprocess
import sys
import warnings

from asr.checkpoint import load_model_file
from tests.conftest import CLIPS, write_manifest


def _killed_by_a_signal(stderr: str) -> bool:
    """Whether torchrun's first failed rank died by a signal (negative exit code), not by an error it raised."""
    root_cause = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", stderr, re.DOTALL)
    return root_cause is not None and int(root_cause.group(1)) < 0


def _rank_errors(stderr: str) -> str:
    """What the ranks printed, without torchrun's own traceback (which comes last and says only that a rank failed)."""
    ranks_output = stderr.rsplit("Traceback (most recent call last):", 1)[0] if "ChildFailedError" in stderr else stderr
    summary = stderr[stderr.find("Failures:") :] if "Failures:" in stderr else ""
    return ranks_output[-8000:] + "\n" + summary[:2000]


def test_two_process_ddp_training_with_gloo(tmp_path):
    """torchrun with 2 CPU processes: gradients are averaged, replicas stay identical (checked in the trainer)."""
    manifest = write_manifest(tmp_path / "train.jsonl", CLIPS, repeat=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crashing rank prints its Python stack
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "training.cli",
        "train",
        "--train",
        str(manifest),
        "-o",
        str(tmp_path / "run"),
        "--hidden-size",
        "16",
        "--num-layers",
        "1",
        "--chunk-frames",
        "4",
        "--lookahead-frames",
        "2",
        "--epochs",
        "2",
        "--batch-frames",
        "200",
        "--warmup-steps",
        "2",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--workers",
        "1",
        "--threads",
        "1",
        "--no-progress",
        "--no-specaugment",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if result.returncode != 0 and _killed_by_a_signal(result.stderr):
        # A rank that dies by a signal (an abort inside gloo's transport or a thread that could not start, seen once on
        # a loaded CI machine) is not a training error: report what it printed and run once more. An error the
        # training raises, or a second signal, fails the test.
        warnings.warn(f"a torchrun rank died by a signal; running again. Its output:\n{_rank_errors(result.stderr)}", stacklevel=1)
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, _rank_errors(result.stderr)
    assert "2 process(es)" in result.stderr
    bundle = load_model_file(tmp_path / "run" / "model.pt")
    assert bundle.metadata["world_size"] == 2
    assert bundle.metadata["steps"] == 4  # 8 utterances, 2 per batch, split over 2 ranks, 2 epochs


def test_bench_train_runs_the_training_loop_in_two_processes(tmp_path):
    """`asr bench train --processes 2`: two gloo processes run the real loop; throughput counts both ranks' audio."""
    manifest = write_manifest(tmp_path / "train.jsonl", CLIPS, repeat=20)
    command = [sys.executable, "-m", "asr", "bench", "train", str(manifest), "--processes", "2", "--threads", "1"]
    command += ["--hidden-size", "16", "--num-layers", "1", "--batch-frames", "200", "--cache-dir", str(tmp_path / "cache")]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["processes"] == 2 and report["steps"] == 20
    assert report["device"].startswith("cpu (2 x 1 threads")
    assert report["model"]["hidden_size"] == 16
    assert report["precision"] in ("float32", "bfloat16")  # what the trainer chose, read from its log
    assert report["audio_sec_per_wall_sec"] > 0
