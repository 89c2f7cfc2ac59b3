import json
import math

import pytest
import torch

from asr.lm import BeamSearchDecoder, DecoderSettings, LanguageModel, LanguageModelError, spell
from asr.text import Vocabulary
from training.lm import build_language_model, find_kenlm_tool

VOCAB = Vocabulary()

# A hand-written bigram ARPA model: "the cat sat on the mat" is likely; "kat" is a rare word.
ARPA = """\\data\\
ngram 1=9
ngram 2=6

\\1-grams:
-1.0\t<unk>\t0
0\t<s>\t-0.3
-1.0\t</s>\t0
-0.7\tthe\t-0.3
-1.0\tcat\t-0.3
-1.2\tsat\t-0.3
-1.2\ton\t-0.3
-1.2\tmat\t-0.3
-4.0\tkat\t-0.3

\\2-grams:
-0.2\t<s> the
-0.1\tthe cat
-0.2\tcat sat
-0.2\tsat on
-0.2\ton the
-0.5\tthe mat

\\end\\
"""


@pytest.fixture
def lm_folder(tmp_path):
    words = ["the", "cat", "sat", "on", "mat", "kat", "red"]
    (tmp_path / "lm.arpa").write_text(ARPA)
    (tmp_path / "lexicon.txt").write_text("".join(f"{w}\t{spell(w)}\n" for w in words))
    (tmp_path / "decoder.json").write_text(
        json.dumps({**DecoderSettings(lm_weight=1.0).to_dict(), "lm": "lm.arpa", "lexicon": "lexicon.txt"})
    )
    return tmp_path


def emissions(frames: list[dict[str, float]]) -> torch.Tensor:
    """Per-frame posteriors given as {token: probability}; the rest of the mass is spread evenly."""
    out = torch.zeros(len(frames), len(VOCAB))
    for t, probs in enumerate(frames):
        rest = (1 - sum(probs.values())) / (len(VOCAB) - len(probs))
        out[t] = rest
        for token, p in probs.items():
            out[t, VOCAB.tokens.index({"_": "<blank>", "|": " "}.get(token, token))] = p
    return out.log()


def spelled(text: str, ambiguous: dict[int, dict[str, float]] | None = None) -> list[dict[str, float]]:
    frames = [{"_": 0.9}]
    for i, ch in enumerate(text):
        frames.append((ambiguous or {}).get(i, {"|" if ch == " " else ch: 0.9}))
        frames.append({"_": 0.9})
    return frames


def test_language_model_prefers_the_likely_word_over_a_misspelling(lm_folder):
    # Acoustically "kat" wins (k 0.5 > c 0.4); the LM knows "the cat" is far more likely.
    log_probs = emissions(spelled("the kat sat", {4: {"k": 0.5, "c": 0.4}}))
    from asr.decoding import greedy_decode

    assert greedy_decode(log_probs, VOCAB, 0.03).text == "the kat sat"
    decoder = BeamSearchDecoder(VOCAB, LanguageModel.load(lm_folder))
    assert decoder.decode(log_probs, 0.03).text == "the cat sat"


def test_hotword_changes_the_output(lm_folder):
    log_probs = emissions(spelled("zed", {0: {"z": 0.5, "r": 0.4}}))
    lm = LanguageModel.load(lm_folder)
    assert BeamSearchDecoder(VOCAB, lm).decode(log_probs, 0.03).text == "red"  # "zed" is not a known word
    assert BeamSearchDecoder(VOCAB, lm, hotwords=["Zed"]).decode(log_probs, 0.03).text == "zed"


def test_lexicon_free_beam_search_spells_unknown_words():
    log_probs = emissions(spelled("zorblat"))
    assert BeamSearchDecoder(VOCAB, None).decode(log_probs, 0.03).text == "zorblat"


