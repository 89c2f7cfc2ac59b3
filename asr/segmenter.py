"""Decoding a stream of model frames segment by segment, so that cost and memory follow the longest segment.

``SegmentDecoder`` takes the log-probabilities that ``ChunkedEncoder`` produces, in pieces of any size, and
decodes each segment on its own. A segment ends:

- at an energy pause (the encoder's ``segment_ends``),
- after a run of blank model output that follows words (audio too noisy to pause),
- or at ``max_segment`` seconds, cut after the quietest frame of its last seconds that the model hears as blank
  (speech, music or noise that never pauses).

Each segment's search ends with the language model's end-of-sentence score. Offline recognition
(``Recognizer.transcribe``) and streaming recognition run this same object, so they give identical output.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from .decoding import Alternative, Segment, Transcript, Word, check_alternatives, greedy_decode
from .encoder import ChunkedEncoder
from .endpoint import MAX_SEGMENT_SECONDS, PAUSE_SECONDS, QUIET_SEARCH_SECONDS, quietest_frame
from .lm import BeamSearchDecoder
from .text import Vocabulary


@dataclass(frozen=True)
class SegmentOptions:
    endpoint_silence: float = PAUSE_SECONDS  # seconds of quiet audio after speech that end a segment
    blank_endpoint: float = 1.2  # seconds of blank model output after words that end a segment (audio too noisy to pause)
    max_segment: float = MAX_SEGMENT_SECONDS  # seconds; a longer segment is cut at a quiet point of its last seconds

    def __post_init__(self) -> None:
        if self.endpoint_silence <= 0 or self.blank_endpoint <= 0:
            raise ValueError("endpoint_silence and blank_endpoint must be positive")
        if self.max_segment <= max(self.endpoint_silence, self.blank_endpoint):
            raise ValueError("max_segment must be longer than endpoint_silence and blank_endpoint")
        if self.max_segment <= QUIET_SEARCH_SECONDS / 2:
            raise ValueError(f"max_segment must be longer than {QUIET_SEARCH_SECONDS / 2} s")


@dataclass(frozen=True)
class OutputLayout:
    """Where the characters and phones are in the encoder's log-probs (frames, vocab): the characters' ``chars``
    columns, then the phones' when the model computes both (``phones``)."""

    chars: int
    phones: bool = False

    def characters(self, log_probs: torch.Tensor) -> torch.Tensor:
        return log_probs[:, : self.chars] if self.phones else log_probs

    def select(self, log_probs: torch.Tensor, phones: bool) -> torch.Tensor:
        """The phones' columns (``phones``) or the characters'."""
        return log_probs[:, self.chars :] if phones else self.characters(log_probs)


@dataclass(frozen=True)
class SegmentSearch:
    """How a stream's segments are decoded: ``search`` (a beam search of its own, from ``BeamSearchDecoder.fork``) or
    None for greedy decoding of ``vocabulary``; ``phones``: the search reads the phones' columns (and reranks its
    finals with the characters'); ``alternatives``: N-best entries per final segment."""

    search: BeamSearchDecoder | None
    vocabulary: Vocabulary  # the characters (greedy decoding)
    layout: OutputLayout
    frame_shift: float  # seconds per model frame
    phones: bool = False
    alternatives: int = 0

    def __post_init__(self) -> None:
        check_alternatives(self.alternatives)
        if self.phones and (self.search is None or not self.layout.phones):
            raise ValueError("a phone search needs a beam search and a model with a phone output layer")


