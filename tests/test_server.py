"""The websocket server with Vosk-style clients (tiny model)."""

import asyncio
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import asr
from asr.audio import load_audio
from streaming.server import RecognitionServer, ServerOptions
from tests.conftest import CLIPS, DATA
from tests.test_streaming import conversation, silence


@pytest.fixture(scope="module")
def recognizer(tiny_model):
    return asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="greedy"))


class RunningServer:
    def __init__(self, recognizer, ssl=None, **options):
        self.server = RecognitionServer(recognizer, ServerOptions(host="127.0.0.1", port=0, **options))
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def main():
            started = asyncio.Event()
            self.task = asyncio.ensure_future(self.server.run(started, ssl=ssl))
            await started.wait()
            ready.set()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),), daemon=True)
        self.thread.start()
        assert ready.wait(30)
        self.url = f"{'wss' if ssl else 'ws'}://127.0.0.1:{self.server.port}"

    def stop(self):
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(30)


@pytest.fixture
def server(recognizer):
    running = RunningServer(recognizer, max_connections=3, idle_timeout=5.0)
    yield running
    running.stop()


async def drain(ws) -> tuple[list[dict], int]:
    """Every reply until the server closes the connection, and its close code."""
    replies = []
    try:
        async for message in ws:
            replies.append(json.loads(message))
    except ConnectionClosed:
        pass
    return replies, ws.close_code


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


async def vosk_client(url: str, audio: np.ndarray, config: dict | None = None, piece_seconds: float = 0.25, **connect_args) -> list[dict]:
    """Sends like vosk-server's example client: optional config, PCM frames, then eof; collects every reply."""
    replies = []
    async with connect(url, **connect_args) as ws:
        if config is not None:
            await ws.send(json.dumps({"config": config}))
        step = int(piece_seconds * 16000)
        for start in range(0, len(audio), step):
            await ws.send(pcm16(audio[start : start + step]))
        await ws.send('{"eof" : 1}')
        async for message in ws:
            replies.append(json.loads(message))
    return replies


def spoken(replies: list[dict]) -> str:
    """The text of every final, in order (finals of segments that ended between two replies come merged)."""
    return " ".join(r["text"] for r in replies if r.get("text"))


BOTH = " ".join(CLIPS.values())


def test_vosk_round_trip(server):
    replies = asyncio.run(vosk_client(server.url, conversation(), {"sample_rate": 16000, "words": True}))
    finals = [r for r in replies if "text" in r and r["text"]]
    assert spoken(finals) == BOTH
    assert any("partial" in r for r in replies)
    for final in finals:
        assert [w["word"] for w in final["result"]] == final["text"].split()
        assert all(set(w) >= {"word", "start", "end", "conf"} and w["start"] < w["end"] for w in final["result"])


def test_other_sample_rate_is_resampled_on_the_server(server):
    import soxr

    audio = soxr.resample(conversation(), 16000, 48000)
    replies = asyncio.run(vosk_client(server.url, audio, {"sample_rate": 48000}))
    assert spoken(replies) == BOTH
    assert all("result" in r for r in replies if r.get("text"))  # words by default, as in vosk-server
    without = asyncio.run(vosk_client(server.url, audio, {"sample_rate": 48000, "words": 0}))
    assert spoken(without) == BOTH and all("result" not in r for r in without)


