"""Long recordings: offline decoding by segments, in bounded memory, identical to streaming."""

import json
import os
import pty
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import asr
from asr.audio import SAMPLE_RATE, load_audio
from asr.decoding import Alternative
from asr.lm import BeamSearchDecoder
from asr.segmenter import SegmentOptions, combine_alternatives
from streaming.recognizer import Final, RecognitionStream, StreamOptions
from tests.conftest import CLIPS, DATA, quiet_noise
from tests.test_streaming import write_unigram_lm

ROOT = DATA.parent.parent
SEGMENTS = 10


def clips() -> list[np.ndarray]:
    return [load_audio(DATA / name) for name in CLIPS]


def talk(count: int = SEGMENTS, pause: float = 1.0) -> tuple[np.ndarray, list[str]]:
    """The two clips in turn, ``count`` utterances, each after a quiet pause: (audio, the utterances' texts)."""
    audio, texts = [], []
    for i in range(count):
        audio += [quiet_noise(pause, i), clips()[i % 2]]
        texts.append(list(CLIPS.values())[i % 2])
    return np.concatenate([*audio, quiet_noise(0.5, 99)]), texts


@pytest.fixture
def beam_recognizer(tiny_model, tmp_path):
    write_unigram_lm(tmp_path, sorted({w for text in CLIPS.values() for w in text.split()}))
    return asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="beam", lm=str(tmp_path), alternatives=2))


class SearchSpy:
    """Counts beam searches (begin ... final best) and the frames each one was fed."""

    def __init__(self, monkeypatch) -> None:
        self.fed: dict[int, int] = {}  # id(search) -> frames fed since its begin
        self.finals: list[int] = []  # frames of each final result's search
        begin, step, best = BeamSearchDecoder.begin, BeamSearchDecoder.step, BeamSearchDecoder.best
        spy = self

        def spied_begin(decoder):
            spy.fed[id(decoder)] = 0
            return begin(decoder)

        def spied_step(decoder, log_probs):
            spy.fed[id(decoder)] += log_probs.shape[0]
            return step(decoder, log_probs)

        def spied_best(decoder, emissions, *args, **kwargs):
            final = args[2] if len(args) > 2 else kwargs.get("final", False)
            if final:
                assert emissions.shape[0] == spy.fed[id(decoder)]
                spy.finals.append(emissions.shape[0])
            return best(decoder, emissions, *args, **kwargs)

        monkeypatch.setattr(BeamSearchDecoder, "begin", spied_begin)
        monkeypatch.setattr(BeamSearchDecoder, "step", spied_step)
        monkeypatch.setattr(BeamSearchDecoder, "best", spied_best)
        monkeypatch.setattr(BeamSearchDecoder, "decode", lambda *a, **k: pytest.fail("a whole-input search"))


def test_offline_beam_search_runs_once_per_segment_and_never_over_the_whole_input(beam_recognizer, monkeypatch):
    audio, texts = talk()
    spy = SearchSpy(monkeypatch)
    result = beam_recognizer.transcribe(audio, SAMPLE_RATE)
    assert [s.text for s in result.segments] == texts
    assert result.text == " ".join(texts)
    assert len(spy.finals) == SEGMENTS  # one final search per segment, none over the recording
    longest = max(len(c) for c in clips()) / SAMPLE_RATE + 1.0 + 0.6 + 0.1  # a pause, a clip, the quiet that ends it
    assert max(spy.finals) * beam_recognizer.frame_shift <= longest
    assert sum(spy.finals) * beam_recognizer.frame_shift <= len(audio) / SAMPLE_RATE
    # word times count from the start of the recording, in order
    starts = [w.start for w in result.words]
    assert starts == sorted(starts) and starts[-1] > len(audio) / SAMPLE_RATE - 2
    assert [s.start for s in result.segments] == sorted(s.start for s in result.segments)
    # N-best over the recording: the best combination first, confidences the products of the segments'
    assert result.alternatives[0].text == result.text
    assert result.alternatives[0].confidence == pytest.approx(np.prod([s.alternatives[0].confidence for s in result.segments]))


