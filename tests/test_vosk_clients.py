"""vosk-server's reply rule: clients written the way vosk-server's own examples are work unchanged.

Those examples send 0.2 s of audio, wait for exactly one reply, and repeat; then send ``{"eof" : 1}`` and read one
final reply. The subtitle example sends a file's raw bytes without any config and reads ``result`` words without
asking for them.
"""

import asyncio
import io
import json
import threading

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect

import asr
import streaming.server
from asr.audio import SAMPLE_RATE, load_audio
from tests.conftest import CLIPS, DATA
from tests.test_server import GRAMMAR, RunningServer, pcm16
from tests.test_streaming import conversation, silence

REPLY_TIMEOUT = 20  # seconds: a lockstep client that gets no reply is stuck (the failure this file guards against)


@pytest.fixture(scope="module")
def recognizer(tiny_model):
    return asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="greedy"))


@pytest.fixture
def server(recognizer):
    running = RunningServer(recognizer, idle_timeout=30.0)
    yield running
    running.stop()


def real_clips() -> np.ndarray:
    """The two clips with pauses, then an LJ Speech sentence that ends the recording without a pause."""
    return np.concatenate([conversation(), silence(0.4), load_audio(DATA / "LJ002-0179.opus")])


async def lockstep(url: str, pieces: list[bytes], config: str | None) -> list[dict]:
    """vosk-server's example client: each piece, then exactly one reply; then eof and one reply."""
    replies = []
    async with connect(url) as ws:
        if config is not None:
            await ws.send(config)
        for piece in pieces:
            await ws.send(piece)
            replies.append(json.loads(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT)))
        await ws.send('{"eof" : 1}')
        replies.append(json.loads(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT)))
    return replies


def pieces_of(audio: np.ndarray, rate: int = SAMPLE_RATE, seconds: float = 0.2) -> list[bytes]:
    step = int(rate * seconds)
    return [pcm16(audio[start : start + step]) for start in range(0, len(audio), step)]


def as_sent(audio: np.ndarray) -> np.ndarray:
    """The audio as the server receives it in 16-bit PCM (what offline recognition must be given to compare)."""
    return np.frombuffer(pcm16(audio), dtype="<i2") / np.float32(32768)


def finals(replies: list[dict]) -> list[dict]:
    return [r for r in replies if "partial" not in r]


def check_rule(replies: list[dict], pieces: list[bytes]) -> None:
    """One reply per message, each a partial or a final, and the eof's reply a final."""
    assert len(replies) == len(pieces) + 1
    assert all(("partial" in r) != ("text" in r or "alternatives" in r) for r in replies), replies
    assert "partial" not in replies[-1]


def test_lockstep_client_gets_one_reply_per_message_and_the_offline_text(server, recognizer):
    audio = real_clips()
    pieces = pieces_of(audio)
    replies = asyncio.run(lockstep(server.url, pieces, '{ "config" : { "sample_rate" : 16000 } }'))
    check_rule(replies, pieces)
    offline = recognizer.transcribe(as_sent(audio), SAMPLE_RATE)
    assert " ".join(r["text"] for r in finals(replies) if r["text"]) == offline.text
    assert offline.text.startswith(" ".join(CLIPS.values())) and len(offline.segments) == 3  # the last one comes at eof
    words = [w for r in finals(replies) for w in r.get("result", [])]  # words by default
    assert [w["word"] for w in words] == [w.text for w in offline.words]
    # times within a frame: the server batches its model calls, which may round a frame's scores differently
    assert all(abs(w["start"] - o.start) <= recognizer.frame_shift + 1e-6 for w, o in zip(words, offline.words))


def test_lockstep_client_with_a_phrase_list(server, recognizer):
    audio = conversation()
    pieces = pieces_of(audio)
    config = json.dumps({"config": {"phrase_list": GRAMMAR, "sample_rate": 16000.0, "words": 0}})
    replies = asyncio.run(lockstep(server.url, pieces, config))
    check_rule(replies, pieces)
    offline = recognizer.transcribe(as_sent(audio), SAMPLE_RATE, grammar=GRAMMAR)
    assert " ".join(r["text"] for r in finals(replies) if r["text"]) == offline.text
    assert " ".join(r["text"] for r in finals(replies) if r["text"]) == " ".join(CLIPS.values())
    assert all("result" not in r for r in replies)