def test_bad_input_is_reported_and_other_sessions_are_served(server):
    async def scenario():
        async with connect(server.url) as bad:
            errors = []
            for message in [
                "{not json",
                json.dumps({"config": {"sample_rate": 3}}),
                json.dumps({"config": {"colour": "red"}}),
                json.dumps({"hello": 1}),
                json.dumps([1, 2]),
                b"\x01\x02\x03",
            ]:
                await bad.send(message)
                errors.append(json.loads(await bad.recv()))
            await bad.send(b"\x00\x00" * 1600)
            assert json.loads(await bad.recv()) == {"type": "partial", "partial": "", "segment": 0, "committed": 0}
            await bad.send(json.dumps({"config": {"sample_rate": 8000}}))
            errors.append(json.loads(await bad.recv()))
            good = await vosk_client(server.url, conversation())
            return errors, good

    errors, good = asyncio.run(scenario())
    assert all(e["type"] == "error" for e in errors)
    text = " ".join(e["error"] for e in errors)
    for expected in (
        "malformed JSON",
        "sample_rate",
        "unknown config key",
        "unknown message keys",
        "JSON objects",
        "even byte count",
        "before the first audio",
    ):
        assert expected in text
    assert spoken(good) == BOTH


def test_limits(recognizer):
    running = RunningServer(recognizer, max_connections=1, idle_timeout=1.0, max_message_bytes=4096)

    async def scenario():
        async with connect(running.url) as first:
            async with connect(running.url) as second:
                with pytest.raises(ConnectionClosed):
                    await second.recv()
                refused = second.close_code, second.close_reason
            await first.send(b"\x00" * 10000)  # over the message limit
            with pytest.raises(ConnectionClosed):
                await first.recv()
            too_big = first.close_code
        async with connect(running.url) as idle:
            with pytest.raises(ConnectionClosed):
                while True:
                    await idle.recv()  # the final result, then the close
            return refused, too_big, idle.close_code, idle.close_reason

    try:
        refused, too_big, idle_code, idle_reason = asyncio.run(scenario())
    finally:
        running.stop()
    assert refused[0] == 1013 and "full" in refused[1]
    assert too_big == 1009
    assert idle_code == 1008 and "idle" in idle_reason


def test_token_and_healthz(recognizer):
    running = RunningServer(recognizer, token="s3cret")
    try:
        with urllib.request.urlopen(running.url.replace("ws://", "http://") + "/healthz") as response:
            assert response.status == 200 and response.read().startswith(b"ok")
        with pytest.raises(InvalidStatus) as refused:
            asyncio.run(vosk_client(running.url, conversation()))
        assert refused.value.response.status_code == 401
        by_header = asyncio.run(vosk_client(running.url, conversation(), additional_headers={"Authorization": "Bearer s3cret"}))
        by_query = asyncio.run(vosk_client(running.url + "/?token=s3cret", conversation()))
        assert spoken(by_header) == spoken(by_query) == BOTH
    finally:
        running.stop()


def test_shutdown_sends_final_results(recognizer):
    running = RunningServer(recognizer)

    async def scenario():
        async with connect(running.url) as ws:
            audio = conversation()
            await ws.send(pcm16(audio[: len(audio) // 2 + 8000]))
            await asyncio.sleep(0.5)
            running.loop.call_soon_threadsafe(running.task.cancel)
            return await drain(ws)

    replies, code = asyncio.run(scenario())
    running.thread.join(30)
    assert [r["text"] for r in replies if r.get("text")][:1] == ["how much was it"]
    assert code == 1001


def test_transcribe_command_through_the_server(server, tmp_path, tiny_punctuator):
    import subprocess
    import sys

    import soundfile as sf

    from asr.punctuation import word_key

    path = tmp_path / "conversation.wav"
    sf.write(path, conversation(), 16000)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "asr",
            "transcribe",
            str(path),
            "--server",
            server.url,
            "-f",
            "json",
            "--punctuation-model",
            str(tiny_punctuator),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["text"] == " ".join(CLIPS.values())
    assert [w["text"] for w in data["words"]] == data["text"].split()
    assert [word_key(w["formatted"]) for w in data["words"]] == data["text"].split()  # punctuated here, as one transcript
    assert data["formatted_text"][0].isupper() and data["formatted_text"][-1] in ".?!"
    refused = subprocess.run(
        [sys.executable, "-m", "asr", "transcribe", str(path), "--server", "ws://127.0.0.1:9"], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 1 and "conversation.wav" in refused.stderr


def test_tls(recognizer, tmp_path):
    import ssl
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
        ],
        check=True,
        capture_output=True,
    )
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    running = RunningServer(recognizer, ssl=server_context)
    try:
        assert running.url.startswith("wss://")
        client_context = ssl.create_default_context(cafile=str(cert))
        replies = asyncio.run(vosk_client(running.url, conversation(), ssl=client_context))
        assert spoken(replies) == BOTH
        with pytest.raises(ssl.SSLCertVerificationError):
            asyncio.run(vosk_client(running.url, conversation()))  # an untrusted certificate is refused by the client
    finally:
        running.stop()


def test_hotwords_are_per_connection(tiny_model, tmp_path):
    from tests.test_streaming import write_unigram_lm

    first = load_audio(DATA / "how_much_was_it.opus")
    audio = np.concatenate([silence(0.3), first, silence(1.0)])
    lm = write_unigram_lm(tmp_path, ["how", "was", "it", "mush", "lunch"])  # "much" is not a known word
    recognizer = asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="beam", lm=str(lm)))
    running = RunningServer(recognizer)

    async def both():
        return await asyncio.gather(vosk_client(running.url, audio, {"hotwords": ["much"]}), vosk_client(running.url, audio, {}))

    try:
        with_phrase, without = asyncio.run(both())
    finally:
        running.stop()
    assert spoken(with_phrase) == "how much was it"
    assert "much" not in " ".join(r["text"] for r in without if r.get("text"))


