"""Phones as output units: pronunciations, the phone output layer, training it, and decoding it with a phone lexicon."""

import csv
import functools
import itertools
import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

import asr
from asr.audio import SAMPLE_RATE, load_audio
from asr.checkpoint import CheckpointError, ModelBundle, bundle_from_dict, bundle_to_dict, load_model_file, save_model
from asr.lm import PHONE_LEXICON_FILE, BeamSearchDecoder, DecoderSettings, LanguageModel, ctc_log_likelihoods, spell_phones
from asr.model import CTCModel
from asr.phones import (
    PHONE_TOKENS,
    PHONES,
    EspeakLibrary,
    Pronouncer,
    PronunciationWarning,
    espeak_backend,
    ipa_to_arpabet,
    phone_vocabulary,
)
from asr.text import Vocabulary
from streaming.recognizer import Final, RecognitionStream
from tests.conftest import CLIPS, DATA, TINY_MODEL, quiet_noise, tiny_train_config, write_manifest
from tests.test_streaming import write_unigram_lm

needs_espeak = pytest.mark.skipif(espeak_backend() is None, reason="neither espeakng-loader (pip) nor espeak-ng (apt) is installed")
LETTERS = "'abcdefghijklmnopqrstuvwxyz"


def test_cmudict_pronunciations_without_stress():
    pronouncer = Pronouncer()
    assert pronouncer.pronounce("hello") == ("HH", "AH", "L", "OW")
    assert set(pronouncer.variants("read")) == {("R", "EH", "D"), ("R", "IY", "D")}
    assert pronouncer.phones_of_text("hi there") == ["HH", "AY", " ", "DH", "EH", "R"]
    assert all(p in PHONES for word in ("thought", "judge", "measure", "boy") for p in pronouncer.pronounce(word))


@needs_espeak
def test_words_outside_cmudict_are_spelled_by_espeak():
    pronouncer = Pronouncer()
    assert not pronouncer.in_dictionary("cucumetto")
    assert pronouncer.pronounce("cucumetto") == ("K", "Y", "UW", "K", "Y", "UW", "M", "EH", "T", "OW")
    guessed = pronouncer.guess(["ronicky", "vampa"])
    assert guessed == {"ronicky": ("R", "AA", "N", "IH", "K", "IY"), "vampa": ("V", "AE", "M", "P", "AH")}


def test_espeak_comes_from_pip_and_spells_like_the_program(monkeypatch):
    """The espeakng-loader wheel's library needs no espeak-ng program (a machine set up with pip alone)."""
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    backend = espeak_backend()
    assert isinstance(backend, EspeakLibrary)
    assert Pronouncer().guess(["kheafield", "zyzzogeton"]) == {
        "kheafield": ("K", "IY", "F", "IY", "L", "D"),
        "zyzzogeton": ("Z", "IH", "Z", "OW", "JH", "T", "AH", "N"),
    }
    assert backend.ipa("cucumetto") == ["k", "j", "ˌuː", "k", "j", "uː", "m", "ˈɛ", "ɾ", "oʊ"]  # as `espeak-ng --ipa --sep=_`


def without_espeak(monkeypatch) -> None:
    import asr.phones

    monkeypatch.setattr(asr.phones, "espeak_backend", lambda: None)
    asr.phones.shared_pronouncer.cache_clear()
    monkeypatch.setattr(asr.phones, "shared_pronouncer", functools.cache(lambda: Pronouncer()))


def test_an_unpronounceable_hotword_is_left_out_with_a_warning(tmp_path, monkeypatch):
    from training.lm import add_phone_lexicon

    without_espeak(monkeypatch)
    folder = write_unigram_lm(tmp_path, ["how", "the", "sat", "mat", "zyzzogeton"])
    with pytest.warns(PronunciationWarning, match="zyzzogeton"):
        words, _ = add_phone_lexicon(folder)  # `asr lm build --phones` leaves the word out instead of failing
    assert words == 5 and not any(line.startswith("zyzzogeton") for line in (folder / PHONE_LEXICON_FILE).read_text().splitlines())
    phones_lm = LanguageModel.load(folder).for_units("phones")
    with pytest.warns(PronunciationWarning, match="kheafield"):
        decoder = BeamSearchDecoder(phone_vocabulary(), phones_lm, DecoderSettings(lm_weight=0.5), hotwords=["Kheafield", "cat"])
    spoken = Pronouncer().phones_of_text("the cat sat")
    assert decoder.decode(phone_emissions(spoken), 0.03).text == "the cat sat"  # the other hotword still works


