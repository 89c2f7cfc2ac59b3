"""Incremental recognition: one ``RecognitionStream`` per audio stream.

Audio pieces of any size go in; partial hypotheses and final segments come out. The model runs one
chunk at a time as soon as the chunk and its lookahead have arrived, carrying the forward LSTM state,
so its output is frame for frame the output of offline (chunked) recognition of the same audio.
Segments end at a pause in the audio's energy (``asr.endpoint``; the encoder runs the segment's last frames
at once), after a run of non-speech (CTC blank) frames, or at a maximum length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from asr.audio import SAMPLE_RATE, StreamResampler
from asr.decoding import Alternative, Transcript, Word, check_alternatives, greedy_decode
from asr.encoder import ChunkedEncoder
from asr.features import StreamingFeatures
from asr.recognizer import GrammarLike, Recognizer


@dataclass(frozen=True)
class StreamOptions:
    endpoint_silence: float = 0.6  # seconds of quiet audio after speech that end a segment
    blank_endpoint: float = 1.2  # seconds of blank model output after words that end a segment (audio too noisy to pause)
    max_segment: float = 20.0  # seconds; a longer segment is finalised anyway
    partials: bool = True  # emit a partial after each chunk when the text changed

    def __post_init__(self) -> None:
        if self.endpoint_silence <= 0 or self.blank_endpoint <= 0:
            raise ValueError("endpoint_silence and blank_endpoint must be positive")
        if self.max_segment <= max(self.endpoint_silence, self.blank_endpoint):
            raise ValueError("max_segment must be longer than endpoint_silence and blank_endpoint")


@dataclass
class Partial:
    text: str
    segment: int
    committed: int = 0  # leading words that will not change any more in this segment's partials

    def to_dict(self) -> dict:
        return {"type": "partial", "partial": self.text, "segment": self.segment, "committed": self.committed}


@dataclass
class Final:
    text: str
    segment: int
    start: float  # seconds from the stream start
    end: float
    words: list[Word] = field(default_factory=list)
    alternatives: list[Alternative] = field(default_factory=list)  # N-best, when the stream asked for them

    def to_dict(self) -> dict:
        data = {
            "type": "final",
            "text": self.text,
            "segment": self.segment,
            "start": self.start,
            "end": self.end,
            "result": [{"word": w.text, "start": w.start, "end": w.end, "conf": w.confidence} for w in self.words],
        }
        if self.alternatives:
            data["alternatives"] = [a.to_dict() for a in self.alternatives]
        return data


Event = Partial | Final


class RecognitionStream:
    """Feed audio with ``accept``; call ``finish`` at the end. Not thread-safe: one stream per thread or task.

    ``hotwords``, ``grammar`` and ``alternatives`` (N-best entries in each final) default to the recogniser's own.
    With a grammar, partials show the words finished so far (a prefix of the grammar's phrases) and commit none.
    """

    def __init__(
        self,
        recognizer: Recognizer,
        sample_rate: int = SAMPLE_RATE,
        options: StreamOptions = StreamOptions(),
        hotwords: list[str] | tuple[str, ...] | None = None,
        grammar: GrammarLike | None = None,
        alternatives: int | None = None,
    ) -> None:
        self.recognizer = recognizer
        self.options = options
        self.sample_rate = sample_rate
        self._resampler = StreamResampler(sample_rate)
        self._features = StreamingFeatures(recognizer.extractor)
        self._encoder = ChunkedEncoder(
            recognizer.model, recognizer.device, recognizer.frame_shift, pause_seconds=options.endpoint_silence, head=recognizer.head
        )
        self._frame_shift = recognizer.frame_shift
        self._endpoint_frames = max(1, round(options.endpoint_silence / self._frame_shift))
        self._blank_endpoint_frames = max(1, round(options.blank_endpoint / self._frame_shift))
        self._max_frames = round(options.max_segment / self._frame_shift)
        self._grammar = recognizer.resolve_grammar(grammar)
        self._alternatives = check_alternatives(recognizer.options.alternatives if alternatives is None else alternatives)
        if self._grammar is not None:
            self._beam = recognizer.stream_decoder(grammar=self._grammar)
        elif recognizer.decoder_name == "beam":
            self._beam = recognizer.stream_decoder(tuple(hotwords) if hotwords is not None else recognizer.options.hotwords)
        else:
            self._beam = None
        # the frames this stream decodes: the phones' for an LM in phones, else the characters'
        self._phones = self._beam is not None and self._grammar is None and recognizer.units == "phones"
        self._vocabulary = recognizer.beam_vocabulary if self._phones else recognizer.vocabulary
        self._segment = 0
        self._segment_start = 0  # model frames since the stream start
        self._segment_frames: list[torch.Tensor] = []
        self._segment_length = 0
        self._trailing_blanks = 0
        self._has_speech = False
        self._last_partial = ""
        self._committed: list[str] = []
        self._transcript_words: list[Word] = []
        self._lookahead = recognizer.model.config.lookahead_frames
        self._samples_in = 0
        self._finished = False
        if self._beam is not None:
            self._beam.begin()

    @property
    def seconds_received(self) -> float:
        return self._samples_in / self.sample_rate

    def accept(self, audio: np.ndarray) -> list[Event]:
        """audio (samples,) float32 in [-1, 1] or int16, at the stream's sample rate -> new events."""
        if self._finished:
            raise RuntimeError("stream already finished")
        audio = self._validate(audio)
        self._samples_in += len(audio)
        return self._consume(self._resampler(audio.astype(np.float32, copy=False)))

    @staticmethod
    def _validate(audio: np.ndarray) -> np.ndarray:
        audio = np.asarray(audio)
        if audio.dtype == np.int16:
            audio = audio.astype(np.float32) / 32768.0
        if audio.ndim != 1:
            raise ValueError(f"audio must be mono (samples,), got shape {audio.shape}")
        if audio.dtype.kind == "f" and not np.all(np.isfinite(audio)):
            raise ValueError("audio contains NaN or infinite samples")
        return audio

    def finish(self) -> list[Event]:
        """Flush buffered audio (the last chunk runs without lookahead) and finalise the last segment."""
        if self._finished:
            return []
        events = self._consume(self._resampler(np.zeros(0, dtype=np.float32), last=True))
        events += self._segments(self._encoder.flush())
        final = self._finalize()
        self._finished = True
        return events + ([final] if final else [])

    def _consume(self, audio: np.ndarray) -> list[Event]:
        return self._segments(self._encoder.accept(self._features.accept(audio)))

    # The server batches model calls across streams: feed() buffers features, encode_ready_chunks() runs the
    # model for all streams at once, and process() turns each stream's new frames into events.
    def feed(self, audio: np.ndarray) -> None:
        """Like ``accept`` without running the model: buffer the audio's features in ``encoder``."""
        if self._finished:
            raise RuntimeError("stream already finished")
        audio = self._validate(audio)
        self._samples_in += len(audio)
        self._encoder.push(self._features.accept(self._resampler(audio.astype(np.float32, copy=False))))

    @property
    def encoder(self) -> ChunkedEncoder:
        return self._encoder

    def process(self, log_probs: torch.Tensor) -> list[Event]:
        """Events for frames produced by ``encode_ready_chunks`` for this stream."""
        return self._segments(log_probs)

    def _segments(self, log_probs: torch.Tensor) -> list[Event]:
        """Add new frames to the current segment, finalising at the encoder's pauses, at blank-run endpoints and at
        the maximum length."""
        events: list[Event] = []
        position = self._segment_start + self._segment_length  # model frames from the stream start
        ends = self._encoder.segment_ends
        while ends and ends[0] <= position + len(log_probs):
            cut = ends.popleft() - position
            events += self._split(log_probs[:cut])
            events.append(self._finalize())
            log_probs, position = log_probs[cut:], position + cut
        return [e for e in events + self._split(log_probs) if e is not None]

    def _split(self, log_probs: torch.Tensor) -> list[Event | None]:
        events: list[Event | None] = []
        blank = self._decoded(log_probs).argmax(-1) == 0
        while len(log_probs):
            room = self._max_frames - self._segment_length
            events += self._add(log_probs[:room], blank[:room])
            if self._segment_length >= self._max_frames:
                events.append(self._finalize())
            log_probs, blank = log_probs[room:], blank[room:]
        return events

    def _add(self, log_probs: torch.Tensor, blank: torch.Tensor) -> list[Event]:
        """Append frames to the current segment, ending segments at every endpoint inside them."""
        events: list[Event] = []
        start = 0
        for i, is_blank in enumerate(blank.tolist()):
            if is_blank:
                self._trailing_blanks += 1
            else:
                self._has_speech, self._trailing_blanks = True, 0
            if self._has_speech and self._trailing_blanks >= self._blank_endpoint_frames:
                self._append(log_probs[start : i + 1])
                events.append(self._finalize())
                start = i + 1
        if start == len(log_probs):
            return events
        self._append(log_probs[start:])
        if not self._has_speech:
            if self._segment_length > 2 * self._endpoint_frames and self._beam is None:
                self._drop_silence()
            return events
        if self.options.partials:
            partial = self._partial()
            if partial.text != self._last_partial:
                self._last_partial = partial.text
                events.append(partial)
        return events

    def _partial(self) -> Partial:
        """The current hypothesis, keeping words already committed: a word is committed once another word
        follows it and it ended before the lookahead horizon, so that what a user has read does not flicker."""
        words = [w.text for w in self._transcript(final=False).words]
        horizon = (self._segment_start + self._segment_length - self._lookahead) * self._frame_shift
        ends = [w.end for w in self._transcript_words]
        for i in range(len(self._committed), len(words) - 1):
            if ends[i] > horizon or self._grammar is not None:  # a grammar may still switch phrases
                break
            self._committed.append(words[i])
        shown = self._committed + words[len(self._committed) :]
        return Partial(" ".join(shown), self._segment, len(self._committed))

    def _decoded(self, log_probs: torch.Tensor) -> torch.Tensor:
        """The part of the model's output that this stream decodes (phones or characters)."""
        return self.recognizer.select(log_probs, self._phones)

    def _append(self, log_probs: torch.Tensor) -> None:
        self._segment_frames.append(log_probs)  # all output layers: a phone search's finals are reranked with the characters
        self._segment_length += len(log_probs)
        if self._beam is not None:
            self._beam.step(self._decoded(log_probs))

    def _drop_silence(self) -> None:
        """Forget leading silence of a segment with no speech yet (bounded memory during long pauses)."""
        frames = torch.cat(self._segment_frames)
        keep = self._endpoint_frames
        self._segment_start += len(frames) - keep
        self._segment_frames = [frames[-keep:]]
        self._segment_length = keep

    def _transcript(self, final: bool) -> Transcript:
        frames = torch.cat(self._segment_frames) if self._segment_frames else None
        emissions = self._decoded(frames) if frames is not None else torch.zeros(0, len(self._vocabulary))
        chars = self.recognizer.select(frames, False) if frames is not None and self._phones and final else None
        offset = self._segment_start * self._frame_shift
        alternatives = self._alternatives if final else 0
        if self._beam is not None:
            transcript = self._beam.best(emissions, self._frame_shift, offset, final, alternatives, char_log_probs=chars)
        else:
            transcript = greedy_decode(emissions, self.recognizer.vocabulary, self._frame_shift, offset)
            if alternatives:  # the greedy decoder considers one hypothesis
                transcript.alternatives = [Alternative(transcript.text, 1.0, list(transcript.words))]
        self._transcript_words = transcript.words
        return transcript

    def _finalize(self) -> Final | None:
        """End the current segment; returns its Final if it held any words."""
        if not self._segment_length:
            return None
        transcript = self._transcript(final=True)
        start = self._segment_start * self._frame_shift
        end = (self._segment_start + self._segment_length) * self._frame_shift
        final = (
            Final(transcript.text, self._segment, round(start, 3), round(end, 3), transcript.words, transcript.alternatives)
            if transcript.text
            else None
        )
        if final is not None:
            self._segment += 1
        self._segment_start += self._segment_length
        self._segment_frames, self._segment_length = [], 0
        self._trailing_blanks, self._has_speech, self._last_partial, self._committed = 0, False, "", []
        if self._beam is not None:
            self._beam.begin()
        return final
