"""Incremental recognition: one ``RecognitionStream`` per audio stream.

Audio pieces of any size go in; partial hypotheses and final segments come out. The model runs one
chunk at a time as soon as the chunk and its lookahead have arrived, carrying the forward LSTM state,
so its output is frame for frame the output of offline (chunked) recognition of the same audio.
Segments end where ``asr.segmenter`` ends them for offline recognition too: at a pause in the audio's energy
(the encoder runs the segment's last frames at once), after a run of non-speech (CTC blank) frames, or at a maximum
length (at a quiet point), so that a stream that never pauses still gets finals in bounded memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from asr.audio import SAMPLE_RATE, StreamResampler
from asr.decoding import Alternative, Segment, Word
from asr.encoder import ChunkedEncoder
from asr.features import StreamingFeatures
from asr.recognizer import Recognizer
from asr.request import RequestOptions
from asr.segmenter import SegmentDecoder, SegmentOptions


@dataclass(frozen=True)
class StreamOptions:
    endpoint_silence: float = SegmentOptions.endpoint_silence  # seconds of quiet audio after speech that end a segment
    blank_endpoint: float = SegmentOptions.blank_endpoint  # seconds of blank output after words that end a segment
    max_segment: float = SegmentOptions.max_segment  # seconds; a longer segment is cut at a quiet point of its last seconds
    partials: bool = True  # emit a partial after each piece of audio when the text changed

    def __post_init__(self) -> None:
        _ = self.segmentation  # SegmentOptions validates the values

    @property
    def segmentation(self) -> SegmentOptions:
        """Where segments end (the same options cut offline recordings)."""
        return SegmentOptions(self.endpoint_silence, self.blank_endpoint, self.max_segment)


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
    formatted_text: str | None = None  # cased and punctuated, when the stream asked for it

    @classmethod
    def of(cls, segment: Segment) -> Final:
        return cls(segment.text, segment.index, segment.start, segment.end, segment.words, segment.alternatives)

    @property
    def display_text(self) -> str:
        """What a person reads: the formatted text when there is one, else the recognised words."""
        return self.text if self.formatted_text is None else self.formatted_text

    def to_dict(self) -> dict:
        """The final as the server sends it: ``text`` is the formatted text when there is one (``raw_text`` then holds
        the words as recognised); ``result`` lists the recognised words with their times."""
        data = {
            "type": "final",
            "text": self.display_text,
            "segment": self.segment,
            "start": self.start,
            "end": self.end,
            "result": [{"word": w.text, "start": w.start, "end": w.end, "conf": w.confidence} for w in self.words],
        }
        if self.formatted_text is not None:
            data["raw_text"] = self.text
        if self.alternatives:
            data["alternatives"] = [a.to_dict() for a in self.alternatives]
        return data


Event = Partial | Final


class RecognitionStream:
    """Feed audio with ``accept``; call ``finish`` at the end. Not thread-safe: one stream per thread or task.

    ``request`` (``asr.RequestOptions``), or its fields as keywords, defaults to the recogniser's own, except that a
    stream punctuates only when asked: ``hotwords``, ``grammar``, ``alternatives`` (N-best entries in each final),
    ``lstm=False`` (finals not rescored with the recogniser's LSTM LM), ``punctuate=True`` (finals also carry their
    words cased and punctuated, ``Final.formatted_text``; partials stay raw).
    With a grammar, partials show the words finished so far (a prefix of the grammar's phrases) and commit none.
    """

    def __init__(
        self,
        recognizer: Recognizer,
        sample_rate: int = SAMPLE_RATE,
        options: StreamOptions = StreamOptions(),
        request: RequestOptions | None = None,
        **settings,
    ) -> None:
        if request is not None and settings:
            raise ValueError("give a RequestOptions or its settings as keywords, not both")
        resolved = recognizer.resolve(request or RequestOptions(**{"punctuate": False, **settings}))
        self.recognizer = recognizer
        self._punctuator = recognizer.punctuator if resolved.punctuate else None
        self.options = options
        self.sample_rate = sample_rate
        self._resampler = StreamResampler(sample_rate)
        self._features = StreamingFeatures(recognizer.extractor)
        self._encoder = recognizer.new_encoder(options.segmentation)
        self._decoder = SegmentDecoder(recognizer.segment_search(resolved), self._encoder, options.segmentation)
        self._frame_shift = recognizer.frame_shift
        self._lookahead = recognizer.model.config.lookahead_frames
        self._last_partial = ""
        self._committed: list[str] = []
        self._partial_start = 0  # model frame where the segment of _committed and _last_partial starts
        self._samples_in = 0
        self._finished = False

    @property
    def seconds_received(self) -> float:
        return self._samples_in / self.sample_rate

    def accept(self, audio: np.ndarray) -> list[Event]:
        """audio (samples,) float32 in [-1, 1] or int16, at the stream's sample rate -> new events."""
        self.feed(audio)
        return self.process(self._encoder.accept(np.zeros((0, self.recognizer.extractor.config.n_mels), np.float32)))

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
        self._encoder.push(self._features.accept(self._resampler(np.zeros(0, dtype=np.float32), last=True)))
        events = self._events(self._decoder.add(self._encoder.flush()) + self._decoder.finish(), partial=False)
        self._finished = True
        return events

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
        """Events for frames (frames, vocab) produced by the encoder for this stream: finals of the segments they
        ended, then a partial of the current segment when its text changed."""
        return self._events(self._decoder.add(log_probs), partial=self.options.partials)

    def _events(self, segments: list[Segment], partial: bool) -> list[Event]:
        events: list[Event] = [self._final(s) for s in segments]
        if self._partial_start != self._decoder.segment_start:  # a segment ended (with words or not)
            self._last_partial, self._committed, self._partial_start = "", [], self._decoder.segment_start
        if partial and self._decoder.has_speech:
            current = self._partial()
            if current.text != self._last_partial:
                self._last_partial = current.text
                events.append(current)
        return events

    def _final(self, segment: Segment) -> Final:
        final = Final.of(segment)
        if self._punctuator is not None and segment.words:
            final.formatted_text = " ".join(self._punctuator.format_words([w.text for w in segment.words]))
        return final

    def _partial(self) -> Partial:
        """The current hypothesis, keeping words already committed: a word is committed once another word
        follows it and it ended before the lookahead horizon, so that what a user has read does not flicker."""
        decoder = self._decoder
        hypothesis = decoder.hypothesis().words
        words = [w.text for w in hypothesis]
        horizon = (decoder.segment_start + decoder.segment_length - self._lookahead) * self._frame_shift
        for i in range(len(self._committed), len(words) - 1):
            if hypothesis[i].end > horizon or decoder.grammar is not None:  # a grammar may still switch phrases
                break
            self._committed.append(words[i])
        shown = self._committed + words[len(self._committed) :]
        return Partial(" ".join(shown), decoder.index, len(self._committed))
