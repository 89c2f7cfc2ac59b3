"""Capitals and punctuation: labelling text, training (tiny), the model file, `asr punctuate`, and its bad input."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from asr.punctuation import (
    CAPITALISED,
    COMMA,
    FULL_STOP,
    LOWER,
    NO_MARK,
    QUESTION,
    UPPER,
    Punctuator,
    PunctuatorConfig,
    PunctuatorError,
    windows,
    word_key,
)
from asr.text import normalize_text
from tests.conftest import TINY_PUNCTUATOR as TINY
from training.punctuation import (
    Labeller,
    PunctuationCorpusError,
    PunctuatorTraining,
    gap_mark,
    prepare_punctuation_corpus,
    punctuation_scores,
    score_held_out,
    train_punctuator,
)

# Real text (Jane Austen, Emma, public domain), as a recogniser writes it
EMMA = (
    "emma woodhouse handsome clever and rich with a comfortable home and happy disposition seemed to unite some of the best "
    "blessings of existence and had lived nearly twenty one years in the world with very little to distress or vex her "
    "she was the youngest of the two daughters of a most affectionate indulgent father and had in consequence of her "
    "sister's marriage been mistress of his house from a very early period"
)


def label(text: str) -> list[str]:
    labeller = Labeller()
    for line in text.split("\n"):
        labeller.feed(line)
    labeller.finish()
    marks, cases = ["", ",", ".", "?", "!"], "lcu"
    return [f"{w}{marks[m]}/{cases[c]}" for w, (c, m) in zip(labeller.words, labeller.labels)]


def test_labels_follow_what_a_recogniser_writes():
    assert label("Sixteen years had Miss Taylor been in Mr.\nWoodhouse's family--less as a governess; than a FRIEND!") == [
        "sixteen/c", "years/l", "had/l", "miss/c", "taylor/c", "been/l", "in/l", "mister/c", "woodhouse's/c",
        "family,/l", "less/l", "as/l", "a/l", "governess,/l", "than/l", "a/l", "friend!/u",
    ]  # fmt: skip
    # numbers are spelled out, hyphens split words, the mark goes to the last word; quotes and brackets are not marks
    assert label('He was twenty-one in 1990. "Was he?" (Yes:') == [
        "he/c", "was/l", "twenty/l", "one/l", "in/l", "one/l", "thousand/l", "nine/l", "hundred/l", "ninety./l",
        "was/c", "he?/l", "yes,/c",
    ]  # fmt: skip
    assert gap_mark(" ") == NO_MARK and gap_mark(" -- ") == COMMA and gap_mark('?" ') == QUESTION and gap_mark("...") == FULL_STOP


def test_mixed_case_names_are_learned_from_the_text():
    labeller = Labeller()
    for _ in range(6):
        labeller.feed("Old McDonald had a farm. O'Brien said so.")
    labeller.feed("Mcdonald once.")
    assert labeller.mixed_case_forms() == {"mcdonald": "McDonald", "o'brien": "O'Brien"}


def book_tag(book: int) -> str:
    return "".join(chr(ord("a") + int(digit)) for digit in str(book))  # 12 -> "bc"


BOOK_WORDS = 6 + 20 * 10 + 3


def gutenberg_collection(path, books: int | list[int]):
    """A Gutenberg-like collection: each book opens with a producer's credit and uses its own word (BOOK_WORDS words)."""
    lines = []
    for book in range(books) if isinstance(books, int) else books:
        lines.append(f"Produced by Volunteer BOOK{book_tag(book).upper()} By Someone")
        lines += [f"Word{book_tag(book)} is here, said Mary, {book_tag(i)} times over and over." for i in range(20)] + [
            f"Is it word{book_tag(book)}?"
        ]
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def test_whole_books_are_held_out(tmp_path):
    books = gutenberg_collection(tmp_path / "gutenberg_test.txt.gz", 60)
    other = tmp_path / "speeches.txt"
    other.write_text("Produced by nobody: this file is one document.\nAnd it is never held out!\n")
    meta = prepare_punctuation_corpus([str(other), str(books)], tmp_path / "work")
    held = [re.search(r"BOOK([A-J]+)", b["opening"]).group(1) for b in meta["held_out_books"]]
    assert held == ["BC", "DH"]  # books 12 and 37
    types = [line.split("\t")[0] for line in (tmp_path / "work" / "types.txt").read_text().splitlines()]
    train = {types[i] for i in np.load(tmp_path / "work" / "train-words.npy")}
    held_out = {types[i] for i in np.load(tmp_path / "work" / "held-out-words.npy")}
    assert {"wordbc", "worddh"} <= held_out and not {"wordbc", "worddh"} & train
    assert "never" in train and "never" not in held_out
    assert meta["held_out_words"] == 2 * BOOK_WORDS
    with pytest.raises(PunctuationCorpusError, match="other texts"):
        prepare_punctuation_corpus([str(books)], tmp_path / "work")