def test_lockstep_client_with_max_alternatives(server, recognizer):
    audio = conversation()
    pieces = pieces_of(audio)
    replies = asyncio.run(lockstep(server.url, pieces, json.dumps({"config": {"max_alternatives": 20, "sample_rate": 16000}})))
    check_rule(replies, pieces)
    best = " ".join(r["alternatives"][0]["text"] for r in finals(replies) if r["alternatives"][0]["text"])
    assert best == recognizer.transcribe(as_sent(audio), SAMPLE_RATE).text == " ".join(CLIPS.values())
    assert all("result" in a for r in finals(replies) for a in r["alternatives"])


def test_subtitle_client_sends_raw_file_bytes_without_config_and_reads_words(server, recognizer):
    buffer = io.BytesIO()
    sf.write(buffer, real_clips(), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    data = buffer.getvalue()
    pieces = [data[start : start + 8000] for start in range(0, len(data), 8000)]
    replies = asyncio.run(lockstep(server.url, pieces, None))
    check_rule(replies, pieces)
    words = [w["word"] for r in replies if "result" in r for w in r["result"]]
    assert " ".join(words) == " ".join(r["text"] for r in finals(replies) if r["text"])
    assert " ".join(words).startswith(" ".join(CLIPS.values()))  # the WAV header is read as 22 samples of audio


def test_replies_never_wait_for_inference_and_finals_are_never_lost(recognizer, monkeypatch):
    """While the model is held back, every message still gets its reply at once; the finals of segments that end
    meanwhile come merged in the next reply, and the eof reply holds the rest."""
    release = threading.Event()
    encode = streaming.server.encode_ready_chunks

    def held(encoders):
        release.wait(60)
        return encode(encoders)

    monkeypatch.setattr(streaming.server, "encode_ready_chunks", held)
    running = RunningServer(recognizer, idle_timeout=30.0)
    audio = conversation()
    pieces = pieces_of(audio)

    async def scenario() -> list[dict]:
        replies = []
        async with connect(running.url) as ws:
            for piece in pieces:  # about 3.4 s of audio: within the backlog a client may run ahead
                await ws.send(piece)
                replies.append(json.loads(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT)))
            release.set()
            await ws.send(pcm16(silence(0.2)))  # its reply may already hold the finals recognised since
            replies.append(json.loads(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT)))
            await ws.send('{"eof" : 1}')
            replies.append(json.loads(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT)))
        return replies

    try:
        replies = asyncio.run(scenario())
    finally:
        release.set()
        running.stop()
    held_replies = replies[: len(pieces)]
    assert held_replies == [{"type": "partial", "partial": "", "segment": 0, "committed": 0}] * len(pieces)
    assert " ".join(r["text"] for r in finals(replies) if r["text"]) == " ".join(CLIPS.values())
    assert len(replies) == len(pieces) + 2 and "partial" not in replies[-1]


def test_a_client_far_ahead_of_recognition_waits_for_it(recognizer, monkeypatch):
    release = threading.Event()
    encode = streaming.server.encode_ready_chunks
    monkeypatch.setattr(streaming.server, "encode_ready_chunks", lambda encoders: release.wait(60) and encode(encoders))
    monkeypatch.setattr(streaming.server, "MAX_BACKLOG_SECONDS", 1.0)
    running = RunningServer(recognizer, idle_timeout=30.0)
    pieces = pieces_of(conversation())

    async def scenario() -> tuple[int, list[dict]]:
        async with connect(running.url) as ws:
            answered = 0
            for piece in pieces:
                await ws.send(piece)
                try:
                    await asyncio.wait_for(ws.recv(), 1.0)
                except TimeoutError:
                    break
                answered += 1
            release.set()
            late = [json.loads(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT))]
            for piece in pieces[answered + 1 :]:
                await ws.send(piece)
                late.append(json.loads(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT)))
            await ws.send('{"eof" : 1}')
            late.append(json.loads(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT)))
            return answered, late

    try:
        answered, late = asyncio.run(scenario())
    finally:
        release.set()
        running.stop()
    assert answered == 5  # 1 s of backlog in 0.2 s pieces; the sixth reply waited for recognition
    assert " ".join(r["text"] for r in finals(late) if r["text"]) == " ".join(CLIPS.values())