class SegmentDecoder:
    """Log-probs (frames, vocab) of one stream in (``add``), finished ``Segment``s out; ``finish`` at the end.

    ``decoding`` says how segments are searched (``Recognizer.segment_search`` resolves a request into one).
    ``encoder`` is the stream's encoder: its pauses end segments, and its frame energies place the cuts of long ones.
    Not thread-safe: one per stream.
    """

    def __init__(
        self,
        decoding: SegmentSearch,
        encoder: ChunkedEncoder,
        options: SegmentOptions = SegmentOptions(),
        record_spans: bool = False,
    ) -> None:
        """``record_spans``: keep the (start, end) model frames of every segment in ``spans``, words or not."""
        self.decoding, self.encoder, self.options = decoding, encoder, options
        self.spans: list[tuple[int, int]] | None = [] if record_spans else None
        self.frame_shift = decoding.frame_shift
        self._endpoint_frames = max(1, round(options.endpoint_silence / self.frame_shift))
        self._blank_endpoint_frames = max(1, round(options.blank_endpoint / self.frame_shift))
        self._max_frames = round(options.max_segment / self.frame_shift)
        self._quiet_search = min(round(QUIET_SEARCH_SECONDS / self.frame_shift), self._max_frames // 2)
        self._beam = decoding.search
        self.grammar = self._beam.grammar if self._beam is not None else None
        self.alternatives = decoding.alternatives
        self._phones = decoding.phones  # the frames this stream decodes: the phones' for an LM in phones
        self._width = len(self._beam.vocabulary if self._beam is not None else decoding.vocabulary)
        self.index = 0  # of the next segment with words
        self.segment_start = 0  # model frames from the stream start
        self.segment_length = 0
        self._frames: list[torch.Tensor] = []  # the current segment's log-probs, all output layers
        self._trailing_blanks = 0
        self.has_speech = False  # whether the current segment has non-blank output
        if self._beam is not None:
            self._beam.begin()

    def add(self, log_probs: torch.Tensor) -> list[Segment]:
        """New frames (frames, vocab) from the encoder -> the segments they finished (only those with words)."""
        segments: list[Segment | None] = []
        position = self.segment_start + self.segment_length
        ends = self.encoder.segment_ends
        while ends and ends[0] <= position + len(log_probs):
            cut = ends.popleft() - position
            segments += self._split(log_probs[:cut])
            segments.append(self._finalize())
            log_probs, position = log_probs[cut:], position + cut
        segments += self._split(log_probs)
        return [s for s in segments if s is not None]

    def finish(self) -> list[Segment]:
        """End the last segment (after the encoder's ``flush`` output went to ``add``)."""
        segment = self._finalize()
        return [segment] if segment is not None else []

    def hypothesis(self) -> Transcript:
        """The current segment's best hypothesis so far (no N-best, no reranking)."""
        return self._transcript(final=False)

    def _split(self, log_probs: torch.Tensor) -> list[Segment | None]:
        """Add frames, cutting the segment wherever it reaches the maximum length."""
        segments: list[Segment | None] = []
        while len(log_probs):
            room = self._max_frames - self.segment_length
            segments += self._add(log_probs[:room])
            log_probs = log_probs[room:]
            if self.segment_length >= self._max_frames:
                segments += self._cut_long_segment()
        return segments

    def _add(self, log_probs: torch.Tensor) -> list[Segment | None]:
        """Append frames to the current segment, ending segments at every blank-run endpoint inside them."""
        segments: list[Segment | None] = []
        start = 0
        blank = self._decoded(log_probs).argmax(-1) == 0
        for i, is_blank in enumerate(blank.tolist()):
            if is_blank:
                self._trailing_blanks += 1
            else:
                self.has_speech, self._trailing_blanks = True, 0
            if self.has_speech and self._trailing_blanks >= self._blank_endpoint_frames:
                self._append(log_probs[start : i + 1])
                segments.append(self._finalize())
                start = i + 1
        if start < len(log_probs):
            self._append(log_probs[start:])
            if not self.has_speech and self.segment_length > 2 * self._endpoint_frames and self._beam is None:
                self._drop_silence()
        return segments

    def _cut_long_segment(self) -> list[Segment | None]:
        """End a segment of maximum length after the quietest blank frame of its last seconds; the frames after the cut
        start the next segment (searched again from there)."""
        if not self.has_speech:
            return [self._finalize()]
        frames = torch.cat(self._frames)
        first = self.segment_length - self._quiet_search
        energies = self.encoder.frame_energies(self.segment_start + first, self.segment_start + self.segment_length)
        blank = (self._decoded(frames[first:]).argmax(-1) == 0).numpy()
        usable = min(len(energies), len(blank))
        cut = first + quietest_frame(energies[:usable], blank[:usable]) + 1 if usable else self.segment_length
        self._frames, self.segment_length = [], 0
        if self._beam is not None:
            self._beam.begin()
        self._append(frames[:cut])
        segment = self._finalize()
        return [segment, *self._add(frames[cut:])]

    def _decoded(self, log_probs: torch.Tensor) -> torch.Tensor:
        """The part of the model's output that this stream decodes (phones or characters)."""
        return self.decoding.layout.select(log_probs, self._phones)

    def _append(self, log_probs: torch.Tensor) -> None:
        self._frames.append(log_probs)  # all output layers: a phone search's finals are reranked with the characters
        self.segment_length += len(log_probs)
        if self._beam is not None:
            self._beam.step(self._decoded(log_probs))

    def _drop_silence(self) -> None:
        """Forget leading silence of a segment with no speech yet (bounded memory during long pauses)."""
        frames = torch.cat(self._frames)
        keep = self._endpoint_frames
        self.segment_start += len(frames) - keep
        self._frames = [frames[-keep:]]
        self.segment_length = keep
        self.encoder.release(self.segment_start)

    def _transcript(self, final: bool) -> Transcript:
        frames = torch.cat(self._frames) if self._frames else None
        emissions = self._decoded(frames) if frames is not None else torch.zeros(0, self._width)
        chars = self.decoding.layout.characters(frames) if frames is not None and self._phones and final else None
        offset = self.segment_start * self.frame_shift
        alternatives = self.alternatives if final else 0
        if self._beam is not None:
            return self._beam.best(emissions, self.frame_shift, offset, final, alternatives, char_log_probs=chars)
        transcript = greedy_decode(emissions, self.decoding.vocabulary, self.frame_shift, offset)
        if alternatives:  # the greedy decoder considers one hypothesis
            transcript.alternatives = [Alternative(transcript.text, 1.0, list(transcript.words))]
        return transcript

    def _finalize(self) -> Segment | None:
        """End the current segment; returns it if it held any words."""
        if not self.segment_length:
            return None
        if self.spans is not None:
            self.spans.append((self.segment_start, self.segment_start + self.segment_length))
        transcript = self._transcript(final=True)
        start = self.segment_start * self.frame_shift
        end = (self.segment_start + self.segment_length) * self.frame_shift
        segment = None
        if transcript.text:
            segment = Segment(self.index, round(start, 3), round(end, 3), transcript.text, transcript.words, transcript.alternatives)
            self.index += 1
        self.segment_start += self.segment_length
        self._frames, self.segment_length = [], 0
        self._trailing_blanks, self.has_speech = 0, False
        self.encoder.release(self.segment_start)
        if self._beam is not None:
            self._beam.begin()
        return segment


def join_segments(segments: list[Segment], duration: float, alternatives: int = 0) -> Transcript:
    """One transcript of a recording from its segments: their texts and words in order, and the ``alternatives``
    most likely combinations of the segments' N-best entries (segments taken as independent)."""
    words: list[Word] = [w for s in segments for w in s.words]
    transcript = Transcript(" ".join(s.text for s in segments), words, duration, segments=list(segments))
    if alternatives:
        transcript.alternatives = combine_alternatives([s.alternatives for s in segments], alternatives)
    return transcript


def combine_alternatives(per_segment: list[list[Alternative]], count: int) -> list[Alternative]:
    """The ``count`` most likely choices of one alternative per segment (confidence: the product of theirs), best first.

    Exact k-best over the product of the lists, with a heap: each choice is reached from its parent by moving one
    segment to its next alternative.
    """
    lists = [sorted(alts, key=lambda a: -a.confidence) for alts in per_segment if alts]
    if not lists:
        return []

    def log_confidence(choice: tuple[int, ...]) -> float:
        return sum(math.log(max(lists[i][j].confidence, 1e-300)) for i, j in enumerate(choice))

    start = (0,) * len(lists)
    heap, seen, out = [(-log_confidence(start), start)], {start}, []
    while heap and len(out) < count:
        score, choice = heapq.heappop(heap)
        picked = [lists[i][j] for i, j in enumerate(choice)]
        out.append(Alternative(" ".join(a.text for a in picked if a.text), math.exp(-score), [w for a in picked for w in a.words]))
        for i, j in enumerate(choice):
            if j + 1 < len(lists[i]):
                child = choice[:i] + (j + 1,) + choice[i + 1 :]
                if child not in seen:
                    seen.add(child)
                    heapq.heappush(heap, (-log_confidence(child), child))
    return out
