"""Offline recognition: audio -> features -> chunked BiLSTM -> CTC decoding -> transcript."""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .audio import READ_BLOCK_SECONDS, SAMPLE_RATE, AudioSource, iter_audio, prepare_array
from .checkpoint import ModelBundle, load_model_file
from .decoding import Alternative, Segment, Transcript, greedy_decode
from .encoder import ChunkedEncoder
from .features import LogMelExtractor, StreamingFeatures
from .grammar import Grammar
from .lm import BeamSearchDecoder, DecoderSettings, LanguageModel, LanguageModelError
from .nnlm import NeuralLM, NeuralLMError
from .punctuation import Punctuator, load_punctuator
from .request import Request, RequestOptions
from .segmenter import OutputLayout, SegmentDecoder, SegmentOptions, SegmentSearch, join_segments

BUNDLED_MODEL = Path(__file__).parent / "models" / "en-bilstm-ctc.pt"
BUNDLED_LM = Path(__file__).parent / "models" / "en-lm"
DECODERS = ("auto", "beam", "greedy")
UNIT_CHOICES = ("auto", "chars", "phones")
MAX_HOTWORD_LISTS = 8  # decoders (lexicon trie + LM) kept for streams' hotword lists (and grammars)
GrammarLike = Grammar | Sequence[str]


