"""Offline recognition: audio -> features -> chunked BiLSTM -> CTC decoding -> transcript."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .audio import SAMPLE_RATE, AudioSource, iter_audio, prepare_array
from .checkpoint import ModelBundle, load_model_file
from .decoding import Transcript, greedy_decode
from .features import LogMelExtractor, StreamingFeatures

BUNDLED_MODEL = Path(__file__).parent / "models" / "en-bilstm-ctc.pt"
SEGMENT_CHUNKS = 200  # chunks encoded per model call on long audio (bounds memory, keeps batches large)


@dataclass(frozen=True)
class DecodeOptions:
    chunk_frames: int | None = None  # model frames per chunk; None = the model's own setting
    lookahead_frames: int | None = None

    def __post_init__(self) -> None:
        for name in ("chunk_frames", "lookahead_frames"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")


class Recognizer:
    """Transcribes files or arrays with one model; safe to share between threads (inference only)."""

    def __init__(self, bundle: ModelBundle, options: DecodeOptions = DecodeOptions()) -> None:
        self.bundle = bundle
        self.model = bundle.model.eval()
        self.vocabulary = bundle.vocabulary
        self.extractor = LogMelExtractor(bundle.feature_config)
        self.options = options
        self.device = next(self.model.parameters()).device
        config = self.model.config
        if options.chunk_frames is not None or options.lookahead_frames is not None:
            config = config.with_chunking(
                config.chunk_frames if options.chunk_frames is None else options.chunk_frames,
                config.lookahead_frames if options.lookahead_frames is None else options.lookahead_frames,
            )
            self.model.config = config
        self.frame_shift = bundle.feature_config.frame_shift * config.stack_frames

    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE

    @torch.inference_mode()
    def log_probs(self, blocks) -> torch.Tensor:
        """Encode 16 kHz audio blocks into log-probabilities (frames, vocab), a segment at a time.

        Long audio is processed in segments of whole chunks, carrying the forward state and giving
        each segment its lookahead, so the output equals one pass over the whole recording.
        """
        config = self.model.config
        stack = config.stack_frames
        chunk = config.chunk_frames
        features = StreamingFeatures(self.extractor)
        pending = np.zeros((0, self.extractor.config.n_mels), dtype=np.float32)
        state = None
        outputs = []
        segment = chunk * SEGMENT_CHUNKS * stack if chunk else 0  # 10 ms frames per segment
        lookahead = config.lookahead_frames * stack

        def encode(feats: np.ndarray, num_output: int | None) -> None:
            nonlocal state
            x = torch.from_numpy(np.ascontiguousarray(feats)).unsqueeze(0).to(self.device)
            lp, _, state = self.model(x, torch.tensor([len(feats)], device=self.device), state, num_output)
            outputs.append(lp[0].float().cpu())

        for block in blocks:
            pending = np.concatenate([pending, features.accept(block)])
            while segment and len(pending) >= segment + lookahead:
                encode(pending[: segment + lookahead], segment // stack)
                pending = pending[segment:]
        if len(pending) >= stack or not outputs:
            encode(pending, None)
        return torch.cat(outputs) if outputs else torch.zeros(0, len(self.vocabulary))

    def transcribe(self, audio: AudioSource | np.ndarray, sample_rate: int | None = None) -> Transcript:
        """Transcribe a path, encoded bytes, or an array (samples,)/(samples, channels) at ``sample_rate``."""
        if isinstance(audio, np.ndarray | torch.Tensor):
            signal = prepare_array(np.asarray(audio), sample_rate)
            blocks, duration = [signal], len(signal) / SAMPLE_RATE
        else:
            blocks, duration = _counting(iter_audio(audio))
        log_probs = self.log_probs(blocks)
        transcript = greedy_decode(log_probs, self.vocabulary, self.frame_shift)
        transcript.duration = round(float(duration() if callable(duration) else duration), 3)
        return transcript


def _counting(blocks):
    """Wrap a block iterator so the total number of samples is known afterwards."""
    total = 0

    def generator():
        nonlocal total
        for block in blocks:
            total += len(block)
            yield block

    return generator(), lambda: total / SAMPLE_RATE


def load_model(path: str | os.PathLike | None = None, device: str | None = None, options: DecodeOptions = DecodeOptions()) -> Recognizer:
    """Load a model file (default: the bundled English model) as a ``Recognizer``."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Recognizer(load_model_file(path or BUNDLED_MODEL, device), options)
