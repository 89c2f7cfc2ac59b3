import json
import re
import subprocess
import sys

import pytest

from tests.conftest import CLIPS, DATA


def asr(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asr", *args], input=stdin, capture_output=True, timeout=300)


def times(text: str) -> list[float]:
    out = []
    for h, m, s, ms in re.findall(r"(\d\d):(\d\d):(\d\d)[,.](\d\d\d)", text):
        out.append(int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000)
    return out


def transcribe_all_formats(folder, tiny_model, *options: str):
    result = asr(
        "transcribe", *(str(DATA / n) for n in CLIPS), "--model", str(tiny_model), "-f", "txt,json,srt,vtt,tsv", "-o", str(folder), *options
    )
    assert result.returncode == 0, result.stderr.decode()
    return folder


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_model):
    return transcribe_all_formats(tmp_path_factory.mktemp("out"), tiny_model, "--no-punctuate")


@pytest.fixture(scope="module")
def punctuated(tmp_path_factory, tiny_model, tiny_punctuator):
    return transcribe_all_formats(tmp_path_factory.mktemp("out"), tiny_model, "--punctuation-model", str(tiny_punctuator))


def test_every_output_format_parses(outputs):
    for name, text in CLIPS.items():
        stem = name.removesuffix(".opus")
        assert (outputs / f"{stem}.txt").read_text() == text + "\n"
        data = json.loads((outputs / f"{stem}.json").read_text())
        assert data["text"] == text and [w["text"] for w in data["words"]] == text.split()
        assert all(set(w) == {"text", "start", "end", "confidence"} for w in data["words"]) and "formatted_text" not in data
        for fmt in ("srt", "vtt"):
            content = (outputs / f"{stem}.{fmt}").read_text()
            stamps = times(content)
            assert stamps and stamps == sorted(stamps) and len(stamps) % 2 == 0
            assert all(a < b for a, b in zip(stamps[::2], stamps[1::2]))
            assert text in content.replace("\n", " ")
        assert (outputs / f"{stem}.vtt").read_text().startswith("WEBVTT\n\n")
        assert re.search(r"^1\n00:00:00,\d{3} --> 00:00:0\d,\d{3}\n", (outputs / f"{stem}.srt").read_text(), re.M)
        rows = (outputs / f"{stem}.tsv").read_text().splitlines()
        assert rows[0] == "start\tend\tconfidence\tword"
        starts = [float(r.split("\t")[0]) for r in rows[1:]]
        assert starts == sorted(starts) and [r.split("\t")[3] for r in rows[1:]] == text.split()


def test_every_output_format_is_punctuated_by_default(punctuated, outputs):
    from asr.text import normalize_text

    for name, text in CLIPS.items():
        stem = name.removesuffix(".opus")
        formatted = (punctuated / f"{stem}.txt").read_text().strip()
        assert normalize_text(formatted) == text and formatted[0].isupper() and formatted[-1] in ".?!"
        data = json.loads((punctuated / f"{stem}.json").read_text())
        assert data["text"] == text and data["formatted_text"] == formatted
        assert [w["text"] for w in data["words"]] == text.split() and " ".join(w["formatted"] for w in data["words"]) == formatted
        assert data["words"] == [
            w | {"formatted": f} for w, f in zip(json.loads((outputs / f"{stem}.json").read_text())["words"], formatted.split())
        ]
        for fmt in ("srt", "vtt"):
            assert formatted in (punctuated / f"{stem}.{fmt}").read_text()
        rows = [r.split("\t") for r in (punctuated / f"{stem}.tsv").read_text().splitlines()]
        assert (
            rows[0][3:] == ["word", "formatted"]
            and [r[3] for r in rows[1:]] == text.split()
            and [r[4] for r in rows[1:]] == formatted.split()
        )


