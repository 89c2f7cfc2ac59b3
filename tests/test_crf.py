"""CTC-CRF loss: the denominator and its gradient against brute-force enumeration of every CTC path."""

import itertools
import math

import pytest
import torch

from training.crf import CTCCRFLoss, PhoneLMError, PhoneNgram, denominator_log_z, estimate_bigram, estimate_ngram, histories, perplexity

TOKENS = ("<b>", "a", "b", "c")  # blank + K = 3 labels


def _collapse(path: tuple[int, ...]) -> list[int]:
    labels, previous = [], 0
    for symbol in path:
        if symbol != 0 and symbol != previous:
            labels.append(symbol)
        previous = symbol
    return labels


def _brute_force(potentials: torch.Tensor, lm: PhoneNgram, target: list[int] | None = None) -> torch.Tensor:
    """log sum over all paths (or those of ``target``) of exp(path potentials + LM log-prob), differentiable."""
    frames, width = potentials.shape
    scores = []
    for path in itertools.product(range(width), repeat=frames):
        labels = _collapse(path)
        if target is not None and labels != target:
            continue
        scores.append(potentials[torch.arange(frames), list(path)].sum() + lm.sequence_log_prob(labels))
    return torch.logsumexp(torch.stack(scores), 0)


def _random_lm(seed: int, order: int = 2) -> PhoneNgram:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(histories(order, len(TOKENS) - 1)), len(TOKENS), generator=generator, dtype=torch.float64)
    return PhoneNgram(TOKENS, order, logits.log_softmax(1))


@pytest.mark.parametrize("order", [2, 3])
def test_denominator_and_gradient_equal_brute_force_with_unequal_lengths(order):
    torch.manual_seed(0)
    lm = _random_lm(1, order)
    lengths = torch.tensor([5, 3, 1])
    potentials = (3 * torch.randn(3, 5, len(TOKENS), dtype=torch.float64)).requires_grad_()
    log_z = denominator_log_z(potentials, lengths, lm)
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    (log_z * weights).sum().backward()
    for row, length in enumerate(lengths.tolist()):
        reference_input = potentials.detach()[row, :length].clone().requires_grad_()
        reference = _brute_force(reference_input, lm)
        reference.backward()
        assert log_z[row].item() == pytest.approx(reference.item(), abs=1e-9)
        assert torch.allclose(potentials.grad[row, :length], weights[row] * reference_input.grad, atol=1e-9)
        assert torch.all(potentials.grad[row, length:] == 0)


def test_large_potentials_do_not_overflow():
    lm = _random_lm(2)
    potentials = 80 * torch.randn(2, 4, len(TOKENS), dtype=torch.float64)
    log_z = denominator_log_z(potentials, torch.tensor([4, 4]), lm)
    assert log_z[0].item() == pytest.approx(_brute_force(potentials[0], lm).item(), abs=1e-7)
    assert torch.isfinite(log_z).all()


@pytest.mark.parametrize("order", [2, 3])
def test_crf_loss_and_its_gradient_equal_brute_force(order):
    torch.manual_seed(3)
    lm = _random_lm(4, order)
    logits = torch.randn(4, 2, len(TOKENS), dtype=torch.float64, requires_grad=True)
    targets = [[1, 2], [3, 3]]
    flat = torch.tensor([t for ts in targets for t in ts])
    loss, per_utterance = CTCCRFLoss(lm, ctc_weight=0.0)(logits.log_softmax(2), flat, torch.tensor([4, 4]), torch.tensor([2, 2]))
    loss.backward()
    reference_logits = logits.detach().clone().requires_grad_()
    log_probs = reference_logits.log_softmax(2)
    reference = []
    for row, target in enumerate(targets):
        reference.append(_brute_force(log_probs[:, row], lm) - _brute_force(log_probs[:, row], lm, target))
        assert per_utterance[row].item() == pytest.approx(reference[row].item(), abs=1e-9)
        assert per_utterance[row] > 0  # a probability under 1
    sum(reference).backward()
    assert torch.allclose(logits.grad, reference_logits.grad, atol=1e-9)


def test_ctc_weight_adds_plain_ctc():
    lm = _random_lm(5)
    log_probs = torch.randn(6, 1, len(TOKENS), dtype=torch.float64).log_softmax(2)
    args = (torch.tensor([1, 2, 3]), torch.tensor([6]), torch.tensor([3]))
    crf_only, _ = CTCCRFLoss(lm, 0.0)(log_probs, *args)
    both, _ = CTCCRFLoss(lm, 0.5)(log_probs, *args)
    ctc = torch.nn.functional.ctc_loss(log_probs, *args, reduction="sum")
    assert both.item() == pytest.approx(crf_only.item() + 0.5 * ctc.item())