def test_without_espeak_unknown_words_are_a_clear_error():
    from asr.phones import PronunciationError

    with pytest.raises(PronunciationError, match="not in CMUdict"):
        Pronouncer(use_espeak=False).pronounce("cucumetto")


def test_ipa_segments_map_to_arpabet():
    assert ipa_to_arpabet(["tʃ", "ˈɜː", "tʃ"]) == ("CH", "ER", "CH")
    assert ipa_to_arpabet(["b", "ˈɑː", "ɾ", "əl"]) == ("B", "AA", "T", "AH", "L")
    assert ipa_to_arpabet(["dʒ", "ʌ", "s", "t", "ˈɪ", "n", "iə", "n"]) == ("JH", "AH", "S", "T", "IH", "N", "IY", "AH", "N")


def test_the_phone_output_layer_shares_the_encoder():
    torch.manual_seed(0)
    model = CTCModel(replace(TINY_MODEL, phone_vocab_size=len(PHONE_TOKENS))).eval()
    features, lengths = torch.randn(2, 120, 80), torch.tensor([120, 90])
    chars, out_lengths, _ = model(features, lengths)
    phones, _, _ = model(features, lengths, head="phones")
    both, _, _ = model(features, lengths, head="both")
    assert chars.shape == (2, 60, 29) and phones.shape == (2, 60, len(PHONE_TOKENS))
    assert torch.equal(both, torch.cat([chars, phones], dim=-1)) and out_lengths.tolist() == [60, 45]
    with pytest.raises(ValueError, match="no phone output layer"):
        CTCModel(TINY_MODEL)(features, lengths, head="phones")


def test_checkpoints_keep_the_phone_vocabulary(tmp_path, tiny_model):
    old = load_model_file(tiny_model)  # a model file from before phones loads as a characters-only model
    assert old.phone_vocabulary is None and old.model.phone_output is None
    model = CTCModel(replace(TINY_MODEL, phone_vocab_size=len(PHONE_TOKENS)))
    bundle = ModelBundle(model, old.feature_config, old.vocabulary, {}, phone_vocabulary())
    save_model(bundle, tmp_path / "m.pt")
    assert load_model_file(tmp_path / "m.pt").phone_vocabulary.tokens == PHONE_TOKENS
    data = bundle_to_dict(bundle)
    data["phone_vocabulary"] = data["phone_vocabulary"][:-1]
    with pytest.raises(CheckpointError, match="phone vocabulary size"):
        bundle_from_dict(data)


def mirrored_phone_model(tiny_model, path):
    """The committed tiny model with a phone output layer that copies its character layer, letter i -> PHONES[i].

    Its phone posteriors are its character posteriors under another name, so decoding the phones with a lexicon that
    spells each word in those "phones" must give exactly what decoding the characters gives, on any CPU.
    """
    bundle = load_model_file(tiny_model)
    chars = bundle.model
    model = CTCModel(replace(chars.config, phone_vocab_size=len(PHONE_TOKENS)))
    model.load_state_dict(chars.state_dict(), strict=False)
    with torch.no_grad():
        model.phone_output.weight.zero_()
        model.phone_output.bias.fill_(-30.0)
        for phone_id, char_id in [(0, 0), (1, bundle.vocabulary.space_id)] + [
            (2 + i, bundle.vocabulary.tokens.index(letter)) for i, letter in enumerate(LETTERS)
        ]:
            model.phone_output.weight[phone_id] = chars.output.weight[char_id]
            model.phone_output.bias[phone_id] = chars.output.bias[char_id]
    save_model(ModelBundle(model, bundle.feature_config, bundle.vocabulary, {}, phone_vocabulary()), path)
    return path


def letter_phones(word: str) -> list[str]:
    return [PHONES[LETTERS.index(letter)] for letter in word]