def test_word_timings_are_monotonic_and_inside_the_audio(lm_folder):
    log_probs = emissions(spelled("the cat sat on the mat"))
    result = BeamSearchDecoder(VOCAB, LanguageModel.load(lm_folder)).decode(log_probs, 0.03)
    assert result.text == "the cat sat on the mat"
    previous_end = 0.0
    for word in result.words:
        assert previous_end <= word.start < word.end <= round(len(log_probs) * 0.03, 3)
        assert word.confidence > 0.8
        assert word.confidence <= 1
        previous_end = word.end
    # "cat" is characters 4-6: frames 9, 11, 13
    assert math.isclose(result.words[1].start, 9 * 0.03) and math.isclose(result.words[1].end, 14 * 0.03)


def test_missing_or_corrupt_language_model_gives_a_clear_error(lm_folder, tmp_path_factory):
    with pytest.raises(LanguageModelError, match="no decoder.json"):
        LanguageModel.load(tmp_path_factory.mktemp("empty"))
    (lm_folder / "lm.arpa").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(LanguageModelError, match="neither a KenLM binary nor an ARPA"):
        LanguageModel.load(lm_folder)
    (lm_folder / "lm.arpa").unlink()
    with pytest.raises(LanguageModelError, match="missing"):
        LanguageModel.load(lm_folder)
    (lm_folder / "decoder.json").write_text("{not json")
    with pytest.raises(LanguageModelError, match="damaged"):
        LanguageModel.load(lm_folder)


@pytest.mark.skipif(find_kenlm_tool("lmplz") is None, reason="KenLM's lmplz is not installed (asr lm install-kenlm)")
def test_build_language_model_from_a_tiny_text(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat.\nThe cat ate 2 fish!\nA dog sat on the log.\n" * 3)
    folder = build_language_model([text], tmp_path / "lm", order=3, min_count=1)
    lm = LanguageModel.load(folder)
    lexicon = dict(line.split("\t") for line in lm.lexicon_file.read_text().splitlines())
    assert lexicon["cat"] == "c a t |" and lexicon["two"] == "t w o |" and "The" not in lexicon
    log_probs = emissions(spelled("the kat sat", {4: {"k": 0.5, "c": 0.4}}))
    assert BeamSearchDecoder(VOCAB, lm).decode(log_probs, 0.03).text == "the cat sat"


def test_lexicon_free_mode_through_the_recognizer_options(tiny_model):
    import asr
    from tests.conftest import CLIPS, DATA

    recognizer = asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="beam", lm="none"))
    assert recognizer.language_model is None and recognizer.decoder_name == "beam"
    assert recognizer.transcribe(DATA / "how_much_was_it.opus").text == CLIPS["how_much_was_it.opus"]


def test_tune_decoder_grid_searches_and_stores_the_best(tiny_model, tmp_path):
    import subprocess
    import sys

    from tests.conftest import CLIPS, write_manifest
    from tests.test_streaming import write_unigram_lm

    words = sorted({w for text in CLIPS.values() for w in text.split()})
    (tmp_path / "lm").mkdir()
    lm_dir = write_unigram_lm(tmp_path / "lm", words)
    manifest = write_manifest(tmp_path / "dev.jsonl", CLIPS)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "asr",
            "tune-decoder",
            str(manifest),
            "--model",
            str(tiny_model),
            "--lm",
            str(lm_dir),
            "--lm-weights",
            "0.0",
            "0.7",
            "--word-scores",
            "-30",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["results"]) == 4
    best = min(report["results"], key=lambda r: (r["wer"], r["cer"]))
    assert best["wer"] < max(r["wer"] for r in report["results"])  # a word score of -30 deletes words: the grid matters
    stored = json.loads((lm_dir / "decoder.json").read_text())
    assert (stored["lm_weight"], stored["word_score"]) == (report["best"]["lm_weight"], report["best"]["word_score"])


