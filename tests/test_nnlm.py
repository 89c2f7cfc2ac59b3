"""The LSTM language model: sentence scores, its file, training by `asr lm train-lstm`, and rescoring of finals."""

import gzip
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import asr
from asr.audio import SAMPLE_RATE, load_audio
from asr.lm import LSTM_FILE, DecoderSettings, LanguageModel, LanguageModelError
from asr.nnlm import LstmLanguageModel, NeuralLM, NeuralLMConfig, NeuralLMError, perplexity
from streaming.recognizer import Final, Partial, RecognitionStream
from tests.conftest import CLIPS, DATA, quiet_noise
from tests.test_streaming import write_unigram_lm

ROOT = DATA.parent.parent
TEXT = ROOT.parent / "shared" / "text" / "harvard_sentences.txt.gz"


def tiny_lm(words: list[str], seed: int = 0, cutoffs: tuple[int, ...] = (4,)) -> NeuralLM:
    torch.manual_seed(seed)
    vocabulary = ["</s>", "<unk>", *words]
    return NeuralLM(LstmLanguageModel(NeuralLMConfig(len(vocabulary), 16, 12, cutoffs=cutoffs)), vocabulary)


def unigram_lstm(words: list[str], log_weights: dict[str, float]) -> NeuralLM:
    """An LSTM LM whose every prediction is the same distribution: softmax of ``log_weights`` (others 0).

    All weights are zero, so its outputs are zero and the head's bias alone decides; every word is in the head.
    """
    lm = tiny_lm(words, cutoffs=(len(words) + 1,))
    with torch.no_grad():
        for parameter in lm.model.parameters():
            parameter.zero_()
        for word, weight in log_weights.items():
            lm.model.softmax.head.bias[lm.ids[word]] = weight
    return lm


def test_a_sentence_scores_its_words_and_its_end_under_the_full_softmax_alone_or_in_a_batch():
    lm = tiny_lm([f"w{i}" for i in range(20)], cutoffs=(6, 12))
    sentences = ["w1 w19 w2", "w3", "", "zz w5 w13", "w1 w19", "w1 w19 w2"]  # shared prefixes and a repeat
    batch = lm.score(sentences)
    alone = [lm.score([s])[0] for s in sentences]
    assert batch == pytest.approx(alone, abs=1e-5)
    for sentence, score in zip(sentences, batch):
        ids = lm.encode(sentence) + [0]
        outputs, _ = lm.model(torch.tensor([[0, *ids[:-1]]]))
        full = lm.model.softmax.log_prob(outputs[0])  # (time, vocab): the whole distribution at each step
        assert score == pytest.approx(sum(full[t, i].item() for t, i in enumerate(ids)), abs=1e-4)
        assert score < 0
    assert lm.encode("zz w5") == [1, lm.ids["w5"]]  # unknown words share <unk>


