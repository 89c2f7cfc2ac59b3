import json

from tests.conftest import CLIPS, write_manifest
from training.accuracy import accuracy_benchmark, write_report


def test_accuracy_benchmark_runs_end_to_end_and_reports_missing_peers(tmp_path, tiny_model):
    manifest = write_manifest(tmp_path / "tiny.jsonl", CLIPS)
    report = accuracy_benchmark([str(manifest)], model=str(tiny_model), only=["ours greedy", "pocketsphinx", "whisper"], lm="none")
    ours = [r for r in report["results"] if r["system"].startswith("ours greedy")]
    assert {r["system"] for r in ours} == {"ours greedy (offline)", "ours greedy (streaming)"}
    offline = next(r for r in ours if "offline" in r["system"])
    assert offline["wer"] == 0.0 and offline["utterances"] == 2 and offline["rtf"] > 0
    for peer in ("pocketsphinx", "whisper tiny.en"):  # each peer either ran or is reported as skipped, with the reason
        ran = [r for r in report["results"] if r["system"].startswith(peer)]
        skipped = [s for s in report["skipped"] if s["system"].startswith(peer)]
        assert len(ran) == 1 or (len(skipped) == 1 and "pip install" in skipped[0]["reason"])
    paths = write_report(report, tmp_path / "out")
    table = paths[0].read_text()
    assert "ours greedy (offline)" in table and "0.0 / 0.0" in table
    assert json.loads(paths[1].read_text())["results"] == report["results"]
    assert paths[2].read_bytes()[:4] == b"\x89PNG"
