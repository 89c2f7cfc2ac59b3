"""`asr data synth`: sentence selection, exclusion of dev text, and rendering with each installed engine."""

import dataclasses
import json
import os

import numpy as np
import pytest
import soundfile as sf

from asr.features import FeatureConfig
from asr.text import normalize_text
from training import tts
from training.data import load_features
from training.manifest import read_manifest
from training.synth import Exclusions, SynthConfig, SynthError, speakable, split_sentences, synthesize

SENTENCES = [
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It is easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
]
DEV = ["It is easy to tell the depth of a well.", "The juice of lemons makes fine punch."]  # must never be rendered
UNSPEAKABLE = ["He paid 42 dollars for it.", "The FBI came at noon today.", "Mr. Smith went to town.", "Call the U.S. Navy now."]
ENGINE_BINARIES = ("espeak", "flite", "festival")  # from apt; piper is a Python extra


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth-text")
    text = folder / "text.txt"
    # two sentences per paragraph line, plus lines the engines would read unlike the normaliser
    text.write_text("\n".join([" ".join(SENTENCES[i : i + 2]) for i in range(0, len(SENTENCES), 2)] + UNSPEAKABLE) + "\n")
    dev = folder / "dev.jsonl"
    dev.write_text("".join(json.dumps({"audio": "x.opus", "duration": 1.0, "text": normalize_text(s)}) + "\n" for s in DEV))
    return text, dev


@pytest.fixture(scope="module")
def voices():
    return tts.discover_voices()


def test_sentences_are_split_and_unspeakable_ones_skipped():
    assert split_sentences('"Go away," he said. She left! Why? it ends') == ['"Go away," he said.', "She left!", "Why? it ends"]
    assert split_sentences("Ask Mr. Smith. Ask J. Smith.") == ["Ask Mr. Smith.", "Ask J. Smith."]
    assert split_sentences("one two three four; five six seven eight", max_words=5) == ["one two three four", "five six seven eight"]
    assert speakable("The birch canoe slid on the smooth planks.") == "the birch canoe slid on the smooth planks"
    assert speakable("I don\u2019t know, \u201csaid\u201d she.") == "i don't know said she"
    assert all(speakable(s) is None for s in UNSPEAKABLE)
    assert speakable("Too short.") is None and speakable(" ".join(["word"] * 30) + ".") is None


def test_exclusions_match_whole_transcripts_and_word_bounded_parts():
    ex = Exclusions(["it is easy to tell the depth of a well", "zero"])
    assert "it is easy to tell the depth of a well" in ex
    assert "the depth of a well" in ex and "a well" not in ex  # five words or more within a dev transcript
    assert "he said it is easy to tell the depth of a well today" in ex  # holds one
    assert "the depth of a wellington" not in ex and "zero hour came" not in ex  # short transcripts only match exactly


def _check_manifest(folder, engines, excluded):
    manifest = folder / "train.jsonl"
    entries = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert entries
    for entry in entries:
        assert set(entry) == {"audio", "duration", "text", "raw_text", "speaker", "sample_rate"}
        assert entry["speaker"].split(":")[0] in engines and entry["sample_rate"] == 16000
        assert entry["text"] == normalize_text(entry["raw_text"]) and entry["raw_text"] in SENTENCES
        assert entry["text"] not in excluded
        info = sf.info(str(folder / entry["audio"]))
        assert info.samplerate == 16000 and info.channels == 1
        audio, _ = sf.read(str(folder / entry["audio"]))
        assert abs(len(audio) / 16000 - entry["duration"]) < 0.002
        assert 0.5 < entry["duration"] < 10 and np.abs(audio).max() > 0.1
    utterances = read_manifest(manifest)
    assert [u.text for u in utterances] == [e["text"] for e in entries]
    return entries