def test_the_model_file_round_trips_in_half_precision_and_bad_files_are_clear_errors(tmp_path):
    lm = tiny_lm(["how", "much", "was", "it"])
    lm.info = {"minutes": 1.0}
    lm.save(tmp_path / "lstm.pt")
    loaded = NeuralLM.load(tmp_path / "lstm.pt")
    assert loaded.words == lm.words and loaded.info == {"minutes": 1.0}
    assert loaded.score(["how much was it"])[0] == pytest.approx(lm.score(["how much was it"])[0], abs=0.05)
    assert not list(tmp_path.glob(".*partial"))
    with pytest.raises(NeuralLMError, match="not found"):
        NeuralLM.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(NeuralLMError, match="cannot load"):
        NeuralLM.load(tmp_path / "junk.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(NeuralLMError, match="not an LSTM language model"):
        NeuralLM.load(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="too small"):
        NeuralLMConfig(100, 8, 8, cutoffs=(10, 20, 40), div_value=4.0)


def run_asr(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asr", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def lm_folder(tmp_path):
    folder = tmp_path / "lm"
    folder.mkdir()
    return write_unigram_lm(folder, sorted({w for text in CLIPS.values() for w in text.split()}))


def train_args(work, output, minutes: float) -> list[str]:
    return ["lm", "train-lstm", str(TEXT), "--work", str(work), "-o", str(output), "--minutes", str(minutes)] + [
        "--embed-dim", "16", "--hidden-size", "16", "--cutoffs", "50", "200", "--batch-size", "8", "--bptt", "8", "--threads", "1",
    ]  # fmt: skip


def test_train_lstm_learns_resumes_and_installs_into_a_language_model_folder(tmp_path):
    folder = lm_folder(tmp_path)
    work = tmp_path / "work"
    first = run_asr(*train_args(work, folder, 0.05))
    assert first.returncode == 0, first.stderr
    checkpoint = torch.load(work / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] > 0 and checkpoint["seconds"] >= 3.0
    lm = LanguageModel.load(folder)
    assert lm.lstm_file == folder / LSTM_FILE
    trained = NeuralLM.load(lm.lstm_file)
    held_out = (work / "held-out.txt").read_text().split("\n")[:-1]
    assert held_out and trained.info["steps"] == checkpoint["step"]
    assert perplexity(trained, held_out) < 0.2 * len(trained.words)  # far better than guessing among the words
    # run again with a longer budget: it goes on from the checkpoint (same corpus), not from the start
    second = run_asr(*train_args(work, folder, 0.1))
    assert second.returncode == 0, second.stderr
    resumed = torch.load(work / "checkpoint.pt", weights_only=True)
    assert resumed["step"] > checkpoint["step"] and resumed["history"][: len(checkpoint["history"])] == checkpoint["history"]
    assert "reading the text" in second.stderr and NeuralLM.load(folder / LSTM_FILE).info["steps"] == resumed["step"]


@pytest.mark.parametrize(
    "content, message",
    [(b"", "no words"), (b"\x00\x01\x02binary\x00" * 50, "binary"), ((b"word " * 25_000), "more than 20000 words")],
)
def test_bad_text_is_a_clear_error_and_leaves_the_installed_lstm_untouched(tmp_path, content, message):
    folder = lm_folder(tmp_path)
    installed = tiny_lm(["how", "much"])
    installed.save(folder / LSTM_FILE)
    before = (folder / LSTM_FILE).read_bytes(), (folder / "decoder.json").read_bytes()
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(gzip.compress(content))
    result = run_asr(*train_args(tmp_path / "work", folder, 0.05)[:2], str(bad), "--work", str(tmp_path / "work"), "-o", str(folder))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert ((folder / LSTM_FILE).read_bytes(), (folder / "decoder.json").read_bytes()) == before


def test_an_output_that_is_neither_a_folder_with_an_lm_nor_a_pt_file_is_refused(tmp_path):
    result = run_asr(*train_args(tmp_path / "work", tmp_path / "nowhere.txt", 0.05))
    assert result.returncode == 2 and "neither a language-model folder" in result.stderr


@pytest.fixture
def rescoring_lm(tmp_path):
    """The unigram n-gram LM of the clips' words, with an LSTM LM that finds "it" very unlikely; the beam is wide
    enough to keep other texts than the best (such as "how much was") to the end."""
    folder = lm_folder(tmp_path)
    words = sorted({w for text in CLIPS.values() for w in text.split()} | {"cat", "hat"})
    unigram_lstm(words, {"it": -200.0}).save(folder / LSTM_FILE)
    config = json.loads((folder / "decoder.json").read_text())
    config |= {"lstm": LSTM_FILE, "lstm_weight": 1.0, "beam_threshold": 50.0, "beam_size": 64}
    (folder / "decoder.json").write_text(json.dumps(config))
    return folder


def utterance() -> np.ndarray:
    return np.concatenate([quiet_noise(0.3), load_audio(DATA / "how_much_was_it.opus"), quiet_noise(1.0, 1)])


def test_rescoring_changes_the_finals_alike_offline_and_streaming_but_not_the_partials(tiny_model, rescoring_lm):
    options = asr.DecodeOptions(decoder="beam", lm=str(rescoring_lm), alternatives=3)
    plain = asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="beam", lm=str(rescoring_lm), alternatives=3, lstm=False))
    rescoring = asr.load_model(tiny_model, "cpu", options)
    assert plain.neural_lm is None and rescoring.neural_lm is not None
    audio = utterance()
    before, after = plain.transcribe(audio, SAMPLE_RATE), rescoring.transcribe(audio, SAMPLE_RATE)
    assert "it" in before.text.split()
    assert after.text and "it" not in after.text.split()  # the LSTM LM's verdict outweighs the search's preference
    assert all("it" not in a.text.split() for a in after.alternatives[:1])
    stream = RecognitionStream(rescoring, SAMPLE_RATE)
    events = [e for start in range(0, len(audio), 1600) for e in stream.accept(audio[start : start + 1600])] + stream.finish()
    finals = [e for e in events if isinstance(e, Final)]
    assert [(f.text, f.words, [a.text for a in f.alternatives]) for f in finals] == [
        (s.text, s.words, [a.text for a in s.alternatives]) for s in after.segments
    ]
    # streaming's chunks change the model's output in the last float bits (1e-6), so confidences agree that closely
    confidences = [[a.confidence for a in f.alternatives] for f in finals]
    assert confidences == [pytest.approx([a.confidence for a in s.alternatives], rel=1e-4, abs=1e-9) for s in after.segments]
    assert any("it" in e.text.split() for e in events if isinstance(e, Partial))  # partials are not rescored
    # switched off per stream, the finals are the search's own
    stream = RecognitionStream(rescoring, SAMPLE_RATE, lstm=False)
    off = [e for e in stream.accept(audio) + stream.finish() if isinstance(e, Final)]
    assert [f.text for f in off] == [s.text for s in before.segments]