def test_folder_recursion_and_stdin(tmp_path, tiny_model):
    nested = tmp_path / "in" / "deeper"
    nested.mkdir(parents=True)
    for name in CLIPS:
        (nested / name).write_bytes((DATA / name).read_bytes())
    (tmp_path / "in" / "notes.txt").write_text("not audio")
    result = asr("transcribe", str(tmp_path / "in"), "--model", str(tiny_model), "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr.decode()
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.txt")) == sorted(n.replace(".opus", ".txt") for n in CLIPS)
    assert (tmp_path / "out" / "deeper" / "how_much_was_it.txt").is_file()

    piped = asr("transcribe", "-", "--model", str(tiny_model), "-f", "json", stdin=(DATA / "how_much_was_it.opus").read_bytes())
    assert piped.returncode == 0, piped.stderr.decode()
    assert json.loads(piped.stdout)["text"] == "how much was it"


def test_a_corrupt_file_is_reported_and_the_others_finish(tmp_path, tiny_model):
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF" + b"\x00" * 200)
    good = [str(DATA / n) for n in CLIPS]
    result = asr(
        "transcribe",
        good[0],
        str(bad),
        good[1],
        "/no/such.wav",
        "--model",
        str(tiny_model),
        "--jobs",
        "2",
        "--no-progress",
        "--no-punctuate",
    )
    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert "corrupt.wav" in stderr and "/no/such.wav" in stderr and "2 of 4 input(s) failed" in stderr
    stdout = result.stdout.decode()
    assert "how much was it" in stdout and "does that look good" in stdout


def test_missing_model_file_gives_a_clear_error(tmp_path):
    result = asr("transcribe", str(DATA / "how_much_was_it.opus"), "--model", str(tmp_path / "nope.pt"))
    assert result.returncode == 2
    assert b"model file not found" in result.stderr and b"Traceback" not in result.stderr


def test_eval_reports_wer_cer_and_rtf(tmp_path, tiny_model):
    from tests.conftest import write_manifest

    manifest = write_manifest(tmp_path / "m.jsonl", CLIPS, repeat=2)
    result = asr("eval", str(manifest), "--model", str(tiny_model), "--limit", "4", "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads((tmp_path / "r.json").read_text())[0]
    assert report["utterances"] == 4 and report["wer"] == 0.0 and report["cer"] == 0.0 and 0 < report["rtf"] < 5
    assert "WER %" in result.stdout.decode()


def test_unknown_format_is_a_usage_error():
    result = asr("transcribe", str(DATA / "how_much_was_it.opus"), "-f", "docx")
    assert result.returncode == 2 and b"unknown format" in result.stderr


def test_eval_with_a_grammar_says_so(tmp_path, tiny_model):
    from tests.conftest import write_manifest

    manifest = write_manifest(tmp_path / "m.jsonl", CLIPS)
    grammar = ",".join([*CLIPS.values(), "[unk]"])
    result = asr("eval", str(manifest), "--model", str(tiny_model), "--grammar", grammar, "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads((tmp_path / "r.json").read_text())[0]["wer"] == 0.0
    assert "decoder: grammar of 2 phrase(s) and [unk]" in result.stdout.decode()


def test_hotwords_file_reaches_the_server(tmp_path, monkeypatch, capsys):
    """`asr transcribe --server URL --hotwords-file F` sends the file's phrases (it once sent only --hotwords)."""
    import streaming.client
    from asr.cli import main

    sent = {}

    async def fake_server(url, source, token, grammar, hotwords=None):
        sent.update(url=url, grammar=grammar, hotwords=hotwords)
        return [{"text": "how much was it", "start": 0.1, "end": 0.7, "result": []}]

    monkeypatch.setattr(streaming.client, "transcribe_with_server", fake_server)
    phrases = tmp_path / "hotwords.txt"
    phrases.write_text("Kheafield\ntorch audio\n\n")
    clip = str(DATA / "how_much_was_it.opus")
    argv = ["transcribe", clip, "--server", "ws://127.0.0.1:9", "--no-punctuate", "--hotwords", "vosk", "--hotwords-file", str(phrases)]
    assert main(argv) == 0
    assert sent["hotwords"] == ["vosk", "Kheafield", "torch audio"] and sent["grammar"] is None
    assert capsys.readouterr().out == "how much was it\n"


def test_errors_are_reported_once_with_exit_code_2(tmp_path, capsys):
    from asr.cli import main

    assert main(["lm", "phones", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "lm.json")]) == 2
    assert main(["transcribe", str(DATA / "how_much_was_it.opus"), "-f", "doc"]) == 2
    assert main(["average", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "avg.pt")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), lines


def test_bench_profile_accounts_for_the_whole_transcription(tiny_model):
    result = asr("bench", "profile", str(DATA / "LJ002-0179.opus"), "--model", str(tiny_model), "--decoder", "greedy", "--json")
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    parts = {p["part"]: p for p in report["parts"]}
    assert {"features", "acoustic model", "search", "punctuation"} <= set(parts)
    assert parts["acoustic model"]["calls"] > 0 and parts["punctuation"]["calls"] == 1 and parts["search"]["calls"] == 0  # greedy
    assert abs(sum(p["seconds"] for p in report["parts"]) - report["wall_seconds"]) < 0.01
    assert report["audio_seconds"] > 4 and report["rtf"] > 0