def test_offline_equals_streaming_for_every_decoder_on_a_long_recording(tiny_model, tmp_path):
    write_unigram_lm(tmp_path, sorted({w for text in CLIPS.values() for w in text.split()}))
    audio, _ = talk(8, pause=0.8)
    audio = np.concatenate([audio, *clips() * 4])  # then speech that never pauses: cut at the maximum length
    segmentation = SegmentOptions(max_segment=4.0)
    decoders = [
        asr.DecodeOptions(decoder="greedy", segmentation=segmentation),
        asr.DecodeOptions(decoder="beam", lm=str(tmp_path), alternatives=3, segmentation=segmentation),
        asr.DecodeOptions(decoder="beam", lm=str(tmp_path), hotwords=("cat",), segmentation=segmentation),
        asr.DecodeOptions(grammar=("how much was it", "does that look good", "[unk]"), segmentation=segmentation),
    ]
    for options in decoders:
        recognizer = asr.load_model(tiny_model, "cpu", options)
        offline = recognizer.transcribe(audio, SAMPLE_RATE)
        stream = RecognitionStream(recognizer, SAMPLE_RATE, StreamOptions(max_segment=4.0))
        events = [e for start in range(0, len(audio), 3200) for e in stream.accept(audio[start : start + 3200])]
        finals = [e for e in events + stream.finish() if isinstance(e, Final)]
        assert [(f.text, f.start, f.end, f.words, f.alternatives) for f in finals] == [
            (s.text, s.start, s.end, s.words, s.alternatives) for s in offline.segments
        ], options
        assert len(finals) >= 9 and all(f.end - f.start <= 4.0 + 1e-6 for f in finals)


def test_speech_that_never_pauses_is_cut_between_words(tiny_model):
    audio = np.concatenate(clips() * 6)  # 10 s of clips back to back: no pause for the energy rule
    whole = asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="greedy")).transcribe(audio, SAMPLE_RATE)
    assert len(whole.segments) == 1
    options = asr.DecodeOptions(decoder="greedy", segmentation=SegmentOptions(max_segment=3.0))
    cut = asr.load_model(tiny_model, "cpu", options).transcribe(audio, SAMPLE_RATE)
    assert len(cut.segments) >= 4 and all(s.end - s.start <= 3.0 + 1e-6 for s in cut.segments)
    # no word was cut in two: the same characters, and every word one the uncut transcript has (or two it glued)
    assert "".join(w.text for w in cut.words) == "".join(w.text for w in whole.words)
    known = {w.text for w in whole.words} | {w for text in CLIPS.values() for w in text.split()}
    assert all(w.text in known for w in cut.words), [w.text for w in cut.words]


def test_a_model_without_chunks_runs_once_per_segment(tiny_model, monkeypatch):
    recognizer = asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="greedy", chunk_frames=0))
    audio, texts = talk(6)
    calls = []
    forward = type(recognizer.model).forward

    def spied_forward(model, features, *args, **kwargs):
        calls.append(features.shape[1])
        return forward(model, features, *args, **kwargs)

    monkeypatch.setattr(type(recognizer.model), "forward", spied_forward)
    result = recognizer.transcribe(audio, SAMPLE_RATE)
    assert len(calls) >= 6 and max(calls) * 0.01 < 2.5  # 10 ms feature frames: one segment per call
    assert len(result.segments) == 6 and result.words[-1].end > len(audio) / SAMPLE_RATE - 2
    # without pauses, at most the maximum length at once
    calls.clear()
    recognizer.transcribe(np.concatenate(clips() * 30), SAMPLE_RATE)
    assert len(calls) >= 2 and max(calls) * 0.01 <= SegmentOptions().max_segment


def test_combined_alternatives_are_the_k_best_products():
    def alts(*confidences):
        return [Alternative(f"w{c}", c, []) for c in confidences]

    combined = combine_alternatives([alts(0.6, 0.3, 0.1), alts(0.9, 0.1), alts(0.5, 0.5)], 5)
    products = sorted((a * b * c for a in (0.6, 0.3, 0.1) for b in (0.9, 0.1) for c in (0.5, 0.5)), reverse=True)
    assert [x.confidence for x in combined] == pytest.approx(products[:5])
    assert combined[0].text == "w0.6 w0.9 w0.5"
    assert combine_alternatives([], 3) == []


@pytest.mark.parametrize("kind", ["silence", "white noise"])
def test_minutes_of_silence_or_noise_finish_with_bounded_segments(tiny_model, monkeypatch, kind):
    recognizer = asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="greedy"))
    seconds = 240
    rng = np.random.default_rng(5)
    audio = quiet_noise(seconds) if kind == "silence" else (rng.standard_normal(seconds * SAMPLE_RATE) * 0.3).astype(np.float32)
    decoded = []
    greedy = asr.segmenter.greedy_decode
    monkeypatch.setattr(asr.segmenter, "greedy_decode", lambda e, *a, **k: decoded.append(len(e)) or greedy(e, *a, **k))
    result = recognizer.transcribe(audio, SAMPLE_RATE)
    assert result.duration == seconds
    assert max(decoded) * recognizer.frame_shift <= SegmentOptions().max_segment
    if kind == "silence":
        assert result.text == "" and result.segments == []
    assert all(s.end - s.start <= SegmentOptions().max_segment + 1e-6 for s in result.segments)