@pytest.mark.parametrize("order", [2, 3])
def test_batch_log_probs_match_sequence_log_prob(order):
    lm = _random_lm(6, order)
    sequences = [[1, 2, 2, 3], [], [3]]
    flat = torch.tensor([t for s in sequences for t in s])
    batch = lm.batch_log_probs(flat, torch.tensor([len(s) for s in sequences]))
    for value, labels in zip(batch.tolist(), sequences):
        assert value == pytest.approx(lm.sequence_log_prob(labels))


def test_estimated_bigram_is_smoothed_and_fits_its_data(tmp_path):
    sequences = [[1, 2, 3]] * 20 + [[1, 3]] * 5
    lm = estimate_bigram(sequences, TOKENS)
    probs = lm.log_probs.double().exp()
    assert torch.allclose(probs.sum(1), torch.ones(len(TOKENS), dtype=torch.float64))
    assert (probs > 0).all()  # every label may follow every history
    assert probs[1, 2] > probs[1, 3] > probs[1, 1]
    assert perplexity(lm, sequences) < perplexity(estimate_bigram([[3, 2, 1]] * 20, TOKENS), sequences)
    path = tmp_path / "phone-lm.json"
    lm.save(path)
    assert torch.allclose(PhoneNgram.load(path, TOKENS).log_probs, lm.log_probs)
    with pytest.raises(PhoneLMError, match="another phone vocabulary"):
        PhoneNgram.load(path, TOKENS + ("d",))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PhoneLMError, match="not a phone LM"):
        PhoneNgram.load(tmp_path / "bad.json")


def test_estimated_trigram_sees_two_labels_back_and_backs_off_to_the_bigram(tmp_path):
    sequences = [[1, 2, 3]] * 20 + [[3, 2, 1]] * 20
    bigram, trigram = estimate_bigram(sequences, TOKENS), estimate_ngram(sequences, TOKENS, order=3)
    assert torch.allclose(trigram.log_probs.double().exp().sum(1), torch.ones(trigram.num_states, dtype=torch.float64))
    # after "2", the bigram cannot tell 3 from 1; the trigram can from the label before
    assert abs(bigram.sequence_log_prob([1, 2, 3]) - bigram.sequence_log_prob([1, 2, 1])) < 0.5
    assert trigram.sequence_log_prob([1, 2, 3]) > trigram.sequence_log_prob([1, 2, 1]) + 2
    assert perplexity(trigram, sequences) < perplexity(bigram, sequences)
    unseen = trigram.num_states - 1  # history (3, 3) never occurred: its row is the bigram's row for 3
    assert torch.allclose(trigram.log_probs[unseen], bigram.log_probs[3], atol=1e-6)
    trigram.save(tmp_path / "lm.json")
    loaded = PhoneNgram.load(tmp_path / "lm.json", TOKENS)
    assert loaded.order == 3 and torch.allclose(loaded.log_probs, trigram.log_probs)
    with pytest.raises(PhoneLMError, match="order 2 or 3"):
        estimate_ngram(sequences, TOKENS, order=4)


def test_a_first_version_bigram_file_still_loads(tmp_path):
    import json

    table = estimate_bigram([[1, 2]], TOKENS).log_probs
    (tmp_path / "old.json").write_text(
        json.dumps({"format": "bilstm-asr phone bigram 1", "tokens": list(TOKENS), "log_probs": table.tolist()})
    )
    assert torch.allclose(PhoneNgram.load(tmp_path / "old.json").log_probs, table)


def test_loss_of_a_uniform_model_is_finite_on_long_inputs():
    lm = estimate_bigram([[1, 2, 3]], TOKENS)
    log_probs = torch.full((2000, 1, len(TOKENS)), -math.log(len(TOKENS)))
    loss, _ = CTCCRFLoss(lm)(log_probs, torch.tensor([1, 2, 3]), torch.tensor([2000]), torch.tensor([3]))
    assert math.isfinite(loss.item())


def _phone_config(tmp_path, tiny_model, **overrides):
    from dataclasses import replace

    from asr.checkpoint import load_model_file
    from asr.phones import PHONE_TOKENS
    from tests.conftest import CLIPS, tiny_train_config, write_manifest

    manifest = write_manifest(tmp_path / "train.jsonl", CLIPS, repeat=4)
    settings = dict(
        model=replace(load_model_file(tiny_model).model.config, phone_vocab_size=len(PHONE_TOKENS)),
        init_model=str(tiny_model),
        epochs=3,
        learning_rate=3e-3,
        phone_loss="crf",
    )
    return tiny_train_config(tmp_path, manifest, **(settings | overrides))