@pytest.fixture
def phone_setup(tiny_model, tmp_path):
    words = sorted({w for text in CLIPS.values() for w in text.split()} | {"cat", "hat"})
    folder = write_unigram_lm(tmp_path, words)
    (folder / PHONE_LEXICON_FILE).write_text("".join(f"{w}\t{spell_phones(letter_phones(w))}\n" for w in words))
    config = json.loads((folder / "decoder.json").read_text())
    (folder / "decoder.json").write_text(json.dumps({**config, "phone_lexicon": PHONE_LEXICON_FILE}))
    return mirrored_phone_model(tiny_model, tmp_path / "phones.pt"), folder


@pytest.mark.parametrize("char_weight", [0.0, 0.5])
def test_phones_decode_like_characters_offline_and_streaming(phone_setup, char_weight):
    model, lm = phone_setup
    settings = {"char_weight": char_weight}  # > 0: finals reranked with the character layer, offline and streaming alike
    phones = asr.load_model(model, "cpu", asr.DecodeOptions(decoder="beam", lm=str(lm), settings=settings))
    chars = asr.load_model(model, "cpu", asr.DecodeOptions(decoder="beam", lm=str(lm), units="chars"))
    assert phones.units == "phones" and phones.language_model.units == "phones" and chars.units == "chars"
    first, second = (load_audio(DATA / name) for name in CLIPS)
    audio = np.concatenate([quiet_noise(0.3), first, quiet_noise(1.2, 1), second, quiet_noise(0.3, 2)])
    offline = phones.transcribe(audio, SAMPLE_RATE, alternatives=2)
    assert offline.text == chars.transcribe(audio, SAMPLE_RATE).text == "how much was it does that look good"
    assert [w.text for w in offline.words] == offline.text.split()
    assert all(0 <= w.start < w.end <= len(audio) / SAMPLE_RATE for w in offline.words)
    assert offline.alternatives[0].text == offline.text
    stream = RecognitionStream(phones, SAMPLE_RATE)
    events = []
    for start in range(0, len(audio), SAMPLE_RATE // 5):
        events += stream.accept(audio[start : start + SAMPLE_RATE // 5])
    events += stream.finish()
    assert " ".join(e.text for e in events if isinstance(e, Final)) == offline.text
    # grammars and the greedy decoder read the character layer of the same model
    assert phones.transcribe(first, SAMPLE_RATE, grammar=["how much was it", "what is it"]).text == "how much was it"
    greedy = asr.load_model(model, "cpu", asr.DecodeOptions(decoder="greedy", lm=str(lm)))
    assert greedy.units == "chars" and greedy.transcribe(second, SAMPLE_RATE).text == "does that look good"


def test_phones_need_a_phone_layer_and_a_phone_lexicon(tiny_model, phone_setup):
    model, lm = phone_setup
    with pytest.raises(ValueError, match="no phone output layer"):
        asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="beam", lm=str(lm), units="phones"))
    assert asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="beam", lm=str(lm))).units == "chars"
    config = json.loads((lm / "decoder.json").read_text())
    del config["phone_lexicon"]
    (lm / "decoder.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no phone lexicon"):
        asr.load_model(model, "cpu", asr.DecodeOptions(decoder="beam", lm=str(lm), units="phones"))


def phone_emissions(tokens: list[str]) -> torch.Tensor:
    """Each token for one frame at 0.9 between blank frames; the rest of the mass spread evenly."""
    vocabulary = phone_vocabulary()
    frames = ["<blank>"]
    for token in tokens:
        frames += [token, "<blank>"]
    out = torch.full((len(frames), len(vocabulary)), 0.1 / (len(vocabulary) - 1))
    for t, token in enumerate(frames):
        out[t, vocabulary.tokens.index(token)] = 0.9
    return out.log()


def test_ctc_log_likelihoods_sum_over_all_alignments():
    torch.manual_seed(0)
    log_probs = torch.randn(4, 3).log_softmax(-1)  # 4 frames over blank, "a", "b"

    def brute_force(target: list[int]) -> float:
        total = 0.0
        for path in itertools.product(range(3), repeat=4):
            collapsed = [t for i, t in enumerate(path) if t != 0 and (i == 0 or t != path[i - 1])]
            if collapsed == target:
                total += math.exp(sum(log_probs[i, t].item() for i, t in enumerate(path)))
        return math.log(total)

    targets = [[1], [1, 2], [1, 1], [], [2, 1, 2]]
    for got, target in zip(ctc_log_likelihoods(log_probs, targets), targets):
        assert got == pytest.approx(brute_force(target), abs=1e-4)
    assert ctc_log_likelihoods(log_probs, [[1, 1, 1]]) == [-math.inf]  # needs 5 frames
    assert ctc_log_likelihoods(log_probs, []) == []


