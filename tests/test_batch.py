"""Batch transcription into a folder: resume after an interruption, shards, status rows, Ray."""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from asr.batch import BatchError, BatchInput, Shard, collect_inputs, transcribe_to_files, write_atomically
from asr.cli import build_parser, run_transcribe
from tests.conftest import CLIPS, DATA

COPIES = 4  # of each clip: 8 real inputs


def asr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asr", *args], capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A folder of real clips in nested folders, plus an empty file and a corrupt one."""
    root = tmp_path_factory.mktemp("archive")
    for copy in range(COPIES):
        folder = root / f"day{copy}" / "calls"
        folder.mkdir(parents=True)
        for name in CLIPS:
            shutil.copy(DATA / name, folder / name)
    (root / "day0" / "empty.wav").write_bytes(b"")
    (root / "day1" / "corrupt.opus").write_bytes(b"OggS" + bytes(range(256)) * 4)
    return root


def outputs(folder: Path) -> dict[str, str]:
    """Every output file (status files and hidden temporaries left out) -> its text."""
    return {
        p.relative_to(folder).as_posix(): p.read_text()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith((".", "status"))
    }


def status_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob("status*.jsonl")) for line in path.read_text().splitlines()]


def arguments(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["transcribe", *argv])


@pytest.fixture(scope="module")
def recognizer(tiny_model):
    import asr as package

    return package.load_model(str(tiny_model), options=package.DecodeOptions(punctuate=False))


