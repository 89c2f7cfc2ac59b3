"""`asr serve`: a websocket server that speaks vosk-server's protocol.

One ``RecognitionStream`` per connection; the model runs in one worker thread, which batches the
chunks of all active streams into shared model calls, so the event loop never blocks on inference.
Limits (connections, message size, idle time, session length) and errors are handled per
connection: a bad client never affects the others.

The reply rule is vosk-server's: every audio message gets exactly one reply, in order, at once, from the
connection's current state (``Session.reply``): the finals of the segments that ended since the previous reply
(merged into one), or else the current partial, even when unchanged. Its own audio is recognised meanwhile, so a
client that sends a piece and waits for the reply (as vosk-server's examples do) never waits for inference,
unless it is more than ``MAX_BACKLOG_SECONDS`` of audio ahead of the recogniser. ``{"eof": 1}`` and
``{"reset": 1}`` get one final holding everything still pending; a valid config message gets no reply.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from asr.encoder import encode_ready_chunks
from asr.grammar import GrammarError
from asr.recognizer import Recognizer
from asr.request import RequestOptions
from asr.segmenter import combine_alternatives

from .recognizer import Final, Partial, RecognitionStream, StreamOptions
from .voices import Enrolment, EnrolmentRefused, VoiceStore, owner_of

MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 48000
PAGE = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")  # the browser client served at /
CONFIG_KEYS = {"sample_rate", "words", "max_alternatives", "phrase_list", "grammar", "hotwords", "model", "lstm", "punctuate"}
DEFAULT_MODEL = "default"  # the name of the first model a server serves
MAX_BACKLOG_SECONDS = 10.0  # audio a connection may send ahead of recognition before its replies wait for it
MAX_PHRASES = 1000  # entries of a connection's grammar or hotword list
MAX_ENROLMENT_PROMPTS = 30
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_POLICY = 1008
CLOSE_GOING_AWAY = 1001


@dataclass(frozen=True)
class ServerOptions:
    host: str = "0.0.0.0"
    port: int = 2700
    max_connections: int = 32
    max_message_bytes: int = 1 << 20  # 1 MiB: about 32 s of 16 kHz PCM in one frame
    idle_timeout: float = 30.0  # seconds without a message
    max_session_seconds: float = 4 * 3600.0  # seconds of audio per connection
    sample_rate: int = 16000  # assumed until a client's config says otherwise
    token: str | None = None  # shared secret required in the Authorization header or ?token=
    punctuate: bool = False  # cased, punctuated finals for every connection (else only for those whose config asks)
    tokens: tuple[str, ...] = ()  # more accepted secrets (one per user: each token owns its learned voices)
    voices: str | None = None  # folder of learned voices; None: no enrolment
    max_enrolments: int = 1  # adaptation processes at once
    prompts_file: str | None = None  # enrolment prompts (default: the bundled Harvard sentences)
    prompts: int = 10  # prompts per enrolment

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_message_bytes < 1024 or self.idle_timeout <= 0 or self.max_session_seconds <= 0:
            raise ValueError("limits must be positive (max_message_bytes at least 1024)")
        if not MIN_SAMPLE_RATE <= self.sample_rate <= MAX_SAMPLE_RATE:
            raise ValueError(f"sample_rate must be within {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz")
        if self.max_enrolments < 1 or not 3 <= self.prompts <= MAX_ENROLMENT_PROMPTS:
            raise ValueError(f"max_enrolments must be >= 1 and prompts from 3 to {MAX_ENROLMENT_PROMPTS}")

    @property
    def accepted_tokens(self) -> tuple[str, ...]:
        return tuple(t for t in (self.token, *self.tokens) if t)


class ProtocolError(ValueError):
    """A client message that breaks the protocol; reported to that client only."""


def vosk_message(event: Partial | Final, words: bool, alternatives: int = 0) -> dict:
    """A Vosk-compatible reply; extra keys (type, segment, ...) are ignored by Vosk clients.

    With ``alternatives`` (max_alternatives > 0), a final carries vosk-server's N-best form in place of text/result:
    ``{"alternatives": [{"text", "confidence", "result": [{"word", "start", "end"}]}]}`` (result only with words).
    """
    data = event.to_dict()
    if isinstance(event, Final):
        data.pop("alternatives", None)
        if alternatives:
            data.pop("text")
            data.pop("result")
            data["alternatives"] = [_vosk_alternative(a.text, a.confidence, a.words if words else None) for a in event.alternatives]
        elif not words:
            data.pop("result")
    return data


def _vosk_alternative(text: str, confidence: float, words: list | None) -> dict:
    entry = {"text": text, "confidence": confidence}
    if words is not None:
        entry["result"] = [{"word": w.text, "start": w.start, "end": w.end} for w in words]
    return entry


def merge_finals(finals: list[Final]) -> Final:
    """Several finals as one (segments that ended between two replies): texts and words in order, the N-best of the
    combinations of their alternatives."""
    if len(finals) == 1:
        return finals[0]
    count = max(len(f.alternatives) for f in finals)
    formatted = [f.display_text for f in finals if f.text] if any(f.formatted_text is not None for f in finals) else None
    return Final(
        " ".join(f.text for f in finals),
        finals[0].segment,
        finals[0].start,
        finals[-1].end,
        [w for f in finals for w in f.words],
        combine_alternatives([f.alternatives for f in finals], count) if count else [],
        None if formatted is None else " ".join(formatted),
    )


def empty_final(words: bool, alternatives: int) -> dict:
    """The final sent at eof/reset when nothing was recognised (vosk-server sends one too)."""
    if alternatives:
        return {"type": "final", "alternatives": [_vosk_alternative("", 1.0, [] if words else None)]}
    return {"type": "final", "text": "", **({"result": []} if words else {})}


def _phrase_list(config: dict, key: str) -> list[str]:
    phrases = config[key]
    if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases) or len(phrases) > MAX_PHRASES:
        raise ProtocolError(f"{key} must be a list of at most {MAX_PHRASES} strings")
    return phrases


@dataclass(frozen=True)
class PendingAudio:
    """Audio of a session that the inference worker has not answered yet."""

    future: asyncio.Future  # its events
    seconds: float


class Session:
    """Protocol state of one connection: its settings, its stream, and what it has recognised but not yet replied."""

    def __init__(self, server: RecognitionServer, owner: str | None = None) -> None:
        self.server = server
        self.owner = owner  # the digest of the connection's token: whose learned voices it may use
        self.enrolment: Enrolment | None = None
        self.sample_rate = server.options.sample_rate
        self.words = True  # vosk-server shows words by default
        # hotwords and grammar None: the server's own; finals rescored with the LSTM LM when the server loaded one; cased
        # and punctuated when asked (asr serve --punctuate: for every connection)
        self.request = RequestOptions(alternatives=0, lstm=True, punctuate=server.options.punctuate)
        self._hotwords: list[str] | None = None
        self.model = DEFAULT_MODEL
        self.stream: RecognitionStream | None = None
        self.pending: list[Final] = []  # finals recognised since the last reply
        self.partial = Partial("", 0)  # the current segment's hypothesis
        self.jobs: list[PendingAudio] = []  # audio being recognised, oldest first
        self.seconds_received = 0.0  # audio the client sent in this session

    @property
    def alternatives(self) -> int:
        return self.request.alternatives

    @property
    def recognizer(self) -> Recognizer:
        """The session's model: a served one, or a voice of its owner (loaded on first use: call it off the event loop)."""
        if self.model in self.server.recognizers:
            return self.server.recognizers[self.model]
        return self.server.voices.recognizer(self.owner, self.model)

    def configure(self, config: object) -> None:
        """Apply a client's config, all of it or (on a ProtocolError) none of it."""
        if self.stream is not None or self.enrolment is not None:
            raise ProtocolError("config must come before the first audio (and not during an enrolment)")
        if not isinstance(config, dict):
            raise ProtocolError("config must be a JSON object")
        unknown = set(config) - CONFIG_KEYS
        if unknown:
            raise ProtocolError(f"unknown config key(s): {sorted(unknown)}")
        model = self._model(config)
        rate = config.get("sample_rate", self.sample_rate)
        if not isinstance(rate, int | float) or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE or rate != int(rate):
            raise ProtocolError(f"sample_rate must be an integer from {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE}, got {rate!r}")
        current = self.request
        alternatives = config.get("max_alternatives", current.alternatives)
        if isinstance(alternatives, bool) or not isinstance(alternatives, int) or alternatives < 0:
            raise ProtocolError(f"max_alternatives must be a whole number >= 0 (0: no alternatives), got {alternatives!r}")
        if "phrase_list" in config and "grammar" in config:
            raise ProtocolError("phrase_list and grammar are the same setting: send one of them")
        grammar = current.grammar if model == self.model else None
        for key in ("phrase_list", "grammar"):  # vosk-server's phrase_list is a grammar: output restricted to the phrases
            if key in config:
                try:
                    grammar = self.server.recognizers.get(model, self.server.recognizer).parse_grammar(_phrase_list(config, key))
                except GrammarError as error:
                    raise ProtocolError(f"{key}: {error}") from error
        hotwords = _phrase_list(config, "hotwords") if "hotwords" in config else self._hotwords
        lstm = config.get("lstm", current.lstm)
        if not isinstance(lstm, bool):
            raise ProtocolError(f"lstm must be true or false (rescoring finals with the LSTM LM), got {str(lstm)[:100]!r}")
        punctuate = config.get("punctuate", current.punctuate)
        if not isinstance(punctuate, bool):
            raise ProtocolError(f"punctuate must be true or false (cased, punctuated finals), got {str(punctuate)[:100]!r}")
        if punctuate and self.server.punctuator_error is not None:
            raise ProtocolError(f"this server cannot punctuate: {self.server.punctuator_error}")
        self._hotwords = hotwords  # kept for a later config; a grammar, when there is one, decides
        self.request = RequestOptions(None if grammar is not None else hotwords, grammar, alternatives, lstm, punctuate)
        self.sample_rate = int(rate)
        self.words = bool(config.get("words", self.words))
        self.model = model

    def _model(self, config: dict) -> str:
        """The model a config picks by name (vosk-server's ``model`` is a path: this server never opens one)."""
        if "model" not in config:
            return self.model
        name = config["model"]
        voices = self.server.voices
        if name not in self.server.recognizers and not (voices is not None and voices.has(self.owner, name)):
            served = ", ".join(self.server.recognizers)
            mine = f"; this token's voices: {', '.join(voices.names(self.owner)) or 'none'}" if voices is not None and self.owner else ""
            raise ProtocolError(f"unknown model {str(name)[:100]!r}: this server serves {served} (by name; it never opens a path){mine}")
        return name

    def new_stream(self) -> RecognitionStream:
        """A stream for this session's settings (slow the first time a hotword list is seen: its decoder is built)."""
        return RecognitionStream(self.recognizer, self.sample_rate, self.server.stream_options, self.request)

    def collect(self, events: list[Partial | Final]) -> None:
        """Take a stream's events into the state that replies are made of."""
        for event in events:
            if isinstance(event, Final):
                self.pending.append(event)
                self.partial = Partial("", event.segment + 1)
            else:
                self.partial = event

    def harvest(self) -> None:
        """Collect the events of the audio recognised so far, in order (jobs finish in the order they were sent)."""
        while self.jobs and self.jobs[0].future.done():
            future = self.jobs.pop(0).future
            if future.exception() is not None:  # reported as the reply to the message now being answered
                raise ProtocolError(str(future.exception()))
            self.collect(future.result())

    @property
    def backlog(self) -> float:
        """Seconds of audio sent but not yet recognised."""
        return sum(job.seconds for job in self.jobs)

    async def drain(self, backlog: float = 0.0) -> None:
        """Wait until at most ``backlog`` seconds of the audio sent so far are not yet recognised, collecting the rest."""
        self.harvest()
        while self.jobs and self.backlog > backlog:
            await asyncio.wait([self.jobs[0].future])
            self.harvest()

    def reply(self) -> dict:
        """The reply to an audio message: the pending finals as one, else the current partial."""
        if self.pending:
            final, self.pending = merge_finals(self.pending), []
            return vosk_message(final, self.words, self.alternatives)
        return self.partial.to_dict()


