"""Chunk-by-chunk encoding of a feature stream, shared by offline and streaming recognition.

The forward LSTM state is carried from chunk to chunk and restarts from zero where the audio pauses,
as every training utterance started from a zero state: a state carried through minutes of audio
drifts where the model was never trained. Two rules find pauses. An energy pause (``PauseDetector``)
ends a segment: the frames up to it run at once as the end of an utterance, with no lookahead to wait
for, and the segment's end is reported in ``segment_ends`` so that streaming can finalise without
delay. A run of CTC blanks (for audio too noisy for the energy rule) only restarts the state.
Offline and streaming recognition both run this same loop, so they give identical output for the same audio.

A model without chunks (``chunk_frames=0``, an ordinary BLSTM) runs once per segment instead: its features are
buffered until a pause, or until ``max_segment`` seconds, where the quietest frame of the last seconds ends the segment.
The encoder also keeps each model frame's audio energy (``frame_energies``), for decoders that cut long segments.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from .endpoint import MAX_SEGMENT_SECONDS, PAUSE_SECONDS, QUIET_SEARCH_SECONDS, PauseDetector, frame_energy_db, quietest_frame
from .model import CTCModel

STATE_RESET_SILENCE = 0.6  # seconds of blank output after which the forward state restarts from zero


class ChunkedEncoder:
    """Normalised log-mel frames in (any number at a time) -> log-probabilities (frames, vocab) out.

    ``head`` is the model's output layer(s) to compute (``CTCModel.forward``); silence is judged on the characters.
    """

    def __init__(
        self,
        model: CTCModel,
        device: torch.device,
        frame_shift: float,
        reset_silence: float = STATE_RESET_SILENCE,
        pause_seconds: float | None = PAUSE_SECONDS,
        head: str = "chars",
        max_segment: float = MAX_SEGMENT_SECONDS,
    ) -> None:
        """``frame_shift``: seconds per model frame; ``pause_seconds``: energy pause that ends a segment (None: never);
        ``max_segment``: the longest segment a model without chunks runs over at once (seconds)."""
        config = model.config
        if max_segment <= QUIET_SEARCH_SECONDS / 2:
            raise ValueError(f"max_segment must be longer than {QUIET_SEARCH_SECONDS / 2} s")
        self.model, self.device, self.head = model, device, head
        self.whole_segments = config.chunk_frames == 0
        self.width = model.output_width(head)
        self._stack = config.stack_frames
        self._step = config.chunk_frames * self._stack  # 10 ms frames consumed per chunk
        self._need = self._step + config.lookahead_frames * self._stack
        feature_seconds = frame_shift / self._stack
        self._max_features = round(max_segment / feature_seconds) // self._stack * self._stack
        self._quiet_search = min(round(QUIET_SEARCH_SECONDS / feature_seconds), self._max_features // 2)
        self._reset_frames = max(1, round(reset_silence / frame_shift))
        self._pending = np.zeros((0, config.n_mels), dtype=np.float32)
        self._state = None
        self._trailing_blanks = 0
        self._pauses = PauseDetector(feature_seconds, pause_seconds) if pause_seconds else None
        self._cuts: deque[int] = deque()  # positions in _pending where a segment ends (multiples of the stack)
        self.frames_out = 0  # model frames returned so far
        self.segment_ends: deque[int] = deque()  # model-frame positions (from the start) where segments ended; consumers pop them
        self.resets = 0
        self._energies = np.zeros(0, dtype=np.float32)  # dB of each feature frame from _energy_start on
        self._energy_start = 0  # feature frames since the start whose energies were released
        self._consumed = 0  # feature frames since the start that left _pending

    def push(self, features: np.ndarray) -> None:
        """Buffer features (frames, n_mels) without running the model."""
        if not len(features):
            return
        energies = frame_energy_db(features).astype(np.float32)
        if self._pauses is not None:
            for end in self._pauses.find(energies):
                position = len(self._pending) + end
                self._cuts.append(position - position % self._stack)
        self._pending = np.concatenate([self._pending, features])
        self._energies = np.concatenate([self._energies, energies])

    def frame_energies(self, start: int, end: int) -> np.ndarray:
        """Audio energy (dB) of model frames [start, end) counted from the stream start: (end - start,), each the mean of
        its stacked feature frames. Frames before the last ``release`` are gone."""
        first = start * self._stack - self._energy_start
        if first < 0:
            raise ValueError(f"energies before model frame {self._energy_start // self._stack} were released")
        values = self._energies[first : first + (end - start) * self._stack]
        usable = len(values) - len(values) % self._stack
        return values[:usable].reshape(-1, self._stack).mean(axis=1)

    def release(self, before: int) -> None:
        """Forget the energies of model frames before ``before`` (bounded memory; consumers call it as segments end)."""
        drop = min(before * self._stack - self._energy_start, len(self._energies))
        if drop > 0:
            self._energies = self._energies[drop:]
            self._energy_start += drop

    def _next_window(self) -> tuple[int, int | None] | None:
        """(frames of _pending to run, outputs to keep) for the next model call; outputs None = all, and the segment ends."""
        limit = self._max_features if self.whole_segments else self._need - 1
        if self._cuts and self._cuts[0] <= limit:
            return self._cuts[0], None
        if self.whole_segments:
            if len(self._pending) < self._max_features:
                return None
            self._cuts.appendleft(self._quiet_cut())
            return self._cuts[0], None
        if len(self._pending) >= self._need:
            return self._need, self._step // self._stack
        return None

    def _quiet_cut(self) -> int:
        """Where a model without chunks ends a segment that reached its maximum length: after the quietest model frame of
        its last seconds (a multiple of the stack in _pending)."""
        first = (self._max_features - self._quiet_search) // self._stack
        last = self._max_features // self._stack
        energies = self.frame_energies(self._consumed // self._stack + first, self._consumed // self._stack + last)
        return (first + quietest_frame(energies) + 1) * self._stack

    @property
    def ready(self) -> bool:
        """Whether a whole chunk and its lookahead, or the end of a segment, are buffered."""
        return self._next_window() is not None

    @property
    def batchable(self) -> bool:
        """Whether the next model call is an ordinary chunk with its full lookahead."""
        window = self._next_window()
        return window is not None and window[1] is not None

    def accept(self, features: np.ndarray) -> torch.Tensor:
        """features (frames, n_mels) -> log-probs of every chunk now complete with its lookahead."""
        self.push(features)
        outputs = []
        while (window := self._next_window()) is not None:
            outputs.append(self._advance(*window))
        return torch.cat(outputs) if outputs else torch.zeros(0, self.width)

    def flush(self) -> torch.Tensor:
        """Encode what is left (the last chunk has no lookahead)."""
        outputs = [self.accept(np.zeros((0, self.model.config.n_mels), np.float32))]
        if len(self._pending) >= self._stack:
            outputs.append(self._run(self._pending, None))
        self._consumed += len(self._pending)
        self._pending = self._pending[:0]
        self._cuts.clear()
        return torch.cat(outputs)

    def _advance(self, frames: int, num_output: int | None) -> torch.Tensor:
        """Run one window of _pending: a chunk (consumes a step) or the rest of a segment (consumes it, restarts the state)."""
        if num_output is not None:
            out = self._run(self._pending[:frames], num_output)
            self._consume(self._step)
            return out
        out = self._run(self._pending[:frames], None) if frames else torch.zeros(0, self.width)
        self._consume(frames)
        self._cuts.popleft()
        self._end_segment()
        return out

    def _consume(self, frames: int) -> None:
        self._pending = self._pending[frames:]
        self._consumed += frames
        self._cuts = deque(c - frames for c in self._cuts)

    def _end_segment(self) -> None:
        self._state = None
        self._trailing_blanks = 0
        self.segment_ends.append(self.frames_out)
        self.resets += 1

    @torch.inference_mode()
    def _run(self, features: np.ndarray, num_output: int | None) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(features)).unsqueeze(0).to(self.device)
        lengths = torch.tensor([len(features)], device=self.device)
        log_probs, _, self._state = self.model(x, lengths, self._state, num_output, head=self.head)
        return self._after_chunk(log_probs[0].float().cpu())

    def _after_chunk(self, log_probs: torch.Tensor) -> torch.Tensor:
        self.frames_out += len(log_probs)
        chars = log_probs[:, : self.model.config.vocab_size] if self.head == "both" else log_probs
        blank = (chars.argmax(-1) == 0).flip(0)
        self._trailing_blanks = self._trailing_blanks + len(blank) if bool(blank.all()) else int((~blank).int().argmax())
        if self._trailing_blanks >= self._reset_frames and self._state is not None:
            self._state = None
            self.resets += 1
        return log_probs


def _stack_states(states: list, model: CTCModel, device: torch.device) -> list:
    """Per-stream forward states (None = zeros) -> one batched state per layer, streams along dim 1."""
    hidden = model.config.hidden_size
    zeros = torch.zeros(1, 1, hidden, device=device)
    batched = []
    for layer in range(model.num_rnn_layers):
        parts = [s[layer] if s is not None else None for s in states]
        if model.config.cell == "lstm":
            batched.append(tuple(torch.cat([p[i] if p is not None else zeros for p in parts], dim=1) for i in range(2)))
        else:
            batched.append(torch.cat([p if p is not None else zeros for p in parts], dim=1))
    return batched


@torch.inference_mode()
def encode_ready_chunks(encoders: list[ChunkedEncoder]) -> list[torch.Tensor]:
    """Run every complete chunk of several streams (one model) with one model call per round, streams batched.

    Returns each encoder's new log-probs (frames, vocab): the same frames ``accept`` would give it alone.
    """
    outputs: list[list[torch.Tensor]] = [[] for _ in encoders]
    while True:
        for i, encoder in enumerate(encoders):  # segment ends (shorter windows, one per pause) run alone
            while encoder.ready and not encoder.batchable:
                outputs[i].append(encoder._advance(*encoder._next_window()))
        active = [i for i, e in enumerate(encoders) if e.batchable]
        if not active:
            break
        first = encoders[active[0]]
        model, device = first.model, first.device
        windows = np.stack([encoders[i]._pending[: encoders[i]._need] for i in active])
        x = torch.from_numpy(windows).to(device)
        state = _stack_states([encoders[i]._state for i in active], model, device)
        lengths = torch.full((len(active),), windows.shape[1], device=device)
        log_probs, _, new_state = model(x, lengths, state, first._step // first._stack, head=first.head)
        for row, i in enumerate(active):
            encoder = encoders[i]
            if model.config.cell == "lstm":
                encoder._state = [(h[:, row : row + 1], c[:, row : row + 1]) for h, c in new_state]
            else:
                encoder._state = [h[:, row : row + 1] for h in new_state]
            encoder._consume(encoder._step)
            outputs[i].append(encoder._after_chunk(log_probs[row].float().cpu()))
    return [torch.cat(o) if o else torch.zeros(0, e.width) for o, e in zip(outputs, encoders)]