def test_a_book_with_a_copy_elsewhere_is_held_out_with_its_copy_or_not_at_all(tmp_path):
    first = gutenberg_collection(tmp_path / "gutenberg_one.txt.gz", 30)
    second = gutenberg_collection(tmp_path / "gutenberg_two.txt.gz", [12, *range(100, 130), 5])
    meta = prepare_punctuation_corpus([str(first), str(second)], tmp_path / "work")
    types = [line.split("\t")[0] for line in (tmp_path / "work" / "types.txt").read_text().splitlines()]
    train = {types[i] for i in np.load(tmp_path / "work" / "train-words.npy")}
    held_out = {types[i] for i in np.load(tmp_path / "work" / "held-out-words.npy")}
    assert {b["opening"] for b in meta["held_out_books"]} == {
        "Produced by Volunteer BOOKBC By Someone",
        "Produced by Volunteer BOOKBAH By Someone",
    }
    assert meta["held_out_words"] == 3 * BOOK_WORDS  # book 12 and its copy, and book 107 (the 38th group)
    assert not {"wordbc", "wordbah"} & train and {"wordbc", "wordbah"} <= held_out and "wordf" in train


def test_training_checkpoints_resumes_and_scores(tmp_path):
    books = gutenberg_collection(tmp_path / "gutenberg_test.txt.gz", 30)
    work = tmp_path / "work"
    prepare_punctuation_corpus([str(books)], work)
    settings = PunctuatorTraining(minutes=0.02, batch_size=4, window=16, checkpoint_minutes=0.01, held_out_words=200)
    log = []
    first = train_punctuator(work, TINY, settings, log=log.append)
    assert (work / "checkpoint.pt").is_file() and log
    steps = first.info["steps"]
    longer = train_punctuator(work, TINY, PunctuatorTraining(**{**settings.__dict__, "minutes": 0.04}), log=log.append)
    assert longer.info["steps"] > steps  # resumed: the step count goes on
    scores = score_held_out(work, longer)
    assert scores["words"] == BOOK_WORDS and scores["books"] == 1
    assert all(0.0 <= scores[k] <= 1.0 for k in ("full_stop_f1", "comma_f1", "question_f1", "capitalised_f1"))
    longer.save(tmp_path / "p.pt")
    assert Punctuator.load(tmp_path / "p.pt").vocabulary == longer.vocabulary
    with pytest.raises(PunctuationCorpusError, match="another shape"):
        train_punctuator(work, PunctuatorConfig(**{**TINY.to_dict(), "hidden": 4}), settings)


