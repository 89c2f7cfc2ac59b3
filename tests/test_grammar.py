"""Grammars (recognition restricted to phrases, "[unk]" for anything else) and N-best alternatives, on real clips."""

import json
import subprocess
import sys

import numpy as np
import pytest

import asr
from asr.audio import SAMPLE_RATE, load_audio
from asr.grammar import UNK, Grammar, GrammarAutomaton, GrammarError
from streaming.recognizer import Final, Partial, RecognitionStream
from tests.conftest import CLIPS, DATA
from tests.test_streaming import conversation, write_unigram_lm

HOW, DOES = (DATA / name for name in CLIPS)
BOTH = list(CLIPS.values())  # ["how much was it", "does that look good"]


@pytest.fixture(scope="module")
def recognizer(tiny_model):
    """Greedy for free text: a grammar decodes with its own beam search, and needs no language model."""
    return asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="greedy"))


def test_each_clip_gives_its_phrase(recognizer):
    assert recognizer.transcribe(HOW, grammar=BOTH).text == "how much was it"
    assert recognizer.transcribe(DOES, grammar=BOTH).text == "does that look good"
    result = recognizer.transcribe(DOES, grammar=BOTH)
    assert [w.text for w in result.words] == ["does", "that", "look", "good"]
    assert all(0 <= w.start < w.end <= result.duration + 0.03 and 0 < w.confidence <= 1 for w in result.words)


def test_a_grammar_restricts_even_where_the_free_transcript_differs(recognizer):
    assert recognizer.transcribe(HOW).text == "how much was it"
    assert recognizer.transcribe(HOW, grammar=["How much is it?", "does that look good"]).text == "how much is it"


def test_unk_stands_for_anything_else(recognizer):
    for clip in (HOW, DOES):
        assert recognizer.transcribe(clip, grammar=["zero", "one", UNK]).text == UNK
    assert recognizer.transcribe(HOW, grammar=["how much was it", UNK]).text == "how much was it"
    assert recognizer.transcribe(DOES, grammar=["how much was it", UNK]).text == UNK
    # without "[unk]" nothing outside the grammar comes out
    assert recognizer.transcribe(DOES, grammar=["zero", "one"]).text in ("", "zero", "one")


def test_an_utterance_may_hold_a_sequence_of_phrases(recognizer):
    assert recognizer.transcribe(HOW, grammar=["how much", "was it"]).text == "how much was it"
    audio = np.concatenate([load_audio(HOW), load_audio(DOES)])
    assert recognizer.transcribe(audio, SAMPLE_RATE, grammar=BOTH).text == "how much was it does that look good"


def test_default_grammar_from_options_and_with_a_language_model(tiny_model, tmp_path):
    lm = write_unigram_lm(tmp_path, ["how", "was", "it", "mush", "lunch"])  # the LM cannot say "much"
    with_lm = asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="beam", lm=str(lm), grammar=BOTH))
    assert with_lm.grammar == Grammar(tuple(BOTH)) and with_lm.transcribe(HOW).text == "how much was it"
    assert with_lm.transcribe(DOES).text == "does that look good"


def test_alternatives_are_sorted_probabilities(tiny_model, recognizer):
    beam = asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="beam", lm="none"))
    result = beam.transcribe(DOES, alternatives=3)
    alternatives = result.alternatives
    assert len(alternatives) == 3 and alternatives[0].text == result.text == "does that look good"
    confidences = [a.confidence for a in alternatives]
    assert confidences == sorted(confidences, reverse=True)
    assert all(0 < c <= 1 for c in confidences) and sum(confidences) <= 1 + 1e-9
    assert len({a.text for a in alternatives}) == 3 and all(a.words for a in alternatives)
    assert beam.transcribe(DOES).alternatives == []  # only when asked for
    # over a grammar: at most N, each one a grammar sentence
    with_grammar = recognizer.transcribe(HOW, grammar=["how much was it", "how much is it", UNK], alternatives=5)
    assert 1 <= len(with_grammar.alternatives) <= 5 and with_grammar.alternatives[0].text == "how much was it"
    for alternative in with_grammar.alternatives:
        assert set(alternative.text.split()) <= {"how", "much", "was", "is", "it", UNK}
    # the greedy decoder considers one hypothesis
    greedy = recognizer.transcribe(HOW, alternatives=3).alternatives
    assert [(a.text, a.confidence) for a in greedy] == [("how much was it", 1.0)]


def test_bundled_model_with_a_grammar_of_digits():
    # An 8 kHz recording of "zero" (Free Spoken Digit Dataset); the grammar needs no KenLM model. Whether this one
    # short clip comes out right depends on the bundled model of the day (4 % of fsdd dev does not, docs/benchmarks.md),
    # so this checks what the grammar guarantees: one of its words or nothing (the model of 2026-12-03's second
    # session hears almost nothing in this clip: greedy "e", grammar empty with "two" second), an N-best list whose
    # confidences share one mass. With the bundled model shipped with a phone layer, grammars read the character layer.
    digits = "zero one two three four five six seven eight nine".split()
    recognizer = asr.load_model(device="cpu", options=asr.DecodeOptions(grammar=digits))
    result = recognizer.transcribe(DATA / "zero_8khz.opus", alternatives=3)
    assert result.text in digits + [""] and result.alternatives[0].text == result.text
    assert 1 <= len(result.alternatives) <= 3 and all(a.text in digits or a.text == "" for a in result.alternatives)
    assert sum(a.confidence for a in result.alternatives) <= 1 + 1e-9


