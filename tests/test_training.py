import csv
import json
import subprocess
import sys

import torch

from asr.checkpoint import load_model_file
from tests.conftest import CLIPS, DATA, TRAINING_EPOCHS, tiny_train_config, write_manifest
from training import precision, trainer
from training.augment import AugmentConfig
from training.data import bucket_batches, build_examples, collate, load_features, prefetched_batches
from training.manifest import from_librispeech, from_table, read_manifest
from training.trainer import train


def _metrics(folder) -> list[dict]:
    with (folder / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_training_overfits_two_clips_within_the_step_budget(trained_run):
    # What training must do on any CPU: reach CER 0 on the two clips it is trained on, with steps to spare.
    dev = [r for r in _metrics(trained_run) if r["split"] not in ("train", "")]
    assert len(dev) == TRAINING_EPOCHS
    assert min(float(r["cer"]) for r in dev) == 0.0, [r["cer"] for r in dev]
    first_perfect = next(int(r["epoch"]) for r in dev if float(r["cer"]) == 0.0)
    assert first_perfect < TRAINING_EPOCHS
    assert load_model_file(trained_run / "model.pt").metadata["dev_wer"] == 0.0  # the best epoch is the one kept


def test_training_loss_falls_and_curves_are_written(trained_run):
    rows = (trained_run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("time,epoch,step,split,loss,grad_norm")
    losses = [float(r["loss"]) for r in _metrics(trained_run) if r["split"] == "train"]
    assert losses[-1] < losses[0] / 5
    assert (trained_run / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_is_exact(tmp_path, overfit_manifest, monkeypatch):
    # In bfloat16 (emulated where the CPU lacks it), as the trainer chose when the run started: the resumed part keeps
    # it although its own timing would now choose float32.
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: True)
    monkeypatch.setattr(trainer, "cpu_has_native_bfloat16", lambda: True)
    monkeypatch.setattr(precision, "faster_on_cpu", lambda step: True)
    augmented = dict(specaugment=True, augment=AugmentConfig(), model=_small())
    straight = train(tiny_train_config(tmp_path / "a", overfit_manifest, epochs=2, **augmented), log=lambda _m: None)
    # Stop in the middle of the first epoch, then resume in a new call.
    config = tiny_train_config(tmp_path / "b", overfit_manifest, epochs=2, max_steps=13, keep_epochs=0, **augmented)
    train(config, log=lambda _m: None)
    from dataclasses import replace

    monkeypatch.setattr(precision, "faster_on_cpu", lambda step: False)
    messages = []
    resumed = train(replace(config, max_steps=0), log=messages.append)
    assert "computing in bfloat16" in messages
    assert load_model_file(resumed).metadata["precision"] == load_model_file(straight).metadata["precision"] == "bfloat16"
    assert sorted(p.name for p in straight.parent.glob("epoch-*.pt")) == ["epoch-001.pt", "epoch-002.pt"]
    assert not list(resumed.parent.glob("epoch-*.pt"))  # keep_epochs=0
    a, b = load_model_file(straight).model.state_dict(), load_model_file(resumed).model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def _small():
    from asr.model import ModelConfig

    return ModelConfig(hidden_size=16, num_layers=1, dropout=0.2, chunk_frames=4, lookahead_frames=2)


def test_bucketed_batches_respect_budget_and_split_across_ranks(tmp_path):
    manifest = write_manifest(
        tmp_path / "m.jsonl",
        {
            **CLIPS,
            "LJ001-0008.opus": "has never been surpassed",
            "LJ002-0179.opus": "and costing eleven pounds fifteen shillings eight pence within ten days",
        },
        repeat=5,
    )
    from asr.features import FeatureConfig
    from asr.text import Vocabulary

    fs = load_features(manifest, FeatureConfig(), tmp_path / "cache")
    examples, skipped = build_examples([fs], Vocabulary(), 3, 10_000)
    assert len(examples) == 20 and skipped == 0
    batches = bucket_batches(examples, 1200, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(20))
    for b in batches:
        assert len(b) == 1 or max(examples[i].frames for i in b) * len(b) <= 1200
    assert bucket_batches(examples, 1200, seed=1, epoch=0) == batches
    assert bucket_batches(examples, 1200, seed=1, epoch=1) != batches
    rank0 = bucket_batches(examples, 1200, 1, 0, rank=0, world_size=2)
    rank1 = bucket_batches(examples, 1200, 1, 0, rank=1, world_size=2)
    assert len(rank0) == len(rank1) and not {i for b in rank0 for i in b} & {i for b in rank1 for i in b}

    # SortaGrad: the same batches, from the shortest to the longest, on every rank.
    longest = [max(examples[i].frames for i in b) for b in batches]
    ascending = bucket_batches(examples, 1200, seed=1, epoch=0, shortest_first=True)
    assert sorted(map(sorted, ascending)) == sorted(map(sorted, batches)) and longest != sorted(longest)
    assert [max(examples[i].frames for i in b) for b in ascending] == sorted(longest)
    for rank in (0, 1):
        split = [max(examples[i].frames for i in b) for b in bucket_batches(examples, 1200, 1, 0, rank, 2, shortest_first=True)]
        assert split == sorted(split)

    # The trainer's background collation gives exactly collate()'s batches, in order, and can be left early.
    expected = [collate([fs], examples, b) for b in batches]
    got = list(prefetched_batches([fs], examples, batches, depth=3))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.keys() == e.keys() and all(torch.equal(g[k], e[k]) for k in e)
    early = prefetched_batches([fs], examples, batches)
    assert torch.equal(next(early)["features"], expected[0]["features"])
    early.close()


def test_rewriting_a_cache_leaves_features_already_loaded_intact(tmp_path, monkeypatch):
    # Training runs sharing --cache-dir may compute the same cache at once: the later writer must not truncate or
    # overwrite the files the earlier one has memory-mapped.
    import numpy as np

    from asr.features import FeatureConfig
    from training import data

    manifest = write_manifest(tmp_path / "m.jsonl", CLIPS)
    first = load_features(manifest, FeatureConfig(), tmp_path / "cache")
    loaded = np.array(first.features)
    [folder] = (tmp_path / "cache").iterdir()
    (folder / "offsets.npy").unlink()  # what a second run sees while the first is still writing
    recomputed = {str(u.audio): -first.frames(i) - 1 for i, u in enumerate(first.utterances)}
    monkeypatch.setattr(data, "_featurise", lambda source: recomputed[str(source)])
    second = load_features(manifest, FeatureConfig(), tmp_path / "cache")
    np.testing.assert_array_equal(np.array(second.features), -loaded - 1)
    np.testing.assert_array_equal(np.array(first.features), loaded)
    assert sorted(p.name for p in folder.iterdir()) == ["features.npy", "offsets.npy"]  # no temporary files left


def test_manifest_converters(tmp_path):
    chapter = tmp_path / "LibriSpeech" / "dev" / "19" / "198"
    chapter.mkdir(parents=True)
    for i, name in enumerate(CLIPS):
        (chapter / f"19-198-000{i}.opus").write_bytes((DATA / name).read_bytes())
    (chapter / "19-198.trans.txt").write_text("19-198-0000 HOW MUCH WAS IT\n19-198-0001 DOES THAT LOOK GOOD\n")
    utterances = from_librispeech(tmp_path / "LibriSpeech")
    assert [u.text for u in utterances] == list(CLIPS.values())
    assert utterances[0].speaker == "19" and 0.5 < utterances[0].duration < 1.2

    table = tmp_path / "cv" / "train.tsv"
    (tmp_path / "cv" / "clips").mkdir(parents=True)
    (tmp_path / "cv" / "clips" / "a.opus").write_bytes((DATA / "LJ001-0008.opus").read_bytes())
    table.write_text("client_id\tpath\tsentence\nspk1\ta.opus\tHas never been surpassed!\n")
    rows = from_table(table)
    assert rows[0].text == "has never been surpassed" and rows[0].raw_text == "Has never been surpassed!"

    out = tmp_path / "out" / "train.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "asr", "manifest", "librispeech", str(tmp_path / "LibriSpeech"), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert [u.text for u in read_manifest(out)] == list(CLIPS.values())
    assert json.loads(out.read_text().splitlines()[0])["audio"].startswith("../")


def test_last_epochs_are_kept_and_averaged(trained_run, tmp_path):
    from asr.recognizer import BUNDLED_MODEL

    kept = sorted(p.name for p in trained_run.glob("epoch-*.pt"))
    assert kept == [f"epoch-{e:03d}.pt" for e in range(TRAINING_EPOCHS - 2, TRAINING_EPOCHS + 1)]  # keep_epochs = 3
    paths = [trained_run / name for name in kept]
    out = tmp_path / "avg.pt"
    result = subprocess.run(
        [sys.executable, "-m", "asr", "average", *map(str, paths), "-o", str(out)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    averaged = load_model_file(out)
    states = [load_model_file(p).model.state_dict() for p in paths]
    for key, value in averaged.model.state_dict().items():
        expected = sum(s[key].double() for s in states) / 3 if value.is_floating_point() else states[-1][key]
        torch.testing.assert_close(value, expected.to(value.dtype))
    assert not torch.equal(states[0]["output.weight"], states[-1]["output.weight"])  # the epochs did differ
    assert [s["epochs_completed"] for s in averaged.metadata["averaged_from"]] == [6, 7, 8]
    assert averaged.metadata["epochs_completed"] == TRAINING_EPOCHS

    # A model of another shape, and a single file, are refused with a clear message.
    result = subprocess.run(
        [sys.executable, "-m", "asr", "average", str(paths[0]), str(BUNDLED_MODEL), "-o", str(tmp_path / "x.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "only one run's models can be averaged" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "asr", "average", str(paths[0]), "-o", str(tmp_path / "x.pt")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "at least two" in result.stderr
    assert not (tmp_path / "x.pt").exists()


def test_the_first_epochs_go_shortest_first_when_asked(tmp_path, overfit_manifest, monkeypatch):
    orders = []
    bucket = trainer.bucket_batches

    def recording(examples, batch_frames, seed, epoch, rank=0, world_size=1, shortest_first=False):
        orders.append((epoch, shortest_first))
        return bucket(examples, batch_frames, seed, epoch, rank, world_size, shortest_first)

    monkeypatch.setattr(trainer, "bucket_batches", recording)
    config = tiny_train_config(tmp_path, overfit_manifest, epochs=3, shortest_first_epochs=2, model=_small(), keep_epochs=0)
    train(config, log=lambda _m: None)
    assert orders[1:] == [(0, True), (1, True), (2, False)]  # the first call only counts the steps of an epoch


def test_random_generators_resume_exactly_through_a_checkpoint_file(tmp_path):
    import random

    import numpy as np

    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    np.random.standard_normal()  # leaves numpy with a cached Gaussian
    random.gauss(0, 1)
    torch.save({"rng": [trainer._rng_state()]}, tmp_path / "state.pt")
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(), torch.rand(2).tolist())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    trainer._set_rng_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"][0])
    resumed = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(), torch.rand(2).tolist())
    assert resumed == expected