@pytest.mark.parametrize("engine", tts.ENGINES)
def test_each_installed_engine_renders_a_manifest(engine, corpus, voices, tmp_path):
    if engine not in voices.found:
        if os.environ.get("CI") and engine in ENGINE_BINARIES:  # .ci/run installs these
            pytest.fail(f"{engine} is missing in CI: {voices.missing.get(engine)}")
        pytest.skip(f"{engine} is not installed ({voices.missing.get(engine)})")
    text, dev = corpus
    config = SynthConfig(texts=(str(text),), output_dir=str(tmp_path / "out"), hours=0.002, voices=(engine,), exclude=(str(dev),), seed=3)
    report = synthesize(config)
    entries = _check_manifest(tmp_path / "out", (engine,), {normalize_text(s) for s in DEV})
    stats = report.engines[engine]
    assert list(report.engines) == [engine] and stats.utterances == len(entries) and stats.failed == 0
    assert stats.seconds >= 0.002 * 3600 or report.ran_out_of_text
    assert stats.rendered >= len(entries) and stats.speed > 0  # timing is measured (its value depends on the machine)
    assert set(stats.voices) <= set(voices.found[engine])
    saved = json.loads((tmp_path / "out" / "synth.json").read_text())
    assert saved["voices_found"][engine] == voices.found[engine] and saved["settings"]["hours"] == 0.002


def test_all_sentences_idempotent_rerun_and_features(corpus, voices, tmp_path):
    engines = [e for e in ("espeak", "flite") if e in voices.found]
    if not engines:
        pytest.skip("neither espeak-ng nor flite is installed (apt-get install espeak-ng flite)")
    text, dev = corpus
    out = tmp_path / "out"
    config = SynthConfig(texts=(str(text),), output_dir=str(out), hours=1.0, voices=(",".join(engines),), exclude=(str(dev),), jobs=2)
    first = synthesize(config)  # asks for more than the text holds: every sentence once, split between the engines
    assert first.ran_out_of_text and first.excluded == len(DEV)
    entries = _check_manifest(out, engines, {normalize_text(s) for s in DEV})
    assert sorted(e["raw_text"] for e in entries) == sorted(set(SENTENCES) - set(DEV))
    before = (out / "train.jsonl").read_text()
    again = synthesize(dataclasses.replace(config, jobs=1))
    assert sum(s.rendered for s in again.engines.values()) == 0  # every file reused
    assert (out / "train.jsonl").read_text() == before
    features = load_features(out / "train.jsonl", FeatureConfig(), tmp_path / "cache")
    assert len(features.utterances) == len(entries)


def test_missing_engines_are_reported_with_install_commands(monkeypatch, corpus, tmp_path):
    monkeypatch.setattr(tts.shutil, "which", lambda name: None)
    monkeypatch.setattr(tts, "piper_models", lambda: {})
    report = tts.discover_voices()
    assert report.found == {}
    assert "apt-get install flite" in report.missing["flite"] and "espeak-ng" in report.missing["espeak"]
    assert "festvox-us-slt-hts" in report.missing["festival"] and "[synth]" in report.missing["piper"]
    text, _ = corpus
    with pytest.raises(SynthError, match="apt-get install flite"):
        synthesize(SynthConfig(texts=(str(text),), output_dir=str(tmp_path / "out"), hours=0.01, voices=("flite",)))
    with pytest.raises(SynthError, match="no known engine"):
        synthesize(SynthConfig(texts=(str(text),), output_dir=str(tmp_path / "out"), voices=("sapi",)))


def test_cli_lists_voices_and_renders(corpus, voices, tmp_path, capsys):
    from asr.cli import main

    assert main(["data", "synth", "--list-voices"]) == 0
    listed = capsys.readouterr().out
    assert all(engine in listed for engine in tts.ENGINES)
    engine = next((e for e in ("espeak", "flite") if e in voices.found), None)
    if engine is None:
        pytest.skip("neither espeak-ng nor flite is installed (apt-get install espeak-ng flite)")
    text, dev = corpus
    args = [str(text), "-o", str(tmp_path / "out"), "--hours", "0.001", "--voices", engine, "--exclude", str(dev)]
    assert main(["data", "synth", *args]) == 0
    err = capsys.readouterr().err
    assert f"found {engine}" in err and "wrote" in err and "x real time" in err and (tmp_path / "out" / "train.jsonl").is_file()
    assert main(["data", "synth", str(text), "-o", str(tmp_path / "bad"), "--voices", "sapi"]) == 2
    assert "no known engine" in capsys.readouterr().err