class Oracle(Punctuator):
    """Predicts the reference labels: every F1 must be 1."""

    def __init__(self, labels: np.ndarray, tiny_punctuator):
        loaded = Punctuator.load(tiny_punctuator)
        super().__init__(loaded.model, loaded.vocabulary)
        self.labels = labels

    def predict(self, paragraphs):
        results, start = [], 0
        for words in paragraphs:
            chunk = self.labels[start : start + len(words)]
            start += len(words)
            marks = np.eye(5, dtype=np.float32)[chunk % 8]
            results.append((chunk // 8, marks))
        return results


def test_scores_of_an_oracle_and_of_a_model_that_never_punctuates(tiny_punctuator):
    labeller = Labeller()
    for line in ["Where is Mary?", "She went home, with JOHN and the dog.", "Run!"] * 100:
        labeller.feed(line)
    labeller.finish()
    labels = np.array([case * 8 + mark for case, mark in labeller.labels], dtype=np.uint8)
    perfect = punctuation_scores(Oracle(labels, tiny_punctuator), labeller.words, labels)
    assert perfect == {k: 1.0 for k in perfect}
    silent = punctuation_scores(Oracle(labels - labels % 8, tiny_punctuator), labeller.words, labels)
    assert silent["comma_f1"] == 0.0 and silent["question_f1"] == 0.0 and silent["capitalised_f1"] == 1.0


def test_windows_cover_every_word_once():
    for length in (0, 1, 191, 192, 193, 500, 200_000):
        spans = windows(length)
        kept = [i for _, _, a, b in spans for i in range(a, b)]
        assert kept == list(range(length))
        assert all(end - start <= 192 and start <= a and b <= end for start, end, a, b in spans)


def unformatted(text: str) -> str:
    return " ".join(word_key(t) for t in text.split())


def test_words_never_change_and_lines_are_kept(tiny_punctuator):
    punctuator = Punctuator.load(tiny_punctuator)
    lines = [EMMA, "", "   ", "yes", "NASA sent 3 probes to Mars in 2020", "über café naïve", "Hello, world. How are you?", "[unk] hi"]
    out = punctuator.punctuate_lines(lines)
    assert len(out) == len(lines) and out[1] == "" and out[2] == ""
    assert unformatted(out[0]) == EMMA and out[0][0] == "E" and out[0][-1] in ".?!"
    assert out[3] in ("Yes.", "Yes?", "Yes!")
    assert out[4].startswith("NASA") and unformatted(out[4]) == "nasa sent 3 probes to mars in 2020"
    assert unformatted(out[5]) == "über café naïve" and out[5][0] == "Ü"
    assert out[6] == lines[6]  # a paragraph with capitals and marks already is left as it is
    assert punctuator.punctuate_lines(out) == [line.strip() for line in out]  # so formatting twice changes nothing
    assert re.findall("[.,?!]", punctuator.punctuate("hello, world how are you")) == [","]  # marks there: none added
    assert out[7].lower().startswith("[unk] hi") and punctuator.punctuate("[unk]") == "[unk]"  # tags are not words


def test_a_line_of_200000_words(tiny_punctuator):
    punctuator = Punctuator.load(tiny_punctuator)
    words = (EMMA.split() * 4000)[:200_000]
    out = punctuator.punctuate(" ".join(words))
    assert unformatted(out).split() == words


def test_rules_around_the_predictions(tiny_punctuator):
    punctuator = Punctuator.load(tiny_punctuator)
    predicted_cases = np.array([LOWER, LOWER, LOWER, UPPER, CAPITALISED, LOWER])
    marks = np.eye(5, dtype=np.float32)[[NO_MARK, FULL_STOP, NO_MARK, NO_MARK, NO_MARK, COMMA]]
    out = punctuator._apply(["well", "i", "think", "nasa", "mcdonald", "knows"], predicted_cases, marks, complete=True)
    # first word and the word after a full stop capitalised; "I" always; ALL CAPS; a known mixed-case name; the end a full stop
    assert out == ["Well", "I.", "Think", "NASA", "McDonald", "knows."]


def test_bad_model_files(tmp_path):
    with pytest.raises(PunctuatorError, match="not found"):
        Punctuator.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00not a model")
    with pytest.raises(PunctuatorError, match="cannot load"):
        Punctuator.load(tmp_path / "junk.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(PunctuatorError, match="not a punctuation model"):
        Punctuator.load(tmp_path / "other.pt")


def asr_command(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asr", *args], input=stdin, capture_output=True, timeout=300)


def test_punctuate_command(tiny_punctuator, tmp_path):
    text = tmp_path / "in.txt"
    text.write_text(f"{EMMA}\n\nhow are you\r\n")
    done = asr_command("punctuate", str(text), "--punctuation-model", str(tiny_punctuator))
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode().split("\n")
    assert len(out) == 4 and out[1] == "" and out[3] == "" and unformatted(out[0]) == EMMA and unformatted(out[2]) == "how are you"
    piped = asr_command("punctuate", "--punctuation-model", str(tiny_punctuator), stdin=text.read_bytes())
    assert piped.stdout == done.stdout


def test_punctuate_command_bad_input(tiny_punctuator, tmp_path):
    binary = tmp_path / "mixed.bin"
    binary.write_bytes(b"first line\nsecond line\n\x89PNG\x00\x01\x02\n")
    done = asr_command("punctuate", str(binary), "--punctuation-model", str(tiny_punctuator))
    assert done.returncode == 2 and b"binary file" in done.stderr and b"line 3" in done.stderr
    assert len(done.stdout.decode().splitlines()) == 2  # the lines before it are not lost
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    done = asr_command("punctuate", str(latin1), "--punctuation-model", str(tiny_punctuator))
    assert done.returncode == 2 and b"not UTF-8" in done.stderr and done.stdout.decode().splitlines()[0].lower().startswith("ok")
    done = asr_command("punctuate", str(tmp_path / "missing.txt"), "--punctuation-model", str(tiny_punctuator))
    assert done.returncode == 2 and b"missing.txt" in done.stderr
    done = asr_command("punctuate", str(latin1), "--punctuation-model", str(binary))
    assert done.returncode == 2 and b"punctuation model" in done.stderr


def test_the_bundled_model_on_real_text():
    import asr

    out = asr.punctuate(f"{EMMA}\nwhat time is it\n")
    first, question, last = out.split("\n")  # the text's final newline: an empty last line, kept
    assert normalize_text(first) == EMMA and first.startswith("Emma") and first.endswith(".") and "," in first
    assert question == "What time is it?" and last == ""
    info = Punctuator.load(asr.punctuation.BUNDLED_PUNCTUATOR).info
    assert info["held_out"]["books"] >= 10 and info["held_out"]["words"] > 500_000


def test_subtitle_cues_end_at_sentence_ends():
    from asr.decoding import Word
    from asr.formats import cues

    def grouped(sentence: str) -> list[str]:
        texts = sentence.split()
        words = [Word(t.lower().strip(".,?!"), 0.3 * i, 0.3 * i + 0.25, 1.0) for i, t in enumerate(texts)]  # no pauses
        return [" ".join(texts[i] for i in group) for group in cues(words, texts)]

    # a cue long enough ends where its sentence does (unformatted, the words run on to the length limit)
    assert grouped("Yes. I think we should go now, before the rain. It is late and the roads are dark tonight.") == [
        "Yes. I think we should go now, before the rain.",
        "It is late and the roads are dark tonight.",
    ]
    # a cue that must break keeps its last sentence end rather than cutting the next sentence
    assert grouped("We left the old house. The long road north wound through the hills and valleys for many miles") == [
        "We left the old house.",
        "The long road north wound through the hills and valleys for many miles",
    ]


@pytest.fixture(scope="module")
def punctuating_recognizer(tiny_model, tiny_punctuator):
    import asr

    return asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="greedy", punctuation_model=str(tiny_punctuator)))


def test_transcripts_keep_raw_words_and_add_formatted_ones(punctuating_recognizer):
    from asr.formats import format_transcript
    from tests.conftest import DATA

    result = punctuating_recognizer.transcribe(DATA / "how_much_was_it.opus")
    assert result.text == "how much was it" and unformatted(result.formatted_text) == result.text
    assert result.formatted_text[0] == "H" and result.formatted_text[-1] in ".?!" and result.display_text == result.formatted_text
    data = json.loads(format_transcript(result, "json", "x"))
    assert [w["text"] for w in data["words"]] == result.text.split() and [w["formatted"] for w in data["words"]] == result.formatted_words
    assert data["formatted_text"] == result.formatted_text == data["segments"][0]["formatted_text"]
    assert format_transcript(result, "txt") == result.formatted_text + "\n"
    assert result.formatted_text in format_transcript(result, "srt") and result.formatted_text in format_transcript(result, "vtt")
    rows = [row.split("\t") for row in format_transcript(result, "tsv").splitlines()]
    assert rows[0] == ["start", "end", "confidence", "word", "formatted"] and [r[4] for r in rows[1:]] == result.formatted_words
    raw = punctuating_recognizer.transcribe(DATA / "how_much_was_it.opus", punctuate=False)
    assert (
        raw.formatted_text is None
        and format_transcript(raw, "txt") == "how much was it\n"
        and "formatted" not in format_transcript(raw, "json")
    )


def test_streams_format_finals_and_leave_partials_raw(punctuating_recognizer):
    from asr.audio import SAMPLE_RATE
    from streaming.recognizer import Final, Partial, RecognitionStream
    from tests.test_streaming import conversation

    audio = conversation()
    for punctuate in (True, False):
        stream = RecognitionStream(punctuating_recognizer, SAMPLE_RATE, punctuate=punctuate)
        events = [e for start in range(0, len(audio), 4000) for e in stream.accept(audio[start : start + 4000])] + stream.finish()
        finals = [e for e in events if isinstance(e, Final) and e.text]
        assert [f.text for f in finals] == ["how much was it", "does that look good"]
        assert all(p.text == p.text.lower() and not re.search("[.,?!]", p.text) for p in events if isinstance(p, Partial))
        if punctuate:
            assert all(unformatted(f.formatted_text) == f.text and f.formatted_text[0].isupper() for f in finals)
            assert all(f.to_dict()["text"] == f.formatted_text and f.to_dict()["raw_text"] == f.text for f in finals)
        else:
            assert all(f.formatted_text is None and "raw_text" not in f.to_dict() for f in finals)


def test_server_punctuates_when_a_connection_asks(punctuating_recognizer, tiny_model, tmp_path):
    import asyncio

    import asr
    from tests.test_server import RunningServer, vosk_client
    from tests.test_streaming import conversation

    running = RunningServer(punctuating_recognizer)
    try:
        plain = asyncio.run(vosk_client(running.url, conversation(), {"sample_rate": 16000}))
        asked = asyncio.run(vosk_client(running.url, conversation(), {"sample_rate": 16000, "punctuate": True}))
        refused = asyncio.run(vosk_client(running.url, conversation()[:8000], {"punctuate": "yes"}))
    finally:
        running.stop()
    assert " ".join(r["text"] for r in plain if r.get("text")) == "how much was it does that look good"
    assert all("raw_text" not in r for r in plain)
    formatted = [r for r in asked if r.get("text")]
    assert " ".join(r["raw_text"] for r in formatted) == "how much was it does that look good"
    assert all(unformatted(r["text"]) == r["raw_text"] and r["text"][0].isupper() for r in formatted)
    assert all(r["partial"] == r["partial"].lower() for r in asked if "partial" in r)
    assert refused[0]["type"] == "error" and "punctuate must be true or false" in refused[0]["error"]

    everyone = RunningServer(punctuating_recognizer, punctuate=True)
    try:
        replies = asyncio.run(vosk_client(everyone.url, conversation(), {"sample_rate": 16000}))
        opted_out = asyncio.run(vosk_client(everyone.url, conversation(), {"punctuate": False}))
    finally:
        everyone.stop()
    assert all("raw_text" in r for r in replies if r.get("text")) and all("raw_text" not in r for r in opted_out)

    missing = asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="greedy", punctuation_model=str(tmp_path / "none.pt")))
    with pytest.raises(PunctuatorError, match="not found"):
        RunningServer(missing, punctuate=True)
    without = RunningServer(missing)
    try:
        replies = asyncio.run(vosk_client(without.url, conversation(), {"punctuate": True}))
        served = asyncio.run(vosk_client(without.url, conversation()))
    finally:
        without.stop()
    assert replies[0]["type"] == "error" and "cannot punctuate" in replies[0]["error"] and "none.pt" in replies[0]["error"]
    assert " ".join(r["text"] for r in served if r.get("text")) == "how much was it does that look good"
