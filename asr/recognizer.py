"""Offline recognition: audio -> features -> chunked BiLSTM -> CTC decoding -> transcript."""

from __future__ import annotations

import collections
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .audio import SAMPLE_RATE, AudioSource, iter_audio, prepare_array
from .checkpoint import ModelBundle, load_model_file
from .decoding import Transcript, greedy_decode
from .encoder import ChunkedEncoder
from .features import LogMelExtractor, StreamingFeatures
from .lm import BeamSearchDecoder, DecoderSettings, LanguageModel

BUNDLED_MODEL = Path(__file__).parent / "models" / "en-bilstm-ctc.pt"
BUNDLED_LM = Path(__file__).parent / "models" / "en-lm"
DECODERS = ("auto", "beam", "greedy")
MAX_HOTWORD_LISTS = 8  # decoders (lexicon trie + LM) kept for streams' hotword lists


@dataclass(frozen=True)
class DecodeOptions:
    chunk_frames: int | None = None  # model frames per chunk; None = the model's own setting
    lookahead_frames: int | None = None
    decoder: str = "auto"  # auto: beam search when a language model is available, else greedy
    lm: str | None = None  # language-model folder; None = the bundled LM for the bundled model; "none" = no LM
    settings: dict = field(default_factory=dict)  # overrides of the LM folder's DecoderSettings
    hotwords: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("chunk_frames", "lookahead_frames"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")


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
        self.language_model = self._language_model(options)
        self.decoder_name = options.decoder
        if options.decoder == "auto":
            self.decoder_name = "beam" if self.language_model is not None else "greedy"
        self.decoder_settings = None
        if self.decoder_name == "beam":
            base = self.language_model.settings if self.language_model else DecoderSettings()
            self.decoder_settings = DecoderSettings.from_dict({**base.to_dict(), **options.settings})
        self._local = threading.local()
        self._templates: collections.OrderedDict[tuple[str, ...], BeamSearchDecoder] = collections.OrderedDict()
        self._templates_lock = threading.Lock()
        if self.decoder_name == "beam":
            self.stream_decoder(options.hotwords)  # load now so that a bad LM fails here, not mid-batch

    def _language_model(self, options: DecodeOptions) -> LanguageModel | None:
        if options.lm == "none":
            return None
        if options.lm:
            return LanguageModel.load(options.lm)
        bundled = Path(self.bundle.metadata.get("source_path", "")) == BUNDLED_MODEL.resolve()
        if options.decoder != "greedy" and bundled and (BUNDLED_LM / "decoder.json").is_file():
            return LanguageModel.load(BUNDLED_LM)
        return None

    def beam_decoder(self, hotwords: tuple[str, ...] | list[str] = ()) -> BeamSearchDecoder:
        """A decoder for the calling thread to decode whole utterances with (flashlight decoders keep search state)."""
        decoders = self._local.__dict__.setdefault("decoders", {})
        key = tuple(hotwords)
        if key not in decoders:
            decoders[key] = self.stream_decoder(key)
        return decoders[key]

    def stream_decoder(self, hotwords: tuple[str, ...] | list[str] = ()) -> BeamSearchDecoder:
        """A decoder with its own search state for one stream, from any thread.

        The lexicon trie and LM behind it are built once per hotword list (seconds) and shared by all its streams;
        the most recently used ``MAX_HOTWORD_LISTS`` lists are kept.
        """
        key = tuple(hotwords)
        with self._templates_lock:  # a second stream with the same list waits for the first build instead of repeating it
            template = self._templates.pop(key, None)
            if template is None:
                template = BeamSearchDecoder(self.vocabulary, self.language_model, self.decoder_settings, key)
            self._templates[key] = template
            while len(self._templates) > MAX_HOTWORD_LISTS:
                self._templates.popitem(last=False)
        return template.fork()

    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE

    @torch.inference_mode()
    def log_probs(self, blocks) -> torch.Tensor:
        """Encode 16 kHz audio blocks (any sizes) into log-probabilities (frames, vocab)."""
        features = StreamingFeatures(self.extractor)
        if self.model.config.chunk_frames == 0:  # an ordinary BLSTM: one pass over the whole recording
            feats = np.concatenate([features.accept(b) for b in blocks] or [np.zeros((0, self.extractor.config.n_mels), np.float32)])
            x = torch.from_numpy(feats).unsqueeze(0).to(self.device)
            return self.model(x, torch.tensor([len(feats)], device=self.device))[0][0].float().cpu()
        encoder = ChunkedEncoder(self.model, self.device, self.frame_shift)
        outputs = [encoder.accept(features.accept(block)) for block in blocks]
        outputs.append(encoder.flush())
        return torch.cat(outputs)

    def decode(self, log_probs: torch.Tensor, hotwords: tuple[str, ...] | list[str] | None = None) -> Transcript:
        """log_probs (frames, vocab) -> Transcript with the configured decoder."""
        if self.decoder_name == "greedy":
            return greedy_decode(log_probs, self.vocabulary, self.frame_shift)
        return self.beam_decoder(self.options.hotwords if hotwords is None else hotwords).decode(log_probs, self.frame_shift)

    def transcribe(self, audio: AudioSource | np.ndarray, sample_rate: int | None = None, hotwords: list[str] | None = None) -> Transcript:
        """Transcribe a path, encoded bytes, or an array (samples,)/(samples, channels) at ``sample_rate``.

        ``hotwords``: words or phrases to favour in beam search (default: the recogniser's own).
        """
        if isinstance(audio, np.ndarray | torch.Tensor):
            signal = prepare_array(np.asarray(audio), sample_rate)
            blocks, duration = [signal], len(signal) / SAMPLE_RATE
        else:
            blocks, duration = _counting(iter_audio(audio))
        log_probs = self.log_probs(blocks)
        transcript = self.decode(log_probs, hotwords)
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
    path = Path(path or BUNDLED_MODEL)
    bundle = load_model_file(path, device)
    bundle.metadata["source_path"] = str(path.resolve())
    return Recognizer(bundle, options)