GRAMMAR = [*CLIPS.values(), "[unk]"]
PREFIXES = {" ".join(p.split()[:i]) for p in CLIPS.values() for i in range(1, len(p.split()) + 1)}


def test_phrase_list_is_a_grammar_per_connection(server):
    # vosk-server's meaning: recognition restricted to the phrases, "[unk]" for anything else; "grammar" is a synonym
    async def three():
        return await asyncio.gather(
            vosk_client(server.url, conversation(), {"phrase_list": GRAMMAR, "words": True}),
            vosk_client(server.url, conversation(), {"grammar": ["zero", "one", "[unk]"]}),
            vosk_client(server.url, conversation(), {}),
        )

    restricted, unknown, free = asyncio.run(three())
    assert spoken(restricted) == BOTH
    assert all(r["partial"] in PREFIXES for r in restricted if r.get("partial")), restricted
    assert [w["word"] for r in restricted if r.get("text") for w in r["result"]] == " ".join(CLIPS.values()).split()
    assert spoken(unknown) == "[unk] [unk]"
    assert spoken(free) == BOTH


def test_max_alternatives_gives_vosk_n_best_finals(server):
    async def scenario():
        with_words = await vosk_client(server.url, conversation(), {"max_alternatives": 3, "phrase_list": GRAMMAR, "words": True})
        greedy = await vosk_client(server.url, conversation(), {"max_alternatives": 2, "words": False})
        async with connect(server.url) as ws:  # nothing said: vosk's empty N-best final
            await ws.send(json.dumps({"config": {"max_alternatives": 1, "words": False}}))
            await ws.send('{"eof": 1}')
            empty, _ = await drain(ws)
        return with_words, greedy, empty

    with_words, greedy, empty = asyncio.run(scenario())
    finals = [r for r in with_words if r.get("type") == "final"]
    assert all("text" not in r and "result" not in r for r in finals)
    assert " ".join(r["alternatives"][0]["text"] for r in finals) == BOTH
    for final in finals:
        alternatives = final["alternatives"]
        confidences = [a["confidence"] for a in alternatives]
        assert 1 <= len(alternatives) <= 3 and confidences == sorted(confidences, reverse=True)
        assert all(0 < c <= 1 for c in confidences) and sum(confidences) <= 1 + 1e-9
        for alternative in alternatives:
            assert set(alternative) == {"text", "confidence", "result"}
            assert [w["word"] for w in alternative["result"]] == alternative["text"].split()
            assert all(set(w) == {"word", "start", "end"} and w["start"] < w["end"] for w in alternative["result"])
    assert any("partial" in r for r in with_words)  # partials are unchanged
    greedy_finals = [r for r in greedy if r.get("type") == "final" and r["alternatives"][0]["text"]]
    assert [(a["text"], a["confidence"]) for r in greedy_finals for a in r["alternatives"]] in (
        [(t, 1.0) for t in CLIPS.values()],
        [(BOTH, 1.0)],  # the two segments' finals merged into one reply
    )
    assert all("result" not in a for r in greedy_finals for a in r["alternatives"])  # words were not requested
    assert empty == [{"type": "final", "alternatives": [{"text": "", "confidence": 1.0}]}]


