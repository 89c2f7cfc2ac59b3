import os
from collections import Counter

import numpy as np
import pytest

import asr
from asr.audio import SAMPLE_RATE, load_audio
from streaming.recognizer import Final, Partial, RecognitionStream, StreamOptions
from tests.conftest import CLIPS, DATA, quiet_noise


@pytest.fixture(scope="module")
def recognizer(tiny_model):
    return asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="greedy"))


def silence(seconds: float, seed: int = 3) -> np.ndarray:
    return quiet_noise(seconds, seed)


def conversation() -> np.ndarray:
    first, second = (load_audio(DATA / name) for name in CLIPS)
    return np.concatenate([silence(0.3), first, silence(1.2), second, silence(0.3)])


def run(recognizer, audio: np.ndarray, piece_seconds: float, **options) -> list:
    stream = RecognitionStream(recognizer, SAMPLE_RATE, StreamOptions(**options))
    step = max(1, int(piece_seconds * SAMPLE_RATE))
    events = []
    for start in range(0, len(audio), step):
        events += stream.accept(audio[start : start + step])
    return events + stream.finish()


def finals(events) -> list[Final]:
    return [e for e in events if isinstance(e, Final)]


def test_endpoint_on_inserted_silence(recognizer):
    events = run(recognizer, conversation(), 0.1)
    result = finals(events)
    assert [f.text for f in result] == list(CLIPS.values())
    assert [f.segment for f in result] == [0, 1]
    first_end = 0.3 + len(load_audio(DATA / "how_much_was_it.opus")) / SAMPLE_RATE
    assert result[0].words[-1].end <= first_end + 0.1 < result[1].words[0].start
    assert all(0.3 - 0.1 <= w.start for w in result[0].words)  # times count from the stream start
    partials = [e for e in events if isinstance(e, Partial)]
    assert partials and partials[-1].segment == 1


def test_the_final_comes_when_the_pause_completes(recognizer):
    # no wait for the lookahead: the segment's last frames run as soon as endpoint_silence of quiet has arrived
    audio = conversation()
    stream = RecognitionStream(recognizer, SAMPLE_RATE)
    step = SAMPLE_RATE // 100
    arrived = None
    for start in range(0, len(audio), step):
        if finals(stream.accept(audio[start : start + step])):
            arrived = stream.seconds_received
            break
    speech_end = 0.3 + len(load_audio(DATA / "how_much_was_it.opus")) / SAMPLE_RATE
    lookahead = recognizer.model.config.lookahead_frames * recognizer.frame_shift
    assert arrived is not None and arrived <= speech_end + StreamOptions().endpoint_silence + 0.05 < speech_end + 0.6 + lookahead


@pytest.mark.parametrize("piece_seconds", [0.01, 0.37, 4.0])
def test_any_piece_size_gives_the_same_result(recognizer, piece_seconds):
    reference = [(f.text, f.start, f.end, f.words) for f in finals(run(recognizer, conversation(), 0.1))]
    assert [(f.text, f.start, f.end, f.words) for f in finals(run(recognizer, conversation(), piece_seconds))] == reference


def test_streaming_equals_offline_chunked_recognition(recognizer):
    audio = conversation()
    offline = recognizer.transcribe(audio, SAMPLE_RATE)
    streamed = finals(run(recognizer, audio, 0.25))
    assert " ".join(f.text for f in streamed) == offline.text
    assert [w for f in streamed for w in f.words] == offline.words


def test_finish_flushes_the_tail(recognizer):
    # no trailing silence: the last words only come out at finish()
    audio = load_audio(DATA / "does_that_look_good.opus")
    stream = RecognitionStream(recognizer, SAMPLE_RATE)
    before = finals(stream.accept(audio))
    after = stream.finish()
    assert before == [] and [f.text for f in finals(after)] == ["does that look good"]
    assert stream.finish() == []
    with pytest.raises(RuntimeError):
        stream.accept(audio)