def test_crf_training_builds_its_phone_lm_lowers_the_loss_and_resumes(tmp_path, tiny_model):
    import csv
    import json
    from dataclasses import replace

    from asr.checkpoint import load_model_file
    from asr.phones import PHONE_TOKENS
    from training.trainer import train

    messages = []
    config = _phone_config(tmp_path, tiny_model, max_steps=6)
    train(config, log=messages.append)
    lm_file = tmp_path / "run" / "phone-lm.json"
    lm = PhoneNgram.load(lm_file, PHONE_TOKENS)
    assert any("phone CTC-CRF loss" in m for m in messages)
    hh = PHONE_TOKENS.index("HH")
    assert lm.log_probs[0, hh] > lm.log_probs[0, PHONE_TOKENS.index("ZH")]  # "how much was it" starts with HH
    written = lm_file.stat().st_mtime_ns
    messages.clear()
    model_file = train(replace(config, max_steps=0), log=messages.append)
    assert any("resumed from" in m for m in messages) and lm_file.stat().st_mtime_ns == written  # the same LM on resume
    with (tmp_path / "run" / "metrics.csv").open() as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle) if row["split"] == "train"]
    assert losses[-1] < losses[0] / 2
    metadata = load_model_file(model_file).metadata
    assert json.loads(metadata["train_config"])["phone_loss"] == "crf"


def test_crf_needs_a_phone_layer_and_a_matching_phone_lm(tmp_path, tiny_model):
    from dataclasses import replace

    from asr.checkpoint import load_model_file
    from training.trainer import train

    with pytest.raises(ValueError, match="phone output layer"):
        _phone_config(tmp_path, tiny_model, model=load_model_file(tiny_model).model.config)
    other = tmp_path / "other-lm.json"
    estimate_bigram([[1, 2]], TOKENS).save(other)
    with pytest.raises(PhoneLMError, match="another phone vocabulary"):
        train(replace(_phone_config(tmp_path, tiny_model), phone_lm=str(other)), log=lambda _m: None)


def test_a_batch_with_a_non_finite_loss_is_skipped(tiny_model):
    from asr.checkpoint import load_model_file
    from training.precision import precision_named
    from training.trainer import CTCStep

    model = load_model_file(tiny_model).model
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _s: 1.0)
    step = CTCStep(model, optimizer, scheduler, precision_named("float32"), len(load_model_file(tiny_model).vocabulary), 5.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    features = torch.zeros(1, 100, model.config.n_mels)
    features[0, 50] = math.nan
    batch = {"features": features, "lengths": torch.tensor([100]), "targets": torch.tensor([1, 2]), "target_lengths": torch.tensor([2])}
    loss, grad_norm = step(batch)
    assert math.isnan(loss) and step.skipped_batches == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_phone_lm_command(tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import CLIPS, write_manifest

    manifest = write_manifest(tmp_path / "train.jsonl", CLIPS)
    out = tmp_path / "lm" / "phones.json"
    result = subprocess.run(
        [sys.executable, "-m", "asr", "lm", "phones", str(manifest), "-o", str(out), "--dev", str(manifest)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "phone bigram of 2 transcripts" in result.stderr and "on 2 dev transcripts" in result.stderr
    assert json.loads(out.read_text())["order"] == 2 and PhoneNgram.load(out).num_states == 41
    result = subprocess.run(
        [sys.executable, "-m", "asr", "lm", "phones", str(tmp_path / "none.jsonl"), "-o", str(out)], capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stderr.startswith("error:")


def test_utterances_without_phones_are_left_out_and_counted(tmp_path):
    from collections import Counter

    from asr.phones import PHONE_TOKENS, Pronouncer
    from asr.text import Vocabulary
    from tests.conftest import CLIPS, DATA, write_manifest
    from training.data import build_examples, load_features

    clips = dict(CLIPS)
    clips[str(DATA / "zero_8khz.opus")] = "zero qwxzv"  # a word neither CMUdict nor (here) espeak-ng can spell
    manifest = write_manifest(tmp_path / "train.jsonl", clips)
    from asr.features import FeatureConfig

    features = load_features(manifest, FeatureConfig(), tmp_path / "cache")
    reasons = Counter()
    phones = (Pronouncer(use_espeak=False), Vocabulary(PHONE_TOKENS))
    examples, skipped = build_examples([features], Vocabulary(), 3, 10_000, phones, reasons)
    assert len(examples) == 2 and skipped == 1 and reasons == Counter({"a word without a pronunciation": 1})
    assert all(e.phone_targets for e in examples)


def test_an_utterance_too_short_for_its_targets_is_left_out_of_the_batch_loss():
    lm = _random_lm(7)
    logits = torch.randn(6, 2, len(TOKENS), dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, 2, 1, 1, 1, 1])  # the second: 4 repeated labels need 7 frames, it has 6
    loss, per_utterance = CTCCRFLoss(lm, ctc_weight=0.5)(logits.log_softmax(2), targets, torch.tensor([6, 6]), torch.tensor([2, 4]))
    assert math.isfinite(loss.item()) and math.isfinite(per_utterance[0].item()) and per_utterance[1] == math.inf
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[:, 1].abs().max() == 0
    alone, _ = CTCCRFLoss(lm, ctc_weight=0.5)(logits[:, :1].log_softmax(2), targets[:2], torch.tensor([6]), torch.tensor([2]))
    assert loss.item() == pytest.approx(alone.item())