def test_reset_gives_one_final_with_everything_pending_and_a_config_gets_no_reply(server):
    async def scenario() -> list[dict]:
        replies = []
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"config": {"sample_rate": 16000}}))  # no reply
            for piece in pieces_of(conversation(), seconds=1.0):
                await ws.send(piece)
                replies.append(json.loads(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT)))
            await ws.send('{"reset" : 1}')
            replies.append(json.loads(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT)))
            await ws.send('{"eof" : 1}')
            replies.append(json.loads(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT)))
        return replies

    replies = asyncio.run(scenario())
    assert len(replies) == 4 + 2
    assert " ".join(r["text"] for r in finals(replies[:-1]) if r["text"]) == " ".join(CLIPS.values())
    assert "partial" not in replies[-2] and replies[-1] == {"type": "final", "text": "", "result": []}  # nothing after the reset


def test_model_key_names_the_served_models_and_never_opens_a_path(recognizer, tiny_model):
    other = asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="greedy", chunk_frames=10))
    running = RunningServer(recognizer)
    running.server.recognizers["small-chunks"] = other

    async def scenario():
        async with connect(running.url) as ws:
            await ws.send(json.dumps({"config": {"model": "/etc/passwd"}}))
            error = json.loads(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT))
        picked = await lockstep(running.url, pieces_of(conversation()), json.dumps({"config": {"model": "small-chunks"}}))
        return error, picked

    try:
        error, picked = asyncio.run(scenario())
    finally:
        running.stop()
    assert error["type"] == "error" and "default" in error["error"] and "small-chunks" in error["error"]
    assert "never opens a path" in error["error"]
    assert " ".join(r["text"] for r in finals(picked) if r["text"]) == other.transcribe(as_sent(conversation()), SAMPLE_RATE).text


def test_vosk_default_rate_with_sample_rate_8000(recognizer):
    import soxr

    running = RunningServer(recognizer, sample_rate=8000)
    audio = soxr.resample(conversation(), SAMPLE_RATE, 8000)
    try:
        replies = asyncio.run(lockstep(running.url, pieces_of(audio, 8000), None))  # no config: the server's rate
    finally:
        running.stop()
    assert " ".join(r["text"] for r in finals(replies) if r["text"]) == recognizer.transcribe(as_sent(audio), 8000).text


def test_lockstep_benchmark_compares_with_offline(recognizer, tmp_path):
    from streaming.bench import lockstep_benchmark

    sf.write(tmp_path / "talk.wav", real_clips(), SAMPLE_RATE)
    report = lockstep_benchmark(recognizer, [str(tmp_path / "talk.wav")], log=lambda _m: None)
    (row,) = report["files"]
    assert row["same_transcript"] and row["finals"] >= 1 and row["messages"] == len(pieces_of(real_clips())) + 1


def test_words_client_gets_the_best_reading_when_no_phrase_completes(server, recognizer):
    """vosk-server's test_words.py: multi-word phrases without "[unk]", audio that says only the start of one. Kaldi's
    decoder treats every state as final when none is, so vosk-server returns its best path; so do we."""
    phrases = ["how much was it worth to you", "does that look good"]
    audio = np.concatenate([silence(0.3), load_audio(DATA / "how_much_was_it.opus"), silence(0.3)])
    pieces = pieces_of(audio, seconds=0.5)  # test_words.py reads 8000 frames at a time
    config = json.dumps({"config": {"phrase_list": phrases, "sample_rate": 16000.0}})
    replies = asyncio.run(lockstep(server.url, pieces, config))
    check_rule(replies, pieces)
    assert " ".join(r["text"] for r in finals(replies) if r["text"]) == "how much was it"
    assert recognizer.transcribe(as_sent(audio), SAMPLE_RATE, grammar=phrases).text == "how much was it"
    # with "[unk]" the grammar has a word for anything else, and the unfinished phrase is that
    assert recognizer.transcribe(as_sent(audio), SAMPLE_RATE, grammar=[*phrases, "[unk]"]).text == "[unk]"
