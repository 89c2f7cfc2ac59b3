"""Learning a voice on the server: enrolment over the websocket, adaptation in another process, per-token models."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from websockets.asyncio.client import connect

import asr
from asr.audio import load_audio
from tests.conftest import CLIPS, DATA
from tests.test_adapt import LOUD
from tests.test_server import RunningServer, pcm16, vosk_client
from tests.test_streaming import silence

PROMPTS = list(CLIPS.values()) + list(CLIPS.values())[:1]


def reading(prompts: list[str]) -> np.ndarray:
    """A loud speaker reading the prompts (the two clips), with pauses."""
    clip = {text: load_audio(DATA / name) for name, text in CLIPS.items()}
    pieces = [silence(0.4)]
    for text in prompts:
        pieces += [clip[text] * LOUD, silence(1.2)]
    return np.clip(np.concatenate(pieces), -1, 1)


@pytest.fixture
def voice_server(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    recognizer = asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="greedy"))
    running = RunningServer(recognizer, voices=str(tmp_path / "voices"), prompts_file=str(prompts), prompts=3, idle_timeout=60.0)
    yield running
    running.stop()


async def enrol(url: str, name: str = "me") -> list[dict]:
    replies = []
    async with connect(url) as ws:
        await ws.send(json.dumps({"config": {"sample_rate": 16000}}))
        await ws.send(json.dumps({"enroll": {"name": name}}))
        replies.append(json.loads(await ws.recv()))
        audio = reading(PROMPTS)
        for start in range(0, len(audio), 4000):
            await ws.send(pcm16(audio[start : start + 4000]))
            replies.append(json.loads(await ws.recv()))
        while not any(r.get("adapted") or r["type"] == "error" for r in replies[-1:]):
            replies.append(json.loads(await asyncio.wait_for(ws.recv(), 120)))
    return replies


def test_a_voice_learned_over_the_websocket_is_its_owners_alone(voice_server, tmp_path):
    url = voice_server.url
    replies = asyncio.run(enrol(f"{url}/?token=alice"))
    assert replies[0]["texts"] == PROMPTS and replies[0]["prompt"] == 0
    assert [r.get("prompt") for r in replies if "prompt" in r][-1] == 2 and any(r.get("adapting") for r in replies)
    done = replies[-1]
    assert done.get("adapted") is True, done
    assert done["report"]["utterances"] == 3 and done["report"]["held_out_loss_after"] < done["report"]["held_out_loss_before"]
    assert len(list((tmp_path / "voices").glob("*/me.pt"))) == 1

    loud = reading(list(CLIPS.values()))
    mine = asyncio.run(vosk_client(f"{url}/?token=alice", loud, {"sample_rate": 16000, "model": "me"}))
    assert " ".join(r["text"] for r in mine if r.get("text")).split()  # the owner's connection decodes with the voice
    theirs = asyncio.run(vosk_client(f"{url}/?token=bob", loud[:8000], {"model": "me"}))
    assert theirs[0]["type"] == "error" and "unknown model 'me'" in theirs[0]["error"] and "voices: none" in theirs[0]["error"]


def test_enrolment_refusals(voice_server, tiny_model):
    async def first_reply(url: str, messages: list[dict]) -> list[dict]:
        async with connect(url) as ws:
            out = []
            for message in messages:
                await ws.send(json.dumps(message))
                out.append(json.loads(await ws.recv()))
            return out

    url = voice_server.url
    anonymous = asyncio.run(first_reply(url, [{"enroll": {"name": "me"}}]))
    assert "needs a token" in anonymous[0]["error"]
    bad_name = asyncio.run(first_reply(f"{url}/?token=t", [{"enroll": {"name": "../etc"}}, {"enroll": {"name": "default"}}]))
    assert all("enroll needs a name" in r["error"] for r in bad_name)
    twice = asyncio.run(
        first_reply(f"{url}/?token=t", [{"enroll": {"name": "a"}}, {"enroll": {"name": "b"}}, {"config": {"words": False}}])
    )
    assert twice[0]["type"] == "enrolment" and "once per connection" in twice[1]["error"] and "not during an enrolment" in twice[2]["error"]

    plain = RunningServer(asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="greedy")))
    try:
        refused = asyncio.run(first_reply(f"{plain.url}/?token=t", [{"enroll": {"name": "me"}}]))
    finally:
        plain.stop()
    assert "does not learn voices" in refused[0]["error"]