def test_tune_decoder_reports_each_manifest_and_can_choose_by_their_mean(tiny_model, tmp_path):
    import subprocess
    import sys

    from tests.conftest import CLIPS, write_manifest
    from tests.test_streaming import write_unigram_lm

    words = sorted({w for text in CLIPS.values() for w in text.split()})
    (tmp_path / "lm").mkdir()
    lm_dir = write_unigram_lm(tmp_path / "lm", words)
    names = sorted(CLIPS)
    first = write_manifest(tmp_path / "a.jsonl", {n: CLIPS[n] for n in names[:1]})
    rest = write_manifest(tmp_path / "b.jsonl", {n: CLIPS[n] for n in names[1:]})
    command = [sys.executable, "-m", "asr", "tune-decoder", str(first), str(rest), "--model", str(tiny_model)]
    command += ["--lm", str(lm_dir), "--lm-weights", "0.7", "--word-scores", "-30", "1", "--criterion", "mean"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for row in report["results"]:
        assert set(row["manifests"]) == {str(first), str(rest)}
        per_manifest = [r["wer"] for r in row["manifests"].values()]
        assert row["mean_wer"] == pytest.approx(sum(per_manifest) / 2)
    best = min(report["results"], key=lambda r: (r["mean_wer"], r["cer"]))
    assert report["best"]["word_score"] == best["word_score"]
    assert "mean WER" in result.stderr

    bad = subprocess.run(command[:-1] + ["median"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "criterion" in bad.stderr


def test_text_sources_may_be_xz_compressed(tmp_path):
    import lzma

    from training.lm import read_sentences

    with lzma.open(tmp_path / "books.txt.xz", "wt", encoding="utf-8") as handle:
        handle.write("It was the best of times.\nIt was the WORST of times!\n\n")
    assert list(read_sentences(tmp_path / "books.txt.xz")) == ["it was the best of times", "it was the worst of times"]


def test_oov_rates_of_dev_transcripts_by_vocabulary_size(tmp_path):
    from training.lm import oov_rates, word_counts

    (tmp_path / "text.txt").write_text("the cat sat\nthe cat ran\nthe dog\n")
    (tmp_path / "dev.jsonl").write_text('{"audio": "a.wav", "text": "the cat barked"}\n')
    counts = word_counts([tmp_path / "text.txt"])
    assert counts["the"] == 3 and counts["cat"] == 2
    rows = oov_rates(counts, [tmp_path / "dev.jsonl"], [1, 2, 100])
    assert [r[str(tmp_path / "dev.jsonl")] for r in rows] == [66.67, 33.33, 33.33]
    assert [r["words"] for r in rows] == [1, 2, 5]


@pytest.fixture
def existing_lm(tmp_path, monkeypatch):
    """A language-model folder already in place, and lmplz "found" (the builds below fail before running it)."""
    import training.lm

    monkeypatch.setattr(training.lm, "find_kenlm_tool", lambda name: "/usr/bin/true")
    folder = tmp_path / "lm"
    folder.mkdir()
    for name in ("decoder.json", "lexicon.txt", "lm.bin"):
        (folder / name).write_text(f"the old {name}")
    return folder


def _unchanged(folder) -> bool:
    return sorted(p.name for p in folder.parent.iterdir()) == ["lm", "text"] and all(
        (folder / name).read_text() == f"the old {name}" for name in ("decoder.json", "lexicon.txt", "lm.bin")
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "contain no words"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "binary file"),
        (("word " * 25_000).encode(), "one sentence or paragraph a line"),
    ],
)
def test_bad_text_is_a_clear_error_and_leaves_the_existing_lm(existing_lm, content, message):
    from training.lm import LanguageModelBuildError, build_language_model

    text = existing_lm.parent / "text"
    text.mkdir()
    (text / "book.txt").write_bytes(content)
    with pytest.raises(LanguageModelBuildError, match=message):
        build_language_model([text / "book.txt"], existing_lm)
    assert _unchanged(existing_lm)


def test_an_interrupted_build_leaves_the_existing_lm(existing_lm, monkeypatch):
    import training.lm

    text = existing_lm.parent / "text"
    text.mkdir()
    (text / "book.txt").write_text("the cat sat\n" * 10)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.lm, "_estimate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        training.lm.build_language_model([text / "book.txt"], existing_lm)
    assert _unchanged(existing_lm)  # and no staging folder left beside it