@dataclass
class _Job:
    """Work for the inference thread, and where its result goes (a future of the event loop that queued it)."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    result: object = None  # what the future gets: the events, a return value, or an exception

    def resolve(self) -> None:
        result, future = self.result, self.future
        setter = future.set_exception if isinstance(result, Exception) else future.set_result
        self.loop.call_soon_threadsafe(lambda: future.done() or setter(result))


@dataclass
class _AudioJob(_Job):
    stream: RecognitionStream | None = None
    pcm: np.ndarray | None = None


@dataclass
class _CallJob(_Job):
    function: Callable | None = None
    args: tuple = ()


class InferenceWorker:
    """One thread that runs the model for every connection, batching the chunks that are ready across streams.

    Jobs arrive from the event loop; each round takes every queued job, buffers all new audio, runs one
    batched model call per chunk position (``encode_ready_chunks``) and resolves each job's future with
    its stream's events.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="asr-inference", daemon=True)
        self._thread.start()
        self.rounds = self.batched_streams = 0

    def audio(self, stream: RecognitionStream, pcm: np.ndarray) -> asyncio.Future:
        """Queue audio for a stream; the future gives its events (jobs finish in the order they were queued)."""
        loop = asyncio.get_running_loop()
        return self._submit(_AudioJob(loop, loop.create_future(), stream=stream, pcm=pcm))

    async def call(self, function, *args):
        loop = asyncio.get_running_loop()
        return await self._submit(_CallJob(loop, loop.create_future(), function=function, args=args))

    def _submit(self, job: _Job) -> asyncio.Future:
        self._jobs.put(job)
        return job.future

    def stop(self) -> None:
        self._jobs.put(None)

    def _loop(self) -> None:
        while True:
            jobs = [self._jobs.get()]
            while not self._jobs.empty():
                jobs.append(self._jobs.get_nowait())
            if None in jobs:
                return
            audio = [job for job in jobs if isinstance(job, _AudioJob)]
            self._recognise(audio)
            for job in jobs:
                if isinstance(job, _CallJob):
                    try:
                        job.result = job.function(*job.args)
                    except Exception as error:  # handed to the caller, who reports it to its client
                        job.result = error
            for job in jobs:
                job.resolve()

    def _recognise(self, jobs: list[_AudioJob]) -> None:
        """Feed every job's audio, run the model once per model and chunk position, and give each stream's events to
        its last job of the round (the others get none)."""
        streams: list[RecognitionStream] = []
        for job in jobs:
            try:
                job.stream.feed(job.pcm)
                job.result = []
                if job.stream not in streams:
                    streams.append(job.stream)
            except (ValueError, RuntimeError) as error:
                job.result = error
        events = {}
        for group in _by_model(streams):  # one batched model call per model and chunk position
            frames = encode_ready_chunks([s.encoder for s in group])
            self.rounds += 1
            self.batched_streams += len(group)
            events.update({id(s): s.process(f) for s, f in zip(group, frames)})
        for job in reversed(jobs):
            if not isinstance(job.result, Exception) and id(job.stream) in events:
                job.result = events.pop(id(job.stream))


