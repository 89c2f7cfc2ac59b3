"""The bundled English model and language model, as a user gets them after install."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jiwer
import pytest

import asr
from asr.checkpoint import load_model_file
from asr.lm import LSTM_FILE
from asr.nnlm import NeuralLM
from asr.punctuation import BUNDLED_PUNCTUATOR, Punctuator
from asr.recognizer import BUNDLED_LM, BUNDLED_MODEL
from asr.text import normalize_text
from tests.conftest import DATA

REFERENCE = "and costing eleven pounds fifteen shillings eight pence within ten days"  # LJ002-0179 (in the training data)


@pytest.fixture(scope="module")
def greedy():
    return asr.load_model(options=asr.DecodeOptions(decoder="greedy"))


def test_bundled_files_are_small_and_self_describing():
    assert BUNDLED_MODEL.stat().st_size < 40e6
    ngram = [f for f in BUNDLED_LM.iterdir() if f.name != LSTM_FILE]
    assert sum(f.stat().st_size for f in ngram) < 60e6  # the 4-gram of 2026-12-06: 53.5 MB
    assert (BUNDLED_LM / LSTM_FILE).stat().st_size < 30e6  # the LSTM LM of 2026-12-07: 10.2 MB
    assert NeuralLM.load(BUNDLED_LM / LSTM_FILE).info["tokens_seen"] > 1e7
    bundle = load_model_file(BUNDLED_MODEL)
    assert bundle.model.config.chunk_frames > 0 and bundle.metadata["train_hours"] > 10
    assert json.loads((BUNDLED_LM / "decoder.json").read_text())["lm"] == "lm.bin"
    assert BUNDLED_PUNCTUATOR.stat().st_size <= 10e6  # the bound
    assert Punctuator.load(BUNDLED_PUNCTUATOR).info["words_seen"] > 1e7


def test_default_recognizer_uses_beam_search_with_the_bundled_lm():
    recognizer = asr.load_model()
    assert recognizer.decoder_name == "beam" and recognizer.language_model is not None
    assert recognizer.neural_lm is not None and recognizer.decoder_settings.lstm_weight > 0  # finals rescored by default
    result = recognizer.transcribe(DATA / "LJ002-0179.opus")
    assert jiwer.cer(REFERENCE, result.text) < 0.45, result.text  # 0.32 with the model of 2026-11-26, 0.01 with that of 2026-12-03
    assert all(0 <= w.start < w.end <= result.duration + 0.05 for w in result.words)
    assert normalize_text(result.formatted_text) == result.text and result.formatted_text[0] == "A"  # punctuated by default


def test_greedy_decoding_of_the_bundled_model(greedy):
    result = greedy.transcribe(DATA / "LJ002-0179.opus")
    assert jiwer.cer(REFERENCE, result.text) < 0.4, result.text  # 0.24 with the model of 2026-11-26, 0.06 with that of 2026-12-03


def test_quick_start_command():
    result = subprocess.run(
        [sys.executable, "-m", "asr", "transcribe", str(DATA / "LJ002-0179.opus"), "-f", "srt"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1\n00:00:0") and "-->" in result.stdout
    assert result.stdout.rstrip()[-1] in ".?!"  # subtitles are punctuated


def test_vosk_round_trip_with_the_bundled_model():
    import asyncio

    from asr.audio import load_audio
    from tests.test_server import RunningServer, vosk_client

    running = RunningServer(asr.load_model())
    try:
        replies = asyncio.run(vosk_client(running.url, load_audio(DATA / "LJ002-0179.opus"), {"sample_rate": 16000, "words": True}))
    finally:
        running.stop()
    text = " ".join(r["text"] for r in replies if r.get("text"))
    assert jiwer.cer(REFERENCE, text) < 0.45, text
    assert all(w["start"] < w["end"] for r in replies for w in r.get("result", []))


def test_hotwords_outside_cmudict_with_pip_alone():
    """The README's hotwords on a machine set up with pip only: espeak-ng's library comes from a wheel."""
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no espeak-ng program on it
    result = subprocess.run(
        [sys.executable, "-m", "asr", "transcribe", str(DATA / "LJ002-0179.opus"), "--hotwords", "Kheafield,Zyzzogeton"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0 and "error" not in result.stderr.lower(), result.stderr
    assert jiwer.cer(REFERENCE, normalize_text(result.stdout)) < 0.45, result.stdout
