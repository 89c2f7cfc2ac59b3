"""Speech recognition with a latency-controlled bidirectional LSTM trained with CTC.

>>> import asr
>>> recognizer = asr.load_model()            # the bundled English model
>>> result = recognizer.transcribe("talk.wav")
>>> result.text, result.words[0].start
>>> result.formatted_text                    # cased and punctuated
>>> asr.punctuate("hello how are you")       # any text, one paragraph a line
"""

from .audio import SAMPLE_RATE, AudioError, load_audio
from .checkpoint import CheckpointError
from .decoding import Alternative, Transcript, Word
from .grammar import GrammarError
from .punctuation import Punctuator, PunctuatorError, punctuate
from .recognizer import BUNDLED_MODEL, DecodeOptions, Recognizer, load_model
from .request import RequestOptions

__version__ = "0.1.0"
__all__ = [
    "Alternative",
    "BUNDLED_MODEL",
    "SAMPLE_RATE",
    "AudioError",
    "CheckpointError",
    "DecodeOptions",
    "GrammarError",
    "Punctuator",
    "PunctuatorError",
    "Recognizer",
    "RequestOptions",
    "Transcript",
    "Word",
    "load_audio",
    "load_model",
    "punctuate",
]