def _supplied_token(request: Request) -> str:
    """The token a client sent: ``Authorization: Bearer TOKEN`` or ``?token=TOKEN`` ("" when none)."""
    supplied = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    return supplied or parse_qs(urlsplit(request.path).query).get("token", [""])[0]


def _by_model(streams: list[RecognitionStream]) -> list[list[RecognitionStream]]:
    groups: dict[int, list[RecognitionStream]] = {}
    for stream in streams:
        groups.setdefault(id(stream.encoder.model), []).append(stream)
    return list(groups.values())


class RecognitionServer:
    """Serves ``recognizer`` (named ``DEFAULT_MODEL``) and any ``more`` models, which a client picks by name."""

    def __init__(
        self,
        recognizer: Recognizer,
        options: ServerOptions | None = None,
        stream_options: StreamOptions | None = None,
        more: dict[str, Recognizer] | None = None,
    ) -> None:
        self.recognizer = recognizer
        self.recognizers = {DEFAULT_MODEL: recognizer, **(more or {})}
        self.options = options or ServerOptions()
        self.stream_options = stream_options or StreamOptions()
        self.punctuator_error = self._load_punctuators()
        options = self.options
        self.voices = None
        if options.voices:
            self.voices = VoiceStore(options.voices, recognizer, options.prompts_file, options.prompts, options.max_enrolments)
        self._adaptations: set[asyncio.Task] = set()
        self.worker = InferenceWorker()
        self._sessions: dict[ServerConnection, Session] = {}
        self._stopping = False

    def _load_punctuators(self) -> str | None:
        """Load the models' punctuation model now (not in the event loop); why it cannot be loaded, or None.

        With ``options.punctuate`` (every connection punctuates) a missing or broken punctuation model is an error."""
        try:
            for recognizer in self.recognizers.values():
                recognizer.punctuator  # noqa: B018 - loaded and cached
        except ValueError as error:
            if self.options.punctuate:
                raise
            return str(error)
        return None

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path)
        if path.path == "/healthz":
            return connection.respond(HTTPStatus.OK, f"ok {len(self._sessions)} active\n")
        if request.headers.get("Upgrade", "").lower() != "websocket":
            if path.path in ("/", "/index.html"):
                response = connection.respond(HTTPStatus.OK, PAGE)
                response.headers["Content-Type"] = "text/html; charset=utf-8"
                return response
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        accepted = self.options.accepted_tokens
        if accepted:
            supplied = _supplied_token(request).encode()
            if not any(hmac.compare_digest(supplied, token.encode()) for token in accepted):
                return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")
        return None

    async def handler(self, connection: ServerConnection) -> None:
        if self._stopping:
            await connection.close(CLOSE_GOING_AWAY, "server is shutting down")
            return
        if len(self._sessions) >= self.options.max_connections:
            await connection.close(CLOSE_TRY_AGAIN_LATER, f"server is full ({self.options.max_connections} connections)")
            return
        session = Session(self, owner_of(_supplied_token(connection.request)) if connection.request is not None else None)
        self._sessions[connection] = session
        try:
            await self._serve(connection, session)
        except ConnectionClosed:
            pass  # the client went away; nothing to flush to
        finally:
            self._sessions.pop(connection, None)

    async def _send(self, connection: ServerConnection, reply: dict) -> None:
        await connection.send(json.dumps(reply))

    async def _serve(self, connection: ServerConnection, session: Session) -> None:
        while True:
            try:
                message = await asyncio.wait_for(connection.recv(), self.options.idle_timeout)
            except TimeoutError:
                await self._finish(connection, session)
                await connection.close(CLOSE_POLICY, f"idle for {self.options.idle_timeout:g} s")
                return
            try:
                if isinstance(message, bytes):
                    await self._audio(connection, session, message)
                elif await self._command(connection, session, message):
                    return  # eof: answered and closed
            except json.JSONDecodeError as error:
                await connection.send(json.dumps({"type": "error", "error": f"malformed JSON: {error}"}))
            except ProtocolError as error:
                await connection.send(json.dumps({"type": "error", "error": str(error)}))
            if session.seconds_received > self.options.max_session_seconds:
                await self._finish(connection, session)
                await connection.close(CLOSE_POLICY, f"session longer than {self.options.max_session_seconds:g} s of audio")
                return

    async def _command(self, connection: ServerConnection, session: Session, message: str) -> bool:
        """Handle a text message; returns True when the connection was closed (eof)."""
        request = json.loads(message)
        if not isinstance(request, dict):
            raise ProtocolError("text messages must be JSON objects")
        if "config" in request:
            session.configure(request["config"])
        elif request.get("eof"):
            await self._finish(connection, session)
            await connection.close()
            return True
        elif request.get("reset"):
            await self._finish(connection, session, restart=True)
        elif "enroll" in request:
            await self._start_enrolment(connection, session, request["enroll"])
        else:
            raise ProtocolError(f"unknown message keys {sorted(request)}; expected config, eof, reset or enroll")
        return False

    async def _start_enrolment(self, connection: ServerConnection, session: Session, request: object) -> None:
        """``{"enroll": {"name": "me"}}``: reply with the prompts; the audio that follows is read as their utterances."""
        if self.voices is None:
            raise ProtocolError("this server does not learn voices (start it with --voices DIR)")
        if session.stream is not None or session.enrolment is not None:
            raise ProtocolError("enroll must come before any audio, once per connection")
        try:
            session.enrolment = self.voices.start(session.owner, request, session.sample_rate, set(self.recognizers))
        except EnrolmentRefused as error:
            raise ProtocolError(str(error)) from None
        await self._send(connection, {**session.enrolment.status(), "texts": session.enrolment.prompts})

    async def _enrolment_audio(self, connection: ServerConnection, session: Session, pcm: np.ndarray) -> None:
        """Cut the prompts' utterances; after the last one, adapt in the background. One reply per message, as for recognition."""
        enrolment = session.enrolment
        if not enrolment.complete:
            try:  # in a helper thread: it writes each prompt's recording; this session's next message waits for it
                await asyncio.get_running_loop().run_in_executor(None, enrolment.accept, pcm)
            except EnrolmentRefused as error:
                session.enrolment = None
                raise ProtocolError(str(error)) from None
            if enrolment.complete:
                enrolment.adapting = True
                task = asyncio.create_task(self._adapt(connection, session, enrolment))
                self._adaptations.add(task)
                task.add_done_callback(self._adaptations.discard)
        await self._send(connection, enrolment.status())

    async def _adapt(self, connection: ServerConnection, session: Session, enrolment: Enrolment) -> None:
        """Adapt, then tell the client (when it is still connected) and let the connection use the voice."""
        try:
            report = await self.voices.adapt(session.owner, enrolment)
            await asyncio.get_running_loop().run_in_executor(None, self.voices.recognizer, session.owner, enrolment.name)
            reply = {"type": "enrolment", "name": enrolment.name, "adapted": True, "report": report}
        except (ValueError, OSError) as error:  # EnrolmentRefused is a ValueError
            reply = {"type": "error", "error": f"learning the voice {enrolment.name!r} failed: {error}"}
        if session.enrolment is enrolment:
            session.enrolment = None
        try:
            await self._send(connection, reply)
        except ConnectionClosed:
            pass  # the voice is kept: the client may use it when it comes back

    async def _audio(self, connection: ServerConnection, session: Session, data: bytes) -> None:
        """Queue the audio for recognition and reply at once from the session's state (see the module's docstring)."""
        if len(data) % 2:
            raise ProtocolError(f"audio frames must hold 16-bit samples (an even byte count), got {len(data)} bytes")
        if session.enrolment is not None:
            session.seconds_received += len(data) / 2 / session.sample_rate
            await self._enrolment_audio(connection, session, np.frombuffer(data, dtype="<i2"))
            return
        if session.stream is None:  # built in a helper thread: neither the event loop nor the inference worker waits
            session.stream = await asyncio.get_running_loop().run_in_executor(None, session.new_stream)
        if data:
            seconds = len(data) / 2 / session.sample_rate
            session.jobs.append(PendingAudio(self.worker.audio(session.stream, np.frombuffer(data, dtype="<i2")), seconds))
            session.seconds_received += seconds
        await session.drain(MAX_BACKLOG_SECONDS)  # at once, unless the client is far ahead of recognition
        await self._send(connection, session.reply())

    async def _finish(self, connection: ServerConnection, session: Session, restart: bool = False) -> None:
        """Send one final holding everything still pending (Vosk sends one even when it is empty)."""
        await session.drain()
        if session.stream is not None:
            session.collect(await self.worker.call(session.stream.finish))
        if session.pending:
            await self._send(connection, session.reply())
        else:
            await self._send(connection, empty_final(session.words, session.alternatives))
        session.partial = Partial("", 0)
        if restart:
            session.stream = None

    async def shutdown(self) -> None:
        """Stop accepting, send every client its final result, then close the connections."""
        self._stopping = True
        for task in list(self._adaptations):
            task.cancel()  # its process is stopped; no voice is written
        for connection, session in list(self._sessions.items()):
            try:
                await self._finish(connection, session)
                await connection.close(CLOSE_GOING_AWAY, "server shutting down")
            except ConnectionClosed:
                pass

    async def run(self, ready: asyncio.Event | None = None, ssl=None) -> None:
        """Serve until SIGINT/SIGTERM (or cancellation), then shut down gracefully."""
        async with serve(
            self.handler,
            self.options.host,
            self.options.port,
            process_request=self.process_request,
            max_size=self.options.max_message_bytes,
            ssl=ssl,
        ) as server:
            stop = asyncio.get_running_loop().create_future()
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
                except (NotImplementedError, RuntimeError):
                    pass  # not the main thread (tests) or not supported here
            self.port = server.sockets[0].getsockname()[1] if server.sockets else self.options.port
            if ready is not None:
                ready.set()
            try:
                await stop
            finally:
                await self.shutdown()
                self.worker.stop()
