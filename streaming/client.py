"""Async client for `asr serve` (or any vosk-server): stream PCM, receive partial and final results."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from asr.audio import SAMPLE_RATE, iter_audio


class RecognitionClient:
    """``async with RecognitionClient(url) as client:`` then ``send`` audio and iterate ``events()``.

    ``phrase_list`` is a grammar (vosk-server's meaning: output restricted to these phrases, "[unk]" for anything
    else); ``hotwords`` are words to favour (this server's extension; vosk-server ignores the key).
    """

    def __init__(
        self,
        url: str,
        sample_rate: int = SAMPLE_RATE,
        words: bool = True,
        phrase_list: list[str] | None = None,
        token: str | None = None,
        ssl=None,
        hotwords: list[str] | None = None,
        punctuate: bool | None = None,
    ) -> None:
        self.url, self.sample_rate, self.words, self.phrase_list, self.token, self.ssl = url, sample_rate, words, phrase_list, token, ssl
        self.hotwords, self.punctuate = hotwords, punctuate
        self._connection: ClientConnection | None = None

    async def __aenter__(self) -> RecognitionClient:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        self._connection = await connect(self.url, additional_headers=headers, ssl=self.ssl, max_size=None)
        config = {"sample_rate": self.sample_rate, "words": self.words}
        if self.phrase_list:
            config["phrase_list"] = self.phrase_list
        if self.hotwords:
            config["hotwords"] = self.hotwords
        if self.punctuate is not None:
            config["punctuate"] = self.punctuate
        await self._connection.send(json.dumps({"config": config}))
        return self

    async def __aexit__(self, *exc) -> None:
        await self._connection.close()

    async def send(self, audio: np.ndarray) -> None:
        """Send mono audio (samples,): float in [-1, 1] or int16."""
        if audio.dtype != np.int16:
            audio = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
        await self._connection.send(audio.astype("<i2").tobytes())

    async def end(self) -> None:
        await self._connection.send(json.dumps({"eof": 1}))

    async def events(self) -> AsyncIterator[dict]:
        """Replies until the server closes: {"partial": ...}, {"text": ..., "result": [...]}, {"error": ...}."""
        async for message in self._connection:
            yield json.loads(message)


async def transcribe_with_server(
    url: str,
    path,
    token: str | None = None,
    phrase_list: list[str] | None = None,
    piece_seconds: float = 0.5,
    ssl=None,
    on_event: Callable[[dict], None] | None = None,
    hotwords: list[str] | None = None,
) -> list[dict]:
    """Stream a file to the server as fast as it accepts it; returns the final results (with words)."""
    finals: list[dict] = []
    async with RecognitionClient(url, SAMPLE_RATE, True, phrase_list, token, ssl, hotwords) as client:

        async def receive() -> None:
            async for event in client.events():
                if on_event is not None:
                    on_event(event)
                if "error" in event:
                    raise RuntimeError(f"server error: {event['error']}")
                if event.get("text"):
                    finals.append(event)

        receiver = asyncio.create_task(receive())
        step = int(piece_seconds * SAMPLE_RATE)
        for block in iter_audio(path):
            for start in range(0, len(block), step):
                await client.send(block[start : start + step])
        await client.end()
        await receiver
    return finals


async def stream_blocks(
    url: str,
    blocks: Iterable[np.ndarray],
    sample_rate: int,
    on_event: Callable[[dict], None],
    token: str | None = None,
    ssl=None,
    phrase_list: list[str] | None = None,
    hotwords: list[str] | None = None,
    punctuate: bool | None = None,
) -> None:
    """Send audio blocks (e.g. from a microphone) and hand every reply to ``on_event``; ``punctuate``: ask for cased,
    punctuated finals (None: the server's default)."""
    async with RecognitionClient(url, sample_rate, True, phrase_list, token, ssl, hotwords, punctuate) as client:

        async def receive() -> None:
            async for event in client.events():
                on_event(event)

        receiver = asyncio.create_task(receive())
        loop = asyncio.get_running_loop()
        iterator = iter(blocks)
        while (block := await loop.run_in_executor(None, next, iterator, None)) is not None:
            await client.send(block)
        await client.end()
        await receiver