@pytest.fixture(scope="module")
def uninterrupted(archive, tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole")
    result = asr("transcribe", str(archive), "-o", str(out), "-f", "txt,json", "--model", str(tiny_model), "--no-punctuate", "--jobs", "2")
    assert result.returncode == 1, result.stderr.decode()  # the empty and the corrupt file
    stderr = result.stderr.decode()
    assert "8 done, 0 skipped (already done), 2 failed" in stderr and "2 of 10 input(s) failed" in stderr
    return out


def test_a_run_writes_each_output_under_its_relative_path_with_a_status_row_per_input(archive, uninterrupted):
    written = outputs(uninterrupted)
    assert len(written) == 2 * 2 * COPIES
    assert written["day2/calls/how_much_was_it.txt"] == "how much was it\n"
    assert json.loads(written["day3/calls/does_that_look_good.json"])["text"] == "does that look good"
    rows = status_rows(uninterrupted)
    assert len(rows) == 10 and len({r["input"] for r in rows}) == 10
    errors = {Path(r["input"]).name: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"empty.wav", "corrupt.opus"} and all(errors.values())
    done = [r for r in rows if not r["error"]]
    assert all(len(r["outputs"]) == 2 and r["audio_seconds"] > 0.5 and r["wall_seconds"] > 0 for r in done)


def test_an_interrupted_run_resumes_with_only_the_unfinished_files(archive, recognizer, uninterrupted, tmp_path):
    out, calls = tmp_path / "out", []

    def interrupted_after_four(source: str):
        if len(calls) == 4:
            raise KeyboardInterrupt  # what Ctrl-C does in the middle of a file
        calls.append(source)
        return recognizer.transcribe(source)

    argv = (str(archive), "-o", str(out), "-f", "txt,json", "--no-progress")
    with pytest.raises(KeyboardInterrupt):
        run_transcribe(arguments(*argv), transcribe=interrupted_after_four)
    done_first = [r["input"] for r in status_rows(out) if not r["error"]]
    assert len(outputs(out)) == 2 * 3 and len(done_first) == 3 and len(status_rows(out)) == 4  # the 4th is empty.wav

    resumed = []

    def counting(source: str):
        resumed.append(source)
        return recognizer.transcribe(source)

    assert run_transcribe(arguments(*argv), transcribe=counting) == 1  # the two bad files still fail
    assert not set(resumed) & set(done_first) and len(resumed) == 10 - 3  # the three done ones are not redone
    assert outputs(out) == outputs(uninterrupted)
    done = [r["input"] for r in status_rows(out) if not r["error"]]
    assert len(done) == len(set(done)) == 2 * COPIES  # every file transcribed exactly once over the two runs

    again = []
    assert run_transcribe(arguments(*argv), transcribe=lambda s: again.append(s) or recognizer.transcribe(s)) == 1
    assert sorted(Path(s).name for s in again) == ["corrupt.opus", "empty.wav"]  # only the failed ones are retried
    assert run_transcribe(arguments(*argv, "--overwrite"), transcribe=lambda s: again.append(s) or recognizer.transcribe(s)) == 1
    assert len(again) == 2 + 10


def test_shards_together_cover_every_input_exactly_once(archive, tiny_model, uninterrupted, tmp_path):
    out = tmp_path / "out"
    for index in range(3):
        result = asr(
            "transcribe", str(archive), "-o", str(out), "-f", "txt,json", "--model", str(tiny_model), "--no-punctuate",
            "--shard", f"{index}/3",
        )  # fmt: skip
        assert result.returncode in (0, 1), result.stderr.decode()
        assert f"shard {index}/3: " in result.stderr.decode()
    assert outputs(out) == outputs(uninterrupted)
    rows = status_rows(out)
    assert len(rows) == 10 and len({r["input"] for r in rows}) == 10
    assert sorted(p.name for p in out.glob("status*")) == [f"status.shard-{i}-of-3.jsonl" for i in range(3)]

    inputs = [BatchInput(f"/archive/{i:03d}.wav", f"{i:03d}") for i in range(100)]
    parts = [Shard(k, 7).select(inputs) for k in range(7)]
    assert sorted(item.source for part in parts for item in part) == sorted(item.source for item in inputs)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_bad_shards_and_colliding_outputs_are_usage_errors(tmp_path, tiny_model):
    for text in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(BatchError, match="K/N|0 <= K < N"):
            Shard.parse(text)
    result = asr("transcribe", str(DATA / "how_much_was_it.opus"), "-o", str(tmp_path), "--shard", "2/2", "--model", str(tiny_model))
    assert result.returncode == 2 and "0 <= K < N" in result.stderr.decode()
    (tmp_path / "other").mkdir()
    shutil.copy(DATA / "how_much_was_it.opus", tmp_path / "other")
    result = asr(
        "transcribe", str(DATA / "how_much_was_it.opus"), str(tmp_path / "other" / "how_much_was_it.opus"), "-o", str(tmp_path / "out"),
        "--model", str(tiny_model),
    )  # fmt: skip
    assert result.returncode == 2 and "would both be written as how_much_was_it" in result.stderr.decode()


def test_manifest_inputs_are_named_by_their_path_in_the_manifest(tmp_path, recognizer):
    (tmp_path / "audio" / "spk1").mkdir(parents=True)
    shutil.copy(DATA / "how_much_was_it.opus", tmp_path / "audio" / "spk1" / "utt1.opus")
    manifest = tmp_path / "dev.jsonl"
    manifest.write_text(json.dumps({"audio": "audio/spk1/utt1.opus", "text": "how much was it"}) + "\n")
    inputs, missing = collect_inputs([str(manifest), str(tmp_path / "nope.wav")])
    assert inputs == [BatchInput(str(tmp_path / "audio" / "spk1" / "utt1.opus"), "audio/spk1/utt1")]
    assert missing == [str(tmp_path / "nope.wav")]
    row = transcribe_to_files(recognizer.transcribe, inputs[0], tmp_path / "out", ["txt"])
    assert row.error is None and (tmp_path / "out" / "audio" / "spk1" / "utt1.txt").read_text() == "how much was it\n"
    elsewhere = (tmp_path / ".." / "escape.opus").resolve()
    manifest.write_text(json.dumps({"audio": "../escape.opus"}) + "\n" + json.dumps({"audio": str(DATA / "zero_8khz.opus")}) + "\n")
    named = [item.name for item in collect_inputs([str(manifest)])[0]]
    assert named == [elsewhere.with_suffix("").as_posix()[1:], (DATA / "zero_8khz").as_posix()[1:]]
    manifest.write_text("not json\n")
    with pytest.raises(BatchError, match="dev.jsonl:1"):
        collect_inputs([str(manifest)])


def test_an_output_is_whole_or_absent(tmp_path, monkeypatch):
    target = tmp_path / "a" / "b.txt"
    write_atomically(target, "first\n")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("asr.batch.os.replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, "second\n")
    assert target.read_text() == "first\n" and [p.name for p in target.parent.iterdir()] == ["b.txt"]


def test_ray_without_an_output_folder_is_a_usage_error(tiny_model):
    result = asr("transcribe", str(DATA / "how_much_was_it.opus"), "--ray", "--model", str(tiny_model))
    assert result.returncode == 2 and "--ray writes into an output folder" in result.stderr.decode()


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'bilstm-asr[ray]'")
    pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'bilstm-asr[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_gives_the_same_outputs_as_the_plain_run(ray_cluster, archive, tiny_model, uninterrupted, tmp_path):
    out = tmp_path / "out"
    args = arguments(str(archive), "-o", str(out), "-f", "txt,json", "--model", str(tiny_model), "--no-punctuate", "--ray", "--jobs", "2")
    args.threads = 1
    assert run_transcribe(args) == 1  # the empty and the corrupt file are error rows; the run went on
    assert outputs(out) == outputs(uninterrupted)
    rows = status_rows(out)
    assert len(rows) == 10 and sum(1 for r in rows if r["error"]) == 2


def test_batch_benchmark_compares_setups_on_the_same_files(tiny_model, tmp_path):
    from asr.batch_bench import batch_benchmark

    report = batch_benchmark(
        [str(DATA / name) for name in CLIPS], ["--jobs 1", "--jobs 2"], f"--model {tiny_model} --no-punctuate", log=lambda _m: None
    )
    first, second = report["runs"]
    assert first["files"] == second["files"] == 2 and first["failed"] == 0
    assert first["audio_hours"] == second["audio_hours"] > 0
    assert second["throughput_vs_first"] > 0 and "extra_seconds_per_file" in second
    with pytest.raises(ValueError, match="no such file"):
        batch_benchmark([str(tmp_path / "none")], ["--jobs 1"])


def test_ray_without_ray_installed_says_how_to_install_it(tiny_model, tmp_path, monkeypatch, capsys):
    from asr.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # what a missing package looks like to `import ray`
    code = main(["transcribe", str(DATA / "how_much_was_it.opus"), "-o", str(tmp_path), "--ray", "--model", str(tiny_model)])
    assert code == 2 and "pip install 'bilstm-asr[ray]'" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.txt"))


def test_bad_files_in_an_archive_of_a_thousand_are_one_error_row_each(tmp_path):
    """What the run does around the recogniser (reading, rows, exit code), at scale: the audio is really read."""
    import os

    from asr.audio import SAMPLE_RATE, load_audio
    from asr.decoding import Transcript

    archive = tmp_path / "archive"
    for folder in range(10):
        (archive / f"{folder:02d}").mkdir(parents=True)
        for index in range(100):
            os.symlink(DATA / "zero_8khz.opus", archive / f"{folder:02d}" / f"{index:03d}.opus")
    (archive / "03" / "007.opus").unlink()
    (archive / "03" / "007.opus").write_bytes(b"")  # empty
    (archive / "05" / "050.opus").unlink()
    (archive / "05" / "050.opus").write_bytes(b"OggS" + bytes(300))  # corrupt
    (archive / "09" / "099.opus").unlink()
    (archive / "09" / "099.opus").symlink_to(tmp_path / "gone.opus")  # unreadable: a dangling link

    def reading(source: str) -> Transcript:
        return Transcript("zero", duration=len(load_audio(source)) / SAMPLE_RATE)

    out = tmp_path / "out"
    assert run_transcribe(arguments(str(archive), "-o", str(out), "--no-progress"), transcribe=reading) == 1
    rows = status_rows(out)
    assert len(rows) == 1000 and len({r["input"] for r in rows}) == 1000
    failed = sorted(Path(r["input"]).relative_to(archive).as_posix() for r in rows if r["error"])
    assert failed == ["03/007.opus", "05/050.opus", "09/099.opus"]
    assert len(list(out.rglob("*.txt"))) == 997
