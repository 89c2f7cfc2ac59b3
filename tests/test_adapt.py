"""Speaker adaptation (`asr adapt`): LHUC folding, the data it accepts and refuses, the model file it writes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from asr.audio import SAMPLE_RATE, load_audio
from asr.checkpoint import load_model_file
from tests.conftest import CLIPS, DATA, quiet_noise
from training.adapt import (
    AdaptationError,
    AdaptOptions,
    InputTransform,
    Lhuc,
    adapt_model_file,
    collate_utterances,
    enrolment_pairs,
    prepare_utterances,
)

LOUD = 5.0  # gain of the "speaker": a level the tiny model never heard, which adaptation can learn


def write_speaker(folder, copies: int = 3, gain: float = LOUD, rate: int = SAMPLE_RATE):
    """A folder of the two clips said `copies` times (with different pauses), each with its .txt beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(copies):
        for k, (name, text) in enumerate(CLIPS.items()):
            audio = np.concatenate([quiet_noise(0.2 + 0.1 * i, i), load_audio(DATA / name), quiet_noise(0.3, i + k)]) * gain
            stem = folder / f"{i}-{name.removesuffix('.opus')}"
            if rate != SAMPLE_RATE:
                import soxr

                audio = soxr.resample(audio, SAMPLE_RATE, rate)
            sf.write(stem.with_suffix(".wav"), np.clip(audio, -1, 1), rate)
            stem.with_suffix(".txt").write_text(text.upper() + "\n")  # transcripts are normalised
    return folder


def check_folding(tiny_model, attach, perturb) -> None:
    """A module attached to the tiny model and perturbed, then folded: the outputs stay, and differ from the plain model's."""
    bundle = load_model_file(tiny_model)
    utterances, _ = prepare_utterances([(str(DATA / n), t) for n, t in CLIPS.items()], bundle)
    batch = collate_utterances(utterances)
    model = bundle.model.eval()
    module = attach(model)
    with torch.no_grad():
        perturb(module, torch.Generator().manual_seed(0))
        changed, _, _ = model(batch["features"], batch["lengths"])
    module.fold(model)
    with torch.no_grad():
        folded, _, _ = model(batch["features"], batch["lengths"])
        plain, _, _ = load_model_file(tiny_model).model.eval()(batch["features"], batch["lengths"])
    torch.testing.assert_close(folded, changed, rtol=1e-4, atol=1e-4)
    assert (folded - plain).abs().max() > 0.1  # the module did change the model


def test_lhuc_scales_fold_into_an_ordinary_model(tiny_model):
    check_folding(tiny_model, Lhuc, lambda lhuc, generator: lhuc.amounts.normal_(0, 1.0, generator=generator))


def test_the_input_transform_folds_into_the_first_layer(tiny_model):
    def perturb(transform, generator):
        transform.matrix.add_(0.2 * torch.randn(transform.matrix.shape, generator=generator))
        transform.shift.add_(0.5 * torch.randn(transform.shift.shape, generator=generator))

    check_folding(tiny_model, InputTransform, perturb)


@pytest.mark.parametrize("method", ["lhuc", "lin+lhuc", "bias"])
def test_the_same_enrolment_gives_the_same_model(tiny_model, tmp_path, method):
    speaker = write_speaker(tmp_path / "me")
    options = AdaptOptions(method, max_steps=6, check_every=3)
    first = adapt_model_file(tiny_model, [str(speaker)], tmp_path / "a.pt", options)
    second = adapt_model_file(tiny_model, [str(speaker)], tmp_path / "b.pt", options)
    assert first.steps == second.steps > 0 and first.held_out_loss_after < first.held_out_loss_before
    a, b = load_model_file(tmp_path / "a.pt").model.state_dict(), load_model_file(tmp_path / "b.pt").model.state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_adapting_to_a_loud_speaker(tiny_model, tmp_path):
    speaker = write_speaker(tmp_path / "me")
    output = tmp_path / "me.pt"
    report = adapt_model_file(tiny_model, [str(speaker)], output, AdaptOptions(max_steps=12, check_every=3))
    assert report.utterances == 6 and report.held_out == 2 and report.steps > 0
    assert report.held_out_loss_after < 0.8 * report.held_out_loss_before
    adapted = load_model_file(output)
    assert adapted.model.config == load_model_file(tiny_model).model.config  # an ordinary model of the same shape
    assert adapted.metadata["adapted_from"]["model"] == str(tiny_model) and not adapted.metadata["adapted_from"]["bundled"]
    assert adapted.metadata["adaptation"]["audio_seconds"] > 5 and adapted.metadata["adaptation"]["method"] == "lin+lhuc"


def test_a_model_with_a_phone_output_layer_adapts_it_too(tiny_model, tmp_path):
    from dataclasses import replace

    from asr.checkpoint import ModelBundle, save_model
    from asr.model import CTCModel
    from asr.phones import phone_vocabulary

    bundle, phones = load_model_file(tiny_model), phone_vocabulary()
    model = CTCModel(replace(bundle.model.config, phone_vocab_size=len(phones)))
    model.load_state_dict(bundle.model.state_dict(), strict=False)  # the tiny model plus a phone output layer
    save_model(ModelBundle(model, bundle.feature_config, bundle.vocabulary, {}, phones), tmp_path / "phones.pt")
    speaker = write_speaker(tmp_path / "me")
    utterances, _ = prepare_utterances(enrolment_pairs([str(speaker)]), load_model_file(tmp_path / "phones.pt"))
    batch = collate_utterances(utterances)
    words = [word.split() for word in "D AH Z|DH AE T|L UH K|G UH D".split("|")]
    assert [phones.tokens[i] for i in utterances[0].phone_targets] == [*words[0], " ", *words[1], " ", *words[2], " ", *words[3]]
    assert batch["phone_target_lengths"].tolist() == [len(u.phone_targets) for u in utterances]
    report = adapt_model_file(tmp_path / "phones.pt", [str(speaker)], tmp_path / "me.pt", AdaptOptions(max_steps=8, check_every=2))
    assert report.steps > 0 and report.held_out_loss_after < report.held_out_loss_before
    adapted = load_model_file(tmp_path / "me.pt").model
    assert not torch.equal(adapted.phone_output.weight, model.phone_output.weight)  # the last layer's scales fold into it