@pytest.mark.parametrize("rate", [8000, 44100])
def test_other_sample_rates_and_int16(recognizer, rate):
    import soxr

    audio = (soxr.resample(conversation(), SAMPLE_RATE, rate) * 32767).astype(np.int16)
    stream = RecognitionStream(recognizer, rate)
    events = []
    for start in range(0, len(audio), rate // 10):
        events += stream.accept(audio[start : start + rate // 10])
    events += stream.finish()
    texts = [f.text for f in finals(events)]
    assert " ".join(texts) == recognizer.transcribe(audio.astype(np.float32) / 32768, rate).text
    if rate > SAMPLE_RATE:  # the same content; 8 kHz loses the upper band the tiny model relies on
        assert texts == list(CLIPS.values())


def test_blank_output_ends_a_segment_where_the_audio_never_pauses(recognizer):
    first, second = (load_audio(DATA / name) for name in CLIPS)
    audio = np.concatenate([silence(0.3), first, silence(2.0), second, silence(2.0)])
    # endpoint_silence longer than any gap: only the blank-output rule can end the first segment
    result = finals(run(recognizer, audio, 0.1, endpoint_silence=3.0, blank_endpoint=1.2))
    assert [f.text for f in result] == list(CLIPS.values())
    assert result[0].end < 0.3 + len(first) / SAMPLE_RATE + 2.0


def test_max_segment_length_forces_a_final(recognizer):
    events = run(recognizer, conversation(), 0.5, endpoint_silence=5.0, blank_endpoint=5.0, max_segment=6.0)
    assert [f.text for f in finals(events)] == [" ".join(CLIPS.values())]
    long = np.concatenate([conversation()] * 3)
    result = finals(run(recognizer, long, 0.5, endpoint_silence=5.0, blank_endpoint=5.0, max_segment=6.0))
    assert len(result) >= 2 and all(f.end - f.start <= 6.0 + 1e-6 for f in result)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_an_hour_of_audio_streams_in_bounded_memory(tiny_model):
    recognizer = asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="greedy"))
    minutes = int(os.environ.get("STREAM_TEST_MINUTES", "60"))
    speech = conversation()
    stream = RecognitionStream(recognizer, SAMPLE_RATE)
    block = np.concatenate([speech, silence(60 - len(speech) / SAMPLE_RATE)])  # one minute
    texts = []
    for minute in range(minutes):
        for start in range(0, len(block), 2 * SAMPLE_RATE):
            texts += [f.text for f in finals(stream.accept(block[start : start + 2 * SAMPLE_RATE]))]
        if minute == min(5, minutes - 1):
            baseline = _resident_bytes()
    growth = _resident_bytes() - baseline
    texts += [f.text for f in finals(stream.finish())]
    counts = Counter(texts)
    assert counts["how much was it"] == counts["does that look good"] == minutes, counts
    assert growth < 20_000_000, f"resident memory grew by {growth / 1e6:.1f} MB over 55 minutes of audio"
    assert abs(stream.seconds_received - 60 * minutes) < 1


def write_unigram_lm(folder, words: list[str]):
    """A tiny KenLM-readable language model (unigrams plus one bigram) and its lexicon."""
    import json

    from asr.lm import DecoderSettings, spell

    unigrams = "".join(f"-1.0\t{w}\t0\n" for w in words)
    arpa = (
        f"\\data\\\nngram 1={len(words) + 3}\nngram 2=1\n\n\\1-grams:\n-1.0\t<unk>\t0\n0\t<s>\t0\n-1.0\t</s>\t0\n{unigrams}\n"
        "\\2-grams:\n-0.5\t<s> how\n\n\\end\\\n"
    )
    (folder / "lm.arpa").write_text(arpa)
    (folder / "lexicon.txt").write_text("".join(f"{w}\t{spell(w)}\n" for w in words))
    (folder / "decoder.json").write_text(json.dumps({**DecoderSettings().to_dict(), "lm": "lm.arpa", "lexicon": "lexicon.txt"}))
    return folder


def test_beam_search_with_a_language_model_streams(tiny_model, tmp_path):
    words = sorted({w for text in CLIPS.values() for w in text.split()} | {"cat", "hat"})
    write_unigram_lm(tmp_path, words)
    recognizer = asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="beam", lm=str(tmp_path)))
    first = load_audio(DATA / "how_much_was_it.opus")
    audio = np.concatenate([silence(0.3), first, silence(1.2), first, silence(0.3)])
    events = run(recognizer, audio, 0.2)
    result = finals(events)
    assert len(result) == 2 and result[0].text == "how much was it"
    assert result[1].text.startswith("how much")  # (the tiny model is unsure of the second "it")
    assert all(w.start < w.end for f in result for w in f.words)
    assert " ".join(f.text for f in result) == recognizer.transcribe(audio, SAMPLE_RATE).text