@dataclass(frozen=True)
class DecodeOptions:
    chunk_frames: int | None = None  # model frames per chunk; None = the model's own setting
    lookahead_frames: int | None = None
    decoder: str = "auto"  # auto: beam search when a language model is available, else greedy
    lm: str | None = None  # language-model folder; None = the bundled LM for the bundled model; "none" = no LM
    settings: dict = field(default_factory=dict)  # overrides of the LM folder's DecoderSettings
    hotwords: tuple[str, ...] = ()
    grammar: tuple[str, ...] | None = None  # phrases (and "[unk]") the output is restricted to; None: free text
    alternatives: int = 0  # N-best entries in each result (Transcript.alternatives)
    # which output layer beam search with an LM decodes; auto: phones when the model has a phone output layer and the
    # LM a phone lexicon. Greedy decoding and grammars always use the characters.
    units: str = "auto"
    segmentation: SegmentOptions = SegmentOptions()  # where recordings are cut into the segments decoded one by one
    lstm: bool = True  # rescore beam search's finals with the LM folder's LSTM LM, when it has one (False: off)
    punctuate: bool = True  # transcribe() adds the words cased and punctuated (Transcript.formatted_words)
    punctuation_model: str | None = None  # the punctuation model file; None = the bundled one

    def __post_init__(self) -> None:
        for name in ("chunk_frames", "lookahead_frames"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        if self.grammar is not None:
            Grammar.parse(self.grammar)  # GrammarError (a ValueError) for an empty or unspellable grammar
            object.__setattr__(self, "grammar", tuple(self.grammar))
        self.request  # noqa: B018 - RequestOptions checks hotwords, grammar, alternatives and the flags
        if self.units not in UNIT_CHOICES:
            raise ValueError(f"units must be one of {UNIT_CHOICES}, got {self.units!r}")

    @property
    def request(self) -> RequestOptions:
        """The recogniser's own request settings: what a request that leaves a setting None gets."""
        return RequestOptions(tuple(self.hotwords) or None, self.grammar, self.alternatives, self.lstm, self.punctuate)


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
        self.units = self._units(options)
        if self.units == "phones":
            self.language_model = self.language_model.for_units("phones")
        # with phones the model computes both output layers: grammars and greedy decoding read the characters
        self.head = "both" if self.units == "phones" else "chars"
        self.beam_vocabulary = bundle.phone_vocabulary if self.units == "phones" else self.vocabulary
        self.layout = OutputLayout(len(self.vocabulary), phones=self.head == "both")
        base = self.language_model.settings if self.language_model else DecoderSettings()
        self.grammar_settings = DecoderSettings.from_dict({**base.to_dict(), **options.settings})  # beam size etc.
        self.decoder_settings = self.grammar_settings if self.decoder_name == "beam" else None
        self.grammar = self.parse_grammar(options.grammar) if options.grammar is not None else None
        self.neural_lm = self._neural_lm(options)
        self._local = threading.local()
        self._templates: collections.OrderedDict[object, BeamSearchDecoder] = collections.OrderedDict()
        self._templates_lock = threading.Lock()
        if self.grammar is not None:
            self.stream_decoder(grammar=self.grammar)
        elif self.decoder_name == "beam":
            self.stream_decoder(options.hotwords)  # load now so that a bad LM fails here, not mid-batch

    @property
    def punctuator(self) -> Punctuator:
        """The punctuation model (``options.punctuation_model``, else the bundled one), loaded on first use.

        Raises ``PunctuatorError`` when its file is missing or not a punctuation model."""
        return load_punctuator(self.options.punctuation_model)

    def _language_model(self, options: DecodeOptions) -> LanguageModel | None:
        if options.lm == "none":
            return None
        if options.lm:
            return LanguageModel.load(options.lm)
        # the bundled model, or one adapted from it (`asr adapt`), decodes with the bundled LM
        adapted_from_bundled = bool(self.bundle.metadata.get("adapted_from", {}).get("bundled"))
        bundled = adapted_from_bundled or Path(self.bundle.metadata.get("source_path", "")) == BUNDLED_MODEL.resolve()
        if options.decoder != "greedy" and bundled and (BUNDLED_LM / "decoder.json").is_file():
            return LanguageModel.load(BUNDLED_LM)
        return None

    def _neural_lm(self, options: DecodeOptions) -> NeuralLM | None:
        """The LM folder's LSTM LM, when it has one, beam search decodes with it, and ``options.lstm`` and a positive
        ``lstm_weight`` ask for it."""
        lm = self.language_model
        if not options.lstm or self.decoder_name != "beam" or lm is None or lm.lstm_file is None:
            return None
        if self.decoder_settings.lstm_weight == 0:
            return None
        try:
            return NeuralLM.load(lm.lstm_file)
        except NeuralLMError as error:
            raise LanguageModelError(f"cannot load language model {lm.folder}: {error}") from error

    def _units(self, options: DecodeOptions) -> str:
        can = self.bundle.phone_vocabulary is not None and self.language_model is not None and self.language_model.has_phones
        if options.units == "phones" and not can:
            reason = "the model has no phone output layer" if self.bundle.phone_vocabulary is None else "the LM has no phone lexicon"
            raise ValueError(f"cannot decode phones: {reason}")
        if options.units == "phones" and self.decoder_name != "beam":
            raise ValueError("phones are decoded by beam search with a language model, not by the greedy decoder")
        return "phones" if options.units != "chars" and can and self.decoder_name == "beam" else "chars"

    def select(self, log_probs: torch.Tensor, phones: bool) -> torch.Tensor:
        """The characters' or the phones' part of log-probs (frames, vocab) computed by this recogniser's ``head``."""
        return self.layout.select(log_probs, phones)

    def parse_grammar(self, phrases: GrammarLike) -> Grammar:
        """A grammar checked against this model's characters (GrammarError, a ValueError, if unusable)."""
        return phrases if isinstance(phrases, Grammar) else Grammar.parse(phrases, self.vocabulary.tokens)

    def resolve(self, request: RequestOptions | None = None) -> Request:
        """A request with every setting decided: what ``request`` leaves None is the recogniser's own (the one place
        where that is worked out). A grammar is parsed against the model's characters (GrammarError if unusable)."""
        request = request or RequestOptions()
        own = self.options
        if request.grammar is not None:
            grammar = self.parse_grammar(request.grammar)
        else:
            grammar = self.grammar
        return Request(
            hotwords=own.hotwords if request.hotwords is None else request.hotwords,
            grammar=grammar,
            alternatives=own.alternatives if request.alternatives is None else request.alternatives,
            lstm=True if request.lstm is None else request.lstm,
            punctuate=own.punctuate if request.punctuate is None else request.punctuate,
        )

    def beam_decoder(self, request: Request) -> BeamSearchDecoder:
        """A decoder for the calling thread to decode whole utterances with (flashlight decoders keep search state)."""
        decoders = self._local.__dict__.setdefault("decoders", collections.OrderedDict())
        key = request.grammar if request.grammar is not None else request.hotwords
        decoder = decoders.pop(key, None)
        if decoder is None:
            decoder = self._search_for(request)
        decoders[key] = decoder
        while len(decoders) > MAX_HOTWORD_LISTS:
            decoders.popitem(last=False)
        return decoder

    def _search_for(self, request: Request) -> BeamSearchDecoder | None:
        """A beam search of its own for ``request``: over its grammar, or with its hotwords; None for greedy decoding."""
        if request.grammar is not None:
            return self.stream_decoder(grammar=request.grammar)
        if self.decoder_name == "beam":
            return self.stream_decoder(request.hotwords, lstm=request.lstm)
        return None

    def segment_search(self, request: Request) -> SegmentSearch:
        """How one stream of ``request`` decodes its segments (a search of its own, or greedy)."""
        search = self._search_for(request)
        phones = search is not None and request.grammar is None and self.units == "phones"
        return SegmentSearch(search, self.vocabulary, self.layout, self.frame_shift, phones, request.alternatives)

    def stream_decoder(
        self, hotwords: tuple[str, ...] | list[str] = (), grammar: Grammar | None = None, lstm: bool = True
    ) -> BeamSearchDecoder:
        """A decoder with its own search state for one stream, from any thread; ``lstm=False``: without LSTM rescoring.

        The lexicon trie and LM behind it are built once per hotword list (seconds) or grammar and shared by all its
        streams; the most recently used ``MAX_HOTWORD_LISTS`` lists and grammars are kept.
        """
        key = grammar if grammar is not None else tuple(hotwords)
        with self._templates_lock:  # a second stream with the same list waits for the first build instead of repeating it
            template = self._templates.pop(key, None)
            if template is None and grammar is not None:
                template = BeamSearchDecoder(self.vocabulary, None, self.grammar_settings, grammar=grammar)
            elif template is None:
                chars = self.vocabulary if self.units == "phones" else None  # reranks the phone search's finals
                template = BeamSearchDecoder(
                    self.beam_vocabulary, self.language_model, self.decoder_settings, key, char_vocabulary=chars, neural_lm=self.neural_lm
                )
            self._templates[key] = template
            while len(self._templates) > MAX_HOTWORD_LISTS:
                self._templates.popitem(last=False)
        return template.fork(rescore=lstm)

    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE

    def new_encoder(self, segmentation: SegmentOptions | None = None) -> ChunkedEncoder:
        """An encoder for one stream of audio, cutting segments at ``segmentation``'s pauses (default: the options')."""
        segmentation = segmentation or self.options.segmentation
        return ChunkedEncoder(
            self.model, self.device, self.frame_shift, pause_seconds=segmentation.endpoint_silence, head=self.head,
            max_segment=segmentation.max_segment,
        )  # fmt: skip

    @torch.inference_mode()
    def log_probs(self, blocks: Iterable[np.ndarray]) -> torch.Tensor:
        """Encode 16 kHz audio blocks (any sizes) into log-probabilities (frames, vocab) of ``head`` (see ``select``).

        All frames of the recording at once: for short recordings (tuning, benchmarks); ``transcribe`` decodes long ones
        segment by segment.
        """
        features = StreamingFeatures(self.extractor)
        encoder = self.new_encoder()
        outputs = [encoder.accept(features.accept(block)) for block in blocks]
        outputs.append(encoder.flush())
        return torch.cat(outputs)

    @torch.inference_mode()
    def segmented_log_probs(self, blocks: Iterable[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """``log_probs`` of a short recording and the (start, end) frames of the segments ``transcribe`` decodes one by one
        (for tuning: each segment of those frames decoded alone is what ``transcribe`` gives)."""
        features = StreamingFeatures(self.extractor)
        encoder = self.new_encoder()
        decoder = SegmentDecoder(self.segment_search(self.resolve()), encoder, self.options.segmentation, record_spans=True)
        outputs = []
        for block in blocks:
            outputs.append(encoder.accept(features.accept(block)))
            decoder.add(outputs[-1])
        outputs.append(encoder.flush())
        decoder.add(outputs[-1])
        decoder.finish()
        return torch.cat(outputs), decoder.spans

    def decode(self, log_probs: torch.Tensor, request: RequestOptions | None = None, **settings) -> Transcript:
        """log_probs (frames, vocab) from ``log_probs`` -> Transcript with the configured decoder, or over a grammar.

        ``request``, or its fields as keywords (``hotwords``, ``grammar``, ``alternatives``, ...), defaults to the
        recogniser's own. A grammar always decodes with beam search over its phrases, whatever the decoder. N-best
        ``alternatives`` come from beam search; the greedy decoder considers one hypothesis: its only alternative has
        confidence 1.
        """
        request = self.resolve(_request(request, settings))
        alternatives = request.alternatives
        if request.grammar is not None:
            return self.beam_decoder(request).decode(self.select(log_probs, False), self.frame_shift, alternatives=alternatives)
        if self.decoder_name == "greedy":
            transcript = greedy_decode(self.select(log_probs, False), self.vocabulary, self.frame_shift)
            if alternatives:
                transcript.alternatives = [Alternative(transcript.text, 1.0, list(transcript.words))]
            return transcript
        decoder = self.beam_decoder(request)
        if self.units == "phones":
            chars = self.select(log_probs, False)
            return decoder.decode(self.select(log_probs, True), self.frame_shift, alternatives=alternatives, char_log_probs=chars)
        return decoder.decode(log_probs, self.frame_shift, alternatives=alternatives)

    def transcribe(
        self,
        audio: AudioSource | np.ndarray,
        sample_rate: int | None = None,
        progress: Callable[[float], None] | None = None,
        request: RequestOptions | None = None,
        **settings,
    ) -> Transcript:
        """Transcribe a path, encoded bytes, or an array (samples,)/(samples, channels) at ``sample_rate``.

        The recording is read block by block and decoded segment by segment (``asr.segmenter``), exactly as streaming
        recognition decodes it, so memory follows the longest segment, not the recording.
        ``request`` (``RequestOptions``), or its fields as keywords, defaults to the recogniser's own:
        ``hotwords`` (words or phrases to favour in beam search), ``grammar`` (phrases, and optionally "[unk]", that
        the output is restricted to), ``alternatives`` (N-best entries in ``Transcript.alternatives``), ``lstm``,
        ``punctuate`` (also the words cased and punctuated in ``Transcript.formatted_words``; ``text`` stays as
        recognised).
        ``progress``: called with the seconds of audio done so far, after each block.
        """
        resolved = self.resolve(_request(request, settings))  # errors before the audio is read
        punctuator = self.punctuator if resolved.punctuate else None
        if isinstance(audio, np.ndarray | torch.Tensor):
            signal = prepare_array(np.asarray(audio), sample_rate)
            step = READ_BLOCK_SECONDS * SAMPLE_RATE
            blocks: Iterable[np.ndarray] = (signal[i : i + step] for i in range(0, len(signal), step))
        else:
            blocks = iter_audio(audio)
        segments, seconds = self._decode_segments(blocks, resolved, progress)
        transcript = join_segments(segments, round(seconds, 3), resolved.alternatives)
        return transcript if punctuator is None else punctuator.punctuate_transcript(transcript)

    @torch.inference_mode()
    def _decode_segments(
        self, blocks: Iterable[np.ndarray], request: Request, progress: Callable[[float], None] | None
    ) -> tuple[list[Segment], float]:
        """16 kHz blocks -> (the recording's segments with words, its duration in seconds)."""
        features = StreamingFeatures(self.extractor)
        encoder = self.new_encoder()
        decoder = SegmentDecoder(self.segment_search(request), encoder, self.options.segmentation)
        segments: list[Segment] = []
        samples = 0
        for block in blocks:
            samples += len(block)
            segments += decoder.add(encoder.accept(features.accept(block)))
            if progress is not None:
                progress(samples / SAMPLE_RATE)
        segments += decoder.add(encoder.flush())
        segments += decoder.finish()
        return segments, samples / SAMPLE_RATE


def _request(request: RequestOptions | None, settings: dict) -> RequestOptions:
    """A request given whole, or as keywords (``hotwords=...``), not both."""
    if request is not None and settings:
        raise ValueError("give a RequestOptions or its settings as keywords, not both")
    return request if request is not None else RequestOptions(**settings)


def load_model(path: str | os.PathLike | None = None, device: str | None = None, options: DecodeOptions = DecodeOptions()) -> Recognizer:
    """Load a model file (default: the bundled English model) as a ``Recognizer``."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = Path(path or BUNDLED_MODEL)
    bundle = load_model_file(path, device)
    bundle.metadata["source_path"] = str(path.resolve())
    return Recognizer(bundle, options)