def test_a_file_that_ends_mid_word(tiny_model, tmp_path):
    audio = np.concatenate([quiet_noise(0.5), clips()[1]])
    cut = audio[: int(len(audio) - 0.3 * SAMPLE_RATE)]  # "does that lo..."
    sf.write(tmp_path / "cut.wav", cut, SAMPLE_RATE)
    result = asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="greedy")).transcribe(tmp_path / "cut.wav")
    assert result.text.startswith("does that") and result.words[-1].end <= len(cut) / SAMPLE_RATE + 0.02


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asr", *args], capture_output=True, cwd=ROOT, **kwargs)


def test_stdin_of_unknown_length_is_streamed_to_disk(tiny_model):
    """A WAV on a pipe, whose header gives no length (as ffmpeg and sox write one), of several minutes."""
    audio, texts = talk(4)
    audio = np.concatenate([audio, quiet_noise(180)])
    pcm = (audio * 32767).astype("<i2").tobytes()
    header = b"RIFF" + b"\xff\xff\xff\xff" + b"WAVEfmt " + (16).to_bytes(4, "little") + (1).to_bytes(2, "little")
    header += (1).to_bytes(2, "little") + SAMPLE_RATE.to_bytes(4, "little") + (2 * SAMPLE_RATE).to_bytes(4, "little")
    header += (2).to_bytes(2, "little") + (16).to_bytes(2, "little") + b"data" + b"\xff\xff\xff\xff"
    done = _cli("transcribe", "-", "-m", str(tiny_model), "--decoder", "greedy", "-f", "json", input=header + pcm)
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout)
    assert result["text"] == " ".join(texts) and [s["text"] for s in result["segments"]] == texts
    assert result["duration"] == pytest.approx(len(audio) / SAMPLE_RATE, abs=0.01)


def test_progress_on_a_terminal_and_none_when_piped(tiny_model, tmp_path):
    audio, texts = talk(2)
    sf.write(tmp_path / "long.wav", np.concatenate([audio, quiet_noise(70)]), SAMPLE_RATE)
    args = ("transcribe", str(tmp_path / "long.wav"), "-m", str(tiny_model), "--decoder", "greedy", "--no-punctuate")
    piped = _cli(*args)
    assert piped.returncode == 0 and piped.stdout.decode().strip() == " ".join(texts)
    assert piped.stderr == b""
    controller, terminal = pty.openpty()
    done = subprocess.run([sys.executable, "-m", "asr", *args], stdout=subprocess.PIPE, stderr=terminal, cwd=ROOT)
    os.close(terminal)
    shown = b""
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:
            break
        if not data:
            break
        shown += data
    os.close(controller)
    assert done.returncode == 0 and done.stdout.decode().strip() == " ".join(texts)
    assert b"audio transcribed: 0:00:30 / 0:01:1" in shown and b"(100 %)" in shown, shown[-500:]


def test_long_recording_benchmark_writes_whole_utterances(tmp_path):
    from training.long_bench import write_recording

    files = [DATA / name for name in CLIPS]
    count = write_recording(files, 0.05, tmp_path / "long.wav", seed=1)
    written = sf.read(tmp_path / "long.wav")[0]
    speech = sum(len(load_audio(files[i % 2])) for i in range(count))
    assert count >= 2 and len(written) >= 3 * SAMPLE_RATE
    assert speech + count * 0.3 * SAMPLE_RATE <= len(written) <= speech + count * 1.2 * SAMPLE_RATE
    assert torch.tensor(written).abs().max() > 0.1


def test_stream_memory_benchmark_streams_speech(tiny_model):
    from streaming.bench import hour_memory

    recognizer = asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="greedy"))
    report = hour_memory(recognizer, StreamOptions(), 1, [DATA / name for name in CLIPS])
    assert set(report) == {"rss_mb_after_1_min", "utterances", "finals", "peak_rss_mb"}
    # one final per pause of 0.6 s or more (shorter ones join two utterances in one segment)
    assert report["utterances"] >= 30 and report["utterances"] // 2 <= report["finals"] <= report["utterances"]


def test_segment_spans_decoded_alone_give_the_transcript(beam_recognizer):
    """What `asr tune-decoder` decodes: each segment's frames alone, as `transcribe` does."""
    audio, texts = talk(4)
    log_probs, spans = beam_recognizer.segmented_log_probs([audio])
    assert len(spans) >= 4 and spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    decoded = [beam_recognizer.decode(log_probs[a:b], alternatives=0).text for a, b in spans]
    assert " ".join(t for t in decoded if t) == beam_recognizer.transcribe(audio, SAMPLE_RATE).text == " ".join(texts)