def frames_of(tokens: list[str], vocabulary: Vocabulary, length: int) -> torch.Tensor:
    """log-probs (length, vocab): each token for one frame at 0.9 between blank frames, blanks after."""
    out = torch.full((length, len(vocabulary)), 0.1 / (len(vocabulary) - 1))
    out[:, 0] = 0.9
    for i, token in enumerate(tokens):
        out[2 * i + 1, 0] = 0.1 / (len(vocabulary) - 1)
        out[2 * i + 1, vocabulary.tokens.index(token)] = 0.9
    return out.log()


def test_the_character_layer_reranks_homophones_of_a_phone_search(tmp_path):
    from training.lm import add_phone_lexicon

    homophones = ["to", "too", "two"]  # all T UW
    folder = write_unigram_lm(tmp_path, ["how", *homophones])
    arpa = (folder / "lm.arpa").read_text()
    (folder / "lm.arpa").write_text(arpa.replace("-1.0\ttoo", "-1.5\ttoo").replace("-1.0\ttwo", "-2.0\ttwo"))  # LM: "to"
    add_phone_lexicon(folder, Pronouncer(use_espeak=False))
    lm = LanguageModel.load(folder).for_units("phones")
    chars = Vocabulary()  # the default characters
    spoken = frames_of(["T", "UW"], phone_vocabulary(), 12)
    plain = BeamSearchDecoder(phone_vocabulary(), lm, DecoderSettings(lm_weight=0.5), char_vocabulary=chars)
    reranking = BeamSearchDecoder(phone_vocabulary(), lm, DecoderSettings(lm_weight=0.5, char_weight=1.0), char_vocabulary=chars)
    unranked = plain.decode(spoken, 0.03).text
    assert unranked == "to"
    for word in homophones:
        written = frames_of(list(word), chars, 12)
        assert plain.decode(spoken, 0.03, char_log_probs=written).text == unranked  # weight 0: the phone search's order
        result = reranking.decode(spoken, 0.03, alternatives=3, char_log_probs=written)
        assert result.text == word and [w.text for w in result.words] == [word]
        assert result.alternatives[0].text == word and {a.text for a in result.alternatives} == set(homophones)
        assert sum(a.confidence for a in result.alternatives) <= 1.0 + 1e-6
        assert result.alternatives[0].confidence > result.alternatives[1].confidence
        # partial results are the phone search's own; without character frames nothing is reranked
        for decoder in (plain, reranking):
            decoder.begin()
            decoder.step(spoken)
        partial = reranking.best(spoken, 0.03, final=False, char_log_probs=written)
        assert partial.text == plain.best(spoken, 0.03, final=False).text
        assert reranking.decode(spoken, 0.03).text == unranked
    with pytest.raises(ValueError, match="char_weight"):
        DecoderSettings(char_weight=-1.0)


def test_phone_lexicon_of_a_language_model_and_hotwords_spelled_from_cmudict(tmp_path):
    from training.lm import add_phone_lexicon

    folder = write_unigram_lm(tmp_path, ["how", "the", "sat", "two", "to", "too", "mat"])
    words, guessed = add_phone_lexicon(folder, Pronouncer(use_espeak=False))
    assert (words, guessed) == (7, 0)
    lexicon = (folder / PHONE_LEXICON_FILE).read_text().splitlines()
    assert "the\tDH AH |" in lexicon and "the\tDH IY |" in lexicon and "two\tT UW |" in lexicon
    lm = LanguageModel.load(folder)
    assert lm.has_phones and lm.phone_settings == lm.settings
    phones_lm = lm.for_units("phones")
    pronouncer = Pronouncer()
    spoken = pronouncer.phones_of_text("the cat sat")
    decoder = BeamSearchDecoder(phone_vocabulary(), phones_lm, DecoderSettings(lm_weight=0.5))
    assert "cat" not in decoder.decode(phone_emissions(spoken), 0.03).text
    with_hotword = BeamSearchDecoder(phone_vocabulary(), phones_lm, DecoderSettings(lm_weight=0.5), hotwords=["cat"])
    result = with_hotword.decode(phone_emissions(spoken), 0.03)
    assert result.text == "the cat sat" and [w.text for w in result.words] == ["the", "cat", "sat"]
    assert result.words[0].end <= result.words[1].start and result.words[1].end <= result.words[2].start
    # tuned settings for phones are stored apart from the characters'
    phones_lm.save_settings(DecoderSettings(lm_weight=0.25, word_score=2.0))
    reloaded = LanguageModel.load(folder)
    assert reloaded.phone_settings.lm_weight == 0.25 and reloaded.settings.lm_weight == lm.settings.lm_weight