def test_bad_grammar_or_alternatives_is_reported_to_that_client_only(server):
    async def scenario():
        async with connect(server.url) as bad:
            errors = []
            for config in (
                {"phrase_list": []},
                {"phrase_list": ["zero", "d\u00e9j\u00e0 vu"]},
                {"grammar": "zero one"},
                {"phrase_list": ["zero"], "grammar": ["one"]},
                {"max_alternatives": -1},
                {"max_alternatives": "3"},
                {"max_alternatives": True},
                {"phrase_list": ["zero"], "max_alternatives": 1.5},
            ):
                await bad.send(json.dumps({"config": config}))
                errors.append(json.loads(await bad.recv()))
            await bad.send(json.dumps({"config": {"phrase_list": GRAMMAR}}))  # a good config still works afterwards
            audio = conversation()
            for start in range(0, len(audio), 4000):
                await bad.send(pcm16(audio[start : start + 4000]))
            await bad.send('{"eof": 1}')
            replies, _ = await drain(bad)
            other = await vosk_client(server.url, conversation())
            return errors, replies, other

    errors, replies, other = asyncio.run(scenario())
    assert all(e["type"] == "error" for e in errors), errors
    messages = [e["error"] for e in errors]
    assert "at least one phrase" in messages[0] and "cannot be spelled" in messages[1] and "list of at most" in messages[2]
    assert "same setting" in messages[3] and all("max_alternatives" in m for m in messages[4:])
    assert spoken(replies) == BOTH
    assert spoken(other) == BOTH


def test_abrupt_disconnect_and_session_length_limit(recognizer):
    running = RunningServer(recognizer, max_session_seconds=2.0)

    async def scenario():
        rude = await connect(running.url)
        await rude.send(pcm16(conversation()[:16000]))
        rude.transport.abort()  # gone without a closing handshake
        long = []
        async with connect(running.url) as ws:
            await ws.send(pcm16(conversation()))
            with pytest.raises(ConnectionClosed):
                while True:
                    long.append(json.loads(await ws.recv()))
            limit = ws.close_code, ws.close_reason
        after = await vosk_client(running.url, conversation()[: int(1.9 * 16000)])  # under the limit
        return limit, long, after

    try:
        (code, reason), long, after = asyncio.run(scenario())
    finally:
        running.stop()
    assert code == 1008 and "longer than 2 s" in reason
    assert any(r.get("type") == "final" for r in long)  # the final result came before the close
    assert spoken(after) == "how much was it"


def test_sigterm_flushes_finals_and_exits(tiny_model):
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "asr",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model",
            str(tiny_model),
            "--decoder",
            "greedy",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
                time.sleep(0.3)

        async def client():
            async with connect(f"ws://127.0.0.1:{port}") as ws:
                audio = conversation()
                await ws.send(pcm16(audio[: len(audio) // 2 + 8000]))
                await asyncio.sleep(1.0)
                process.send_signal(signal.SIGTERM)
                return await drain(ws)

        replies, code = asyncio.run(client())
        assert process.wait(30) == 0
    finally:
        process.kill()
    assert code == 1001
    assert [r["text"] for r in replies if r.get("text")][:1] == ["how much was it"]
