"""`asr mic` through a real PortAudio device: an ALSA `file` plugin whose input is a recording."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from asr.text import normalize_text
from tests.conftest import CLIPS
from tests.test_streaming import conversation, silence


def _portaudio_available() -> bool:
    try:
        import sounddevice  # noqa: F401
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _portaudio_available(), reason="PortAudio (libportaudio2) is not installed")


@pytest.fixture
def alsa_home(tmp_path):
    """A HOME whose ~/.asoundrc defines an input device 'testmic' that plays a recording."""
    audio = np.concatenate([conversation(), silence(2.0)])
    raw = tmp_path / "mic.raw"
    sf.write(raw, audio, 16000, subtype="PCM_16", format="RAW")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".asoundrc").write_text(
        f'pcm.testmic {{\n type file\n slave.pcm "null"\n file "/dev/null"\n infile "{raw}"\n format "raw"\n'
        ' hint.description "test microphone"\n}\n'
    )
    return home


def mic(home, *args):
    env = {**os.environ, "HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "asr", "mic", *args], capture_output=True, text=True, env=env, timeout=120)


def test_lists_and_selects_devices(alsa_home, tiny_model):
    listing = mic(alsa_home, "--list-devices")
    assert listing.returncode == 0 and "testmic" in listing.stdout
    missing = mic(alsa_home, "--input-device", "no-such-device", "--model", str(tiny_model))
    assert missing.returncode == 2 and "no input device 'no-such-device'" in missing.stderr and "testmic" in missing.stderr


def test_transcribes_the_microphone(alsa_home, tiny_model, tiny_punctuator):
    result = mic(
        alsa_home,
        "--input-device",
        "testmic",
        "--sample-rate",
        "16000",
        "--max-seconds",
        "6",
        "--json",
        "--model",
        str(tiny_model),
        "--decoder",
        "greedy",
        "--punctuation-model",
        str(tiny_punctuator),
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    finals = [e for e in events if e["type"] == "final"]
    assert [f["raw_text"] for f in finals[:2]] == list(CLIPS.values())
    assert all(normalize_text(f["text"]) == f["raw_text"] and f["text"][0].isupper() and f["text"][-1] in ".?!" for f in finals)
    assert any(e["type"] == "partial" for e in events)


def test_microphone_through_the_server(alsa_home, tiny_model, tiny_punctuator):
    import asr
    from tests.test_server import RunningServer

    options = asr.DecodeOptions(decoder="greedy", punctuation_model=str(tiny_punctuator))
    running = RunningServer(asr.load_model(tiny_model, "cpu", options))
    try:
        result = mic(
            alsa_home, "--input-device", "testmic", "--sample-rate", "16000", "--max-seconds", "6", "--json", "--server", running.url
        )
    finally:
        running.stop()
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    finals = [e["raw_text"] for e in events if e.get("text")]  # `asr mic` asks the server for punctuated finals
    # the server replies to each message from what it has recognised so far: finals of segments that end between two
    # messages come merged, so compare the words
    assert " ".join(finals).startswith(" ".join(CLIPS.values())), finals
    assert all(e["text"][0].isupper() for e in events if e.get("text"))
    assert any("partial" in e for e in events)


def test_enrolment_records_each_prompt_and_adapts(tmp_path, tiny_model):
    from asr.audio import load_audio
    from asr.checkpoint import load_model_file
    from tests.conftest import DATA
    from tests.test_adapt import LOUD

    clips = list(CLIPS.items()) + list(CLIPS.items())[:1]
    pieces = [silence(0.5)]
    for name, _ in clips:
        pieces += [load_audio(DATA / name) * LOUD, silence(1.5)]  # a voice louder than any the tiny model heard
    raw = tmp_path / "mic.raw"
    sf.write(raw, np.clip(np.concatenate(pieces + [silence(25.0)]), -1, 1), 16000, subtype="PCM_16", format="RAW")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".asoundrc").write_text(
        f'pcm.testmic {{\n type file\n slave.pcm "null"\n file "/dev/null"\n infile "{raw}"\n format "raw"\n}}\n'
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(text.capitalize() + ".\n" for _, text in clips))
    output, recordings = tmp_path / "me.pt", tmp_path / "recordings"
    args = ["--enroll", "-o", str(output), "--prompts-file", str(prompts), "--recordings", str(recordings)]
    result = mic(home, "--input-device", "testmic", "--sample-rate", "16000", "--model", str(tiny_model), *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[1/3] read aloud:  How much was it." in result.stdout and "[3/3]" in result.stdout
    assert sorted(p.name for p in recordings.iterdir()) == ["01.txt", "01.wav", "02.txt", "02.wav", "03.txt", "03.wav"]
    durations = [sf.info(recordings / f"0{i}.wav").duration for i in (1, 2, 3)]
    assert all(0.7 < d < 2.5 for d in durations), durations  # each prompt cut around its clip
    adapted = load_model_file(output)
    assert adapted.metadata["adaptation"]["utterances"] == 3 and adapted.metadata["adapted_from"]["model"] == str(tiny_model)

    quiet = mic(home, "--input-device", "testmic", "--enroll", "--model", str(tiny_model))
    assert quiet.returncode == 2 and "needs -o" in quiet.stderr