def test_the_command_and_what_it_refuses(tiny_model, tmp_path):
    def adapt(*args):
        return subprocess.run([sys.executable, "-m", "asr", "adapt", *args], capture_output=True, text=True, timeout=300)

    speaker = write_speaker(tmp_path / "me")
    sf.write(speaker / "silence.wav", np.zeros(SAMPLE_RATE), SAMPLE_RATE)
    (speaker / "silence.txt").write_text("how much was it")
    shutil.copy(speaker / "0-how_much_was_it.wav", speaker / "wrong.wav")
    (speaker / "wrong.txt").write_text("the quick brown fox jumps over the lazy dog")
    done = adapt(str(speaker), "-o", str(tmp_path / "me.pt"), "--model", str(tiny_model), "--max-steps", "9")
    assert done.returncode == 0, done.stderr
    assert "silence.wav: silent" in done.stderr and "wrong.wav: the transcript does not seem to match" in done.stderr
    assert json.loads(done.stdout)["utterances"] == 6

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(speaker / "0-how_much_was_it.wav", one / "a.wav")
    (one / "a.txt").write_text("how much was it")
    refused = adapt(str(one), "-o", str(tmp_path / "one.pt"), "--model", str(tiny_model))
    assert refused.returncode == 2 and "1 usable utterance(s)" in refused.stderr and not (tmp_path / "one.pt").exists()
    (one / "b.wav").write_bytes((one / "a.wav").read_bytes())
    missing = adapt(str(one), "-o", str(tmp_path / "one.pt"), "--model", str(tiny_model))
    assert missing.returncode == 2 and "no transcript" in missing.stderr and "b.wav" in missing.stderr
    not_a_model = adapt(str(speaker), "-o", str(tmp_path / "x.pt"), "--model", str(speaker / "wrong.txt"))
    assert not_a_model.returncode == 2 and "wrong.txt" in not_a_model.stderr and not (tmp_path / "x.pt").exists()


def test_audio_at_any_sample_rate(tiny_model, tmp_path):
    bundle = load_model_file(tiny_model)
    at_16k, _ = prepare_utterances(enrolment_pairs([str(write_speaker(tmp_path / "a", copies=1))]), bundle)
    at_8k, _ = prepare_utterances(enrolment_pairs([str(write_speaker(tmp_path / "b", copies=1, rate=8000))]), bundle)
    at_44k, _ = prepare_utterances(enrolment_pairs([str(write_speaker(tmp_path / "c", copies=1, rate=44100))]), bundle)
    assert [len(u.features) for u in at_8k] == [len(u.features) for u in at_16k] == [len(u.features) for u in at_44k]
    assert [u.text for u in at_8k] == [u.text for u in at_44k] == sorted(CLIPS.values())


def test_a_bad_enrolment_never_replaces_a_good_model(tiny_model, tmp_path):
    speaker = write_speaker(tmp_path / "me")
    output = tmp_path / "me.pt"
    output.write_bytes(b"the good model")
    with pytest.raises(AdaptationError, match="did not improve"):  # no step was scored better than none
        adapt_model_file(tiny_model, [str(speaker)], output, AdaptOptions(max_steps=1, check_every=2))
    with pytest.raises(AdaptationError):  # no time for a step
        adapt_model_file(tiny_model, [str(speaker)], output, AdaptOptions(seconds=0.001))
    assert output.read_bytes() == b"the good model"


def test_manifests_and_too_many_utterances(tmp_path):
    manifest = tmp_path / "me.jsonl"
    manifest.write_text("".join(json.dumps({"audio": f"a{i}.wav", "text": "hi"}) + "\n" for i in range(501)))
    assert len(enrolment_pairs([str(manifest)])) == 501
    with pytest.raises(AdaptationError, match="at most 200"):
        adapt_model_file(DATA / "tiny-model.pt", [str(manifest)], tmp_path / "x.pt")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(AdaptationError, match="line 1"):
        enrolment_pairs([str(tmp_path / "bad.jsonl")])
    with pytest.raises(AdaptationError, match="not a JSONL manifest or a folder"):
        enrolment_pairs([str(tmp_path / "nothing.txt")])


def test_the_adaptation_benchmark(tiny_model, tmp_path):
    from training.adapt_bench import adaptation_benchmark

    speaker = write_speaker(tmp_path / "me", copies=4)
    wavs = sorted(speaker.glob("*.wav"))
    rows = [{"audio": str(p), "duration": 1.0, "text": p.with_suffix(".txt").read_text().strip().lower(), "speaker": "me"} for p in wavs]
    manifest = tmp_path / "me.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = adaptation_benchmark(
        str(manifest), 5, AdaptOptions(max_steps=8, check_every=4), str(tiny_model), decoders=("greedy",), test_from=6
    )
    row = report["per_speaker"][0]
    assert report["speakers"] == 1 and row["enrolled"] == 5 and row["tested"] == 2 and row["steps"] > 0
    assert 0 <= report["unadapted_greedy_wer"] <= 2 and 0 <= report["adapted_greedy_wer"] <= 2 and row["adapt_seconds"] > 0
