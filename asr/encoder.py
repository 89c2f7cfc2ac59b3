"""Chunk-by-chunk encoding of a feature stream, shared by offline and streaming recognition.

The forward LSTM state is carried from chunk to chunk and reset after a pause (a run of CTC
blanks), as every training utterance started from a zero state: a state carried through minutes
of audio drifts where the model was never trained. Offline and streaming recognition both run
this same loop, so they give identical output for the same audio.
"""

from __future__ import annotations

import numpy as np
import torch

from .model import CTCModel

STATE_RESET_SILENCE = 0.6  # seconds of blank output after which the forward state restarts from zero


class ChunkedEncoder:
    """Normalised log-mel frames in (any number at a time) -> log-probabilities (frames, vocab) out."""

    def __init__(self, model: CTCModel, device: torch.device, frame_shift: float, reset_silence: float = STATE_RESET_SILENCE) -> None:
        config = model.config
        if config.chunk_frames <= 0:
            raise ValueError("this model runs over whole utterances (chunk_frames=0) and cannot be run chunk by chunk")
        self.model, self.device = model, device
        self._stack = config.stack_frames
        self._step = config.chunk_frames * self._stack  # 10 ms frames consumed per chunk
        self._need = self._step + config.lookahead_frames * self._stack
        self._reset_frames = max(1, round(reset_silence / frame_shift))
        self._pending = np.zeros((0, config.n_mels), dtype=np.float32)
        self._state = None
        self._trailing_blanks = 0
        self.resets = 0

    def accept(self, features: np.ndarray) -> torch.Tensor:
        """features (frames, n_mels) -> log-probs of every chunk now complete with its lookahead."""
        if len(features):
            self._pending = np.concatenate([self._pending, features])
        outputs = []
        while len(self._pending) >= self._need:
            outputs.append(self._run(self._pending[: self._need], self._step // self._stack))
            self._pending = self._pending[self._step :]
        return torch.cat(outputs) if outputs else torch.zeros(0, self.model.config.vocab_size)

    def flush(self) -> torch.Tensor:
        """Encode what is left (the last chunk has no lookahead)."""
        out = self._run(self._pending, None) if len(self._pending) >= self._stack else torch.zeros(0, self.model.config.vocab_size)
        self._pending = self._pending[:0]
        return out

    @torch.inference_mode()
    def _run(self, features: np.ndarray, num_output: int | None) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(features)).unsqueeze(0).to(self.device)
        log_probs, _, self._state = self.model(x, torch.tensor([len(features)], device=self.device), self._state, num_output)
        log_probs = log_probs[0].float().cpu()
        blank = (log_probs.argmax(-1) == 0).flip(0)
        self._trailing_blanks = self._trailing_blanks + len(blank) if bool(blank.all()) else int((~blank).int().argmax())
        if self._trailing_blanks >= self._reset_frames and self._state is not None:
            self._state = None
            self.resets += 1
        return log_probs