def test_training_adds_a_phone_layer_and_reports_the_phone_error_rate(tmp_path, tiny_model):
    from training.trainer import train

    manifest = write_manifest(tmp_path / "train.jsonl", CLIPS, repeat=2)
    config = tiny_train_config(
        tmp_path,
        manifest,
        dev_manifests=(str(manifest),),
        model=replace(load_model_file(tiny_model).model.config, phone_vocab_size=len(PHONE_TOKENS)),
        init_model=str(tiny_model),
        epochs=1,
        learning_rate=1e-3,
    )
    trained = load_model_file(train(config, log=lambda message: None))
    assert trained.phone_vocabulary.tokens == PHONE_TOKENS and trained.model.phone_output is not None
    with (tmp_path / "run" / "metrics.csv").open() as handle:
        dev = [row for row in csv.DictReader(handle) if row["split"] != "train"]
    assert dev and all(0 <= float(row["per"]) for row in dev) and all(row["wer"] for row in dev)


def test_cli_adds_a_phone_lexicon_and_tunes_the_phone_settings(phone_setup, tmp_path):
    model, lm = phone_setup
    manifest = write_manifest(tmp_path / "dev.jsonl", CLIPS)
    args = ["tune-decoder", str(manifest), "--model", str(model), "--lm", str(lm), "--units", "phones"]
    result = subprocess.run(
        [sys.executable, "-m", "asr", *args, "--lm-weights", "0.0", "0.7", "--word-scores", "1", "--char-weights", "0", "0.5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "for phones" in result.stderr and result.stderr.count("char_weight") == 5  # 4 grid points + saved
    config = json.loads((lm / "decoder.json").read_text())
    assert config["phone_settings"]["word_score"] == 1.0 and config["word_score"] == DecoderSettings().word_score
    assert config["phone_settings"]["char_weight"] in (0.0, 0.5) and config["char_weight"] == 0.0
    result = subprocess.run(
        [sys.executable, "-m", "asr", *args[:-2], "--units", "chars", "--char-weights", "0.5", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "--units phones" in result.stderr
    result = subprocess.run([sys.executable, "-m", "asr", "lm", "add-phones", str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert result.returncode == 2 and "decoder.json" in result.stderr


def test_server_batching_with_phone_and_grammar_streams_together(phone_setup):
    # the server runs one model call for all streams; a phone stream and a grammar stream read their own layer of it
    from asr.encoder import encode_ready_chunks

    model, lm = phone_setup
    recognizer = asr.load_model(model, "cpu", asr.DecodeOptions(decoder="beam", lm=str(lm)))
    first, second = (load_audio(DATA / name) for name in CLIPS)
    audio = np.concatenate([quiet_noise(0.3), first, quiet_noise(1.2, 1), second, quiet_noise(0.3, 2)])
    grammar = ["how much was it", "does that look good", "what is it"]
    streams = [RecognitionStream(recognizer, SAMPLE_RATE), RecognitionStream(recognizer, SAMPLE_RATE, grammar=grammar)]
    events = [[], []]
    for start in range(0, len(audio), 4800):
        for stream in streams:
            stream.feed(audio[start : start + 4800])
        for i, frames in enumerate(encode_ready_chunks([s.encoder for s in streams])):
            assert frames.shape[1] == 29 + len(PHONE_TOKENS)
            events[i] += streams[i].process(frames)
    texts = [[e.text for e in stream_events + stream.finish() if isinstance(e, Final)] for stream_events, stream in zip(events, streams)]
    assert texts == [["how much was it", "does that look good"]] * 2