def test_bundled_model_picks_the_spoken_phrase_of_a_grammar():
    # Five sentences sharing words; the 5.3 s recording says the first. The bundled model chooses it with a wide
    # margin (confidence 1.0 at release), so this holds on any CPU and for any better model.
    phrases = [
        "and costing eleven pounds fifteen shillings eight pence within ten days",
        "the prisoners were marched to the chapel every morning",
        "eleven men were found guilty within ten days",
        "he paid fifteen shillings for the room and eight pence for the candles",
        "costing nothing at all",
    ]
    recognizer = asr.load_model(device="cpu", options=asr.DecodeOptions(grammar=phrases))
    result = recognizer.transcribe(DATA / "LJ002-0179.opus", alternatives=3)
    assert result.text == phrases[0]
    assert result.alternatives[0].text == phrases[0] and result.alternatives[0].confidence > 0.9


def test_bad_grammars_and_alternatives_give_clear_errors(tiny_model, recognizer):
    for bad, message in (
        ([], "at least one phrase"),
        ([UNK], "besides"),
        ("zero one", "list of phrases"),
        (["zero", "d\u00e9j\u00e0 vu"], "cannot be spelled"),
        (["zero", "?!"], "no words"),
        (["zero", 7], "strings"),
    ):
        with pytest.raises(GrammarError, match=message):
            recognizer.transcribe(HOW, grammar=bad)
        with pytest.raises(ValueError, match=message):
            asr.DecodeOptions(grammar=bad)
    with pytest.raises(ValueError, match="alternatives"):
        recognizer.transcribe(HOW, alternatives=-1)
    with pytest.raises(ValueError, match="alternatives"):
        asr.DecodeOptions(alternatives=True)
    with pytest.raises(ValueError, match="not both"):
        asr.DecodeOptions(grammar=("zero",), hotwords=("one",))
    # a model whose characters lack the apostrophe
    assert "'" in recognizer.vocabulary.tokens
    with pytest.raises(GrammarError, match="cannot be spelled"):
        Grammar.parse(["it's"], tokens=("<blank>", " ", *"abcdefghijklmnopqrstuvwxyz"))


def test_phrases_are_normalised_like_transcripts():
    grammar = Grammar.parse(["Seven", "42", "  seven ", "[UNK]", "rock-n-roll"])
    assert grammar == Grammar(("seven", "forty two", "rock n roll"), unk=True)


def test_the_automaton_charges_the_cheapest_parse():
    automaton = GrammarAutomaton(Grammar.parse(["one", "one two", "two four", UNK]), unk_penalty=2.0, empty_penalty=4.0)

    def cost(text: str) -> float:
        state, total = automaton.start, 0.0
        for char in text:
            state, step = automaton.step(state, char)
            total += step
        return total + automaton.finish(state)

    assert cost("") == 0.0 and cost("  ") == 0.0
    assert cost("one") == cost("one two") == cost("one two four") == cost("two four one") == -4.0  # any words earn 4
    assert cost("one three") == -4.0 + 2.0 * len("three")  # "three" is garbage
    assert cost("one tw") == -4.0 + 2.0 * len("tw")  # an unfinished phrase ends as garbage
    assert automaton.label("one two four".split()) == [(0, 1, "phrase"), (1, 3, "phrase")]
    assert automaton.label("one tw".split(), partial=True) == [(0, 1, "prefix")]  # "tw" is hidden until finished
    strict = GrammarAutomaton(Grammar.parse(["one", "two"]))
    assert strict.finish(strict.step(strict.start, "o")[0]) >= 1000  # ending inside a phrase is forbidden


def test_streaming_partials_are_prefixes_of_the_grammar(recognizer):
    phrases = BOTH
    stream = RecognitionStream(recognizer, SAMPLE_RATE, grammar=phrases, alternatives=2)
    audio, events = conversation(), []
    for start in range(0, len(audio), SAMPLE_RATE // 10):
        events += stream.accept(audio[start : start + SAMPLE_RATE // 10])
    events += stream.finish()
    finals = [e for e in events if isinstance(e, Final)]
    partials = [e for e in events if isinstance(e, Partial)]
    assert [f.text for f in finals] == phrases
    assert all(f.alternatives and f.alternatives[0].text == f.text for f in finals)
    assert partials and all(p.committed == 0 for p in partials)
    prefixes = {" ".join(p.split()[:i]) for p in phrases for i in range(1, len(p.split()) + 1)}
    assert all(p.text in prefixes for p in partials), [p.text for p in partials]


def test_cli_grammar_and_alternatives(tiny_model, tmp_path):
    grammar = tmp_path / "grammar.txt"
    grammar.write_text("how much was it\n\ndoes that look good\n")
    command = [sys.executable, "-m", "asr", "transcribe", str(HOW), "-m", str(tiny_model), "--threads", "1"]
    result = subprocess.run([*command, "--grammar-file", str(grammar), "-f", "json", "--alternatives", "2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["text"] == "how much was it" and output["alternatives"][0]["text"] == "how much was it"
    result = subprocess.run([*command, "--grammar", "zero,one,[unk]"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == UNK, result.stderr
    result = subprocess.run([*command, "--grammar", " , "], capture_output=True, text=True)
    assert result.returncode == 2 and "at least one phrase" in result.stderr