def test_concurrent_beam_search_streams_do_not_mix(tiny_model, tmp_path):
    # one thread (as in the server's worker) feeding several streams in turn: each keeps its own search state
    words = sorted({w for text in CLIPS.values() for w in text.split()})
    write_unigram_lm(tmp_path, words)
    recognizer = asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="beam", lm=str(tmp_path)))
    first, second = (load_audio(DATA / name) for name in CLIPS)
    audios = [np.concatenate([silence(0.3), first, silence(1.0)]), np.concatenate([silence(0.5), second, silence(1.0)])]
    alone = [[f.text for f in finals(run(recognizer, audio, 0.1))] for audio in audios]
    assert alone == [["how much was it"], ["does that look good"]]
    streams = [RecognitionStream(recognizer, SAMPLE_RATE) for _ in audios]
    events: list[list] = [[], []]
    step = SAMPLE_RATE // 10
    for start in range(0, max(len(a) for a in audios), step):
        for i, (stream, audio) in enumerate(zip(streams, audios)):
            if start < len(audio):
                events[i] += stream.accept(audio[start : start + step])
    together = [[f.text for f in finals(e + s.finish())] for e, s in zip(events, streams)]
    assert together == alone


def test_beam_search_in_several_threads_shares_the_lexicon_safely(tiny_model, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    write_unigram_lm(tmp_path, sorted({w for text in CLIPS.values() for w in text.split()}))
    recognizer = asr.load_model(tiny_model, "cpu", asr.DecodeOptions(decoder="beam", lm=str(tmp_path)))
    audios = [load_audio(DATA / name) for name in CLIPS] * 4
    alone = [recognizer.transcribe(a, SAMPLE_RATE).text for a in audios]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda a: recognizer.transcribe(a, SAMPLE_RATE).text, audios)) == alone


def test_committed_words_of_partials_never_change(recognizer):
    events = run(recognizer, np.concatenate([conversation()] * 2), 0.05)
    previous: dict[int, Partial] = {}
    checked = 0
    for event in events:
        if isinstance(event, Partial):
            before = previous.get(event.segment)
            if before is not None:
                assert event.committed >= before.committed
                assert event.text.split()[: before.committed] == before.text.split()[: before.committed]
                checked += before.committed
            previous[event.segment] = event
    assert checked > 0


def test_batched_encoding_across_streams_equals_each_stream_alone(recognizer):
    from asr.encoder import encode_ready_chunks

    audios = [conversation(), conversation()[8000:], np.concatenate([silence(0.7), conversation()])]
    alone = [finals(run(recognizer, a, 0.3)) for a in audios]
    streams = [RecognitionStream(recognizer, SAMPLE_RATE) for _ in audios]
    events = [[] for _ in audios]
    step = 4800
    for start in range(0, max(len(a) for a in audios), step):
        for stream, audio in zip(streams, audios):
            if start < len(audio):
                stream.feed(audio[start : start + step])
        for i, frames in enumerate(encode_ready_chunks([s.encoder for s in streams])):
            events[i] += streams[i].process(frames)
    for i, stream in enumerate(streams):
        events[i] += stream.finish()
    for got, expected in zip(events, alone):
        assert [(f.text, f.start, f.end) for f in finals(got)] == [(f.text, f.start, f.end) for f in expected]