def test_the_weight_and_switch_come_from_settings_and_a_missing_lstm_file_is_an_error(tiny_model, rescoring_lm):
    zero = asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="beam", lm=str(rescoring_lm), settings={"lstm_weight": 0.0}))
    assert "it" in zero.transcribe(utterance(), SAMPLE_RATE).text.split()
    with pytest.raises(ValueError, match="lstm_weight"):
        DecoderSettings(lstm_weight=-1.0)
    with pytest.raises(ValueError, match="rescored_texts"):
        DecoderSettings(rescored_texts=0)
    (rescoring_lm / LSTM_FILE).unlink()
    with pytest.raises(LanguageModelError, match="missing"):
        asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="beam", lm=str(rescoring_lm)))


def test_transcribe_cli_switches_rescoring_off(tiny_model, rescoring_lm, tmp_path):
    import soundfile as sf

    wav = tmp_path / "talk.wav"
    sf.write(wav, utterance(), SAMPLE_RATE)
    common = ["transcribe", str(wav), "--model", str(tiny_model), "--decoder", "beam", "--lm", str(rescoring_lm), "--no-punctuate"]
    on, off = run_asr(*common), run_asr(*common, "--no-lstm")
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert "it" in off.stdout.split() and "it" not in on.stdout.split()
    assert math.isfinite(DecoderSettings.from_dict(json.loads((rescoring_lm / "decoder.json").read_text())).lstm_weight)


def test_a_server_connection_can_switch_rescoring_off_and_a_bad_value_is_reported(tiny_model, rescoring_lm):
    import asyncio

    from websockets.asyncio.client import connect

    from tests.test_server import RunningServer, spoken, vosk_client

    recognizer = asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="beam", lm=str(rescoring_lm)))
    running = RunningServer(recognizer)

    async def sessions():
        async with connect(running.url) as bad:
            await bad.send(json.dumps({"config": {"lstm": "no"}}))
            error = json.loads(await bad.recv())
        on, off = await asyncio.gather(vosk_client(running.url, utterance(), {}), vosk_client(running.url, utterance(), {"lstm": False}))
        return error, on, off

    try:
        error, on, off = asyncio.run(sessions())
    finally:
        running.stop()
    assert error["type"] == "error" and "lstm must be true or false" in error["error"]
    assert "it" not in spoken(on).split() and "it" in spoken(off).split()


def test_tune_decoder_weighs_the_lstm_lm_with_the_other_settings(tiny_model, rescoring_lm, tmp_path):
    from tests.conftest import write_manifest

    manifest = write_manifest(tmp_path / "dev.jsonl", CLIPS)
    args = ["tune-decoder", str(manifest), "--model", str(tiny_model), "--lm", str(rescoring_lm), "--lm-weights", "0.8"]
    result = run_asr(*args, "--word-scores", "0", "--lstm-weights", "0", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    by_weight = {r["lstm_weight"]: r["wer"] for r in report["results"]}
    assert by_weight[1.0] > by_weight[0.0]  # this LSTM LM drops every "it": rescoring with it only hurts
    assert json.loads((rescoring_lm / "decoder.json").read_text())["lstm_weight"] == 0.0
    assert "lstm_weight 1.00" in result.stderr and "lstm_weight=0.0" in result.stderr
    # an LM without an LSTM LM cannot weigh one
    (tmp_path / "plain").mkdir()
    plain = lm_folder(tmp_path / "plain")
    result = run_asr(*args[:5], str(plain), "--lstm-weights", "0", "1")
    assert result.returncode == 2 and "has no LSTM LM" in result.stderr
