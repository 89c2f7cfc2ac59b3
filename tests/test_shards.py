import csv
import io
import json
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from asr.features import FeatureConfig
from asr.text import Vocabulary
from tests.conftest import CLIPS, DATA, tiny_train_config, write_manifest
from training.data import bucket_batches, build_examples, load_features
from training.shards import INDEX_FILE, ShardError, iter_shards, write_shards
from training.trainer import train

LJ = {
    "LJ001-0008.opus": "has never been surpassed",
    "LJ002-0179.opus": "and costing eleven pounds fifteen shillings eight pence within ten days",
}
MAX_MB = 0.03  # 30,000 bytes: a handful of clips per shard


def _shard(tmp_path, clips, repeat, name="shards", max_mb=MAX_MB):
    manifest = write_manifest(tmp_path / f"{name}.jsonl", clips, repeat=repeat)
    write_shards([manifest], tmp_path / name, max_mb)
    return manifest, tmp_path / name


def test_shards_hold_the_clips_within_the_size_limit_and_read_back_like_the_manifest(tmp_path):
    manifest = write_manifest(tmp_path / "train.jsonl", {**CLIPS, **LJ}, repeat=3)
    folder = tmp_path / "shards"
    result = subprocess.run(
        [sys.executable, "-m", "asr", "data", "shard", str(manifest), "-o", str(folder), "--max-mb", str(MAX_MB)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    tars = sorted(folder.glob("*.tar"))
    assert [t.name for t in tars] == [f"shard-{i:06d}.tar" for i in range(len(tars))] and len(tars) >= 3
    assert all(t.stat().st_size <= MAX_MB * 1e6 for t in tars)
    index = json.loads((folder / INDEX_FILE).read_text())
    assert [s["name"] for s in index["shards"]] == [t.name for t in tars]
    assert sum(s["utterances"] for s in index["shards"]) == index["utterances"] == 12

    # WebDataset layout: each utterance is <key>.opus then <key>.json, consecutive, keys in manifest order.
    names = [m.name for t in tars for m in tarfile.open(t).getmembers()]
    assert names == [f"{i:06d}.{ext}" for i in range(12) for ext in ("opus", "json")]
    sources = list({**CLIPS, **LJ}.items()) * 3
    samples = list(iter_shards(folder))
    for sample, (name, text) in zip(samples, sources, strict=True):
        assert sample.audio == (DATA / name).read_bytes()
        assert sample.fields["text"] == text and sample.fields["duration"] == 1.0
    with pytest.raises(ShardError, match="already holds shards"):
        write_shards([manifest], folder, MAX_MB)

    # The same features, texts and therefore batches as from the manifest itself.
    from_manifest = load_features(manifest, FeatureConfig(), tmp_path / "cache")
    from_shards = load_features(folder, FeatureConfig(), tmp_path / "cache", workers=2)
    np.testing.assert_array_equal(from_shards.features, from_manifest.features)
    np.testing.assert_array_equal(from_shards.offsets, from_manifest.offsets)
    assert [u.text for u in from_shards.utterances] == [u.text for u in from_manifest.utterances]
    examples = [build_examples([fs], Vocabulary(), 3, 10_000)[0] for fs in (from_manifest, from_shards)]
    assert examples[0] == examples[1]
    assert bucket_batches(examples[0], 1200, 1, 0) == bucket_batches(examples[1], 1200, 1, 0)

    # Copied elsewhere, the folder finds its cache (the key is the shards' content, not their path).
    copy = tmp_path / "copied" / "shards"
    shutil.copytree(folder, copy)
    cached = list((tmp_path / "cache").iterdir())
    load_features(copy, FeatureConfig(), tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == len(cached)


def test_training_from_shard_folders(tmp_path):
    _, train_shards = _shard(tmp_path, CLIPS, repeat=13, name="train")
    _, dev_shards = _shard(tmp_path, CLIPS, repeat=1, name="dev")
    assert len(list(train_shards.glob("*.tar"))) > 1
    config = tiny_train_config(tmp_path, train_shards, dev_manifests=(str(dev_shards),), epochs=2)
    model = train(config, log=lambda _m: None)
    assert model.is_file()
    with (model.parent / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    losses = [float(r["loss"]) for r in rows if r["split"] == "train"]
    assert losses[-1] < losses[0]
    assert [r["epoch"] for r in rows if r["split"] == f"{tmp_path.name}/dev"] == ["1", "2"]  # the dev shards, scored each epoch


def test_shard_writing_fails_cleanly(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", {**CLIPS, **LJ})  # LJ002-0179.opus alone is 16.6 kB
    with pytest.raises(ShardError, match="LJ002-0179.opus .* does not fit in a 0.015 MB shard"):
        write_shards([manifest], tmp_path / "small", max_mb=0.015)
    assert not list((tmp_path / "small").iterdir())  # the shards written before it are removed
    missing = write_manifest(tmp_path / "missing.jsonl", {**CLIPS, "nowhere.opus": "lost"})
    with pytest.raises(ShardError, match="cannot read audio .*nowhere.opus"):
        write_shards([missing], tmp_path / "missing")


def _corrupt(folder, name, change, keep_index=True):
    path = folder / name
    last_header = tarfile.open(path).getmembers()[-1].offset
    path.write_bytes(change(path.read_bytes(), last_header))
    if not keep_index:
        (folder / INDEX_FILE).unlink()


@pytest.mark.parametrize(
    "change, keep_index, message",
    [
        (lambda b, _: b[: len(b) // 2], True, "truncated or incomplete copy"),  # size differs from shards.json
        (lambda b, _: b[: len(b) // 2], False, "corrupt or truncated shard"),  # cut inside a member
        (lambda b, _: b[:10] + b"X" + b[11:], False, "corrupt or truncated shard"),  # first header damaged
        (lambda b, at: b[: at + 10] + b"X" + b[at + 11 :], False, "corrupt or truncated shard"),  # a later header damaged
        (lambda b, _: b[:3000] + bytes([b[3000] ^ 0xFF]) + b[3001:], True, "SHA-256 differs"),  # one byte of audio
    ],
)
def test_a_damaged_shard_is_named(tmp_path, change, keep_index, message):
    manifest, folder = _shard(tmp_path, {**CLIPS, **LJ}, repeat=2)
    _corrupt(folder, "shard-000001.tar", change, keep_index)
    with pytest.raises(ShardError, match=message) as error:
        load_features(folder, FeatureConfig(), tmp_path / "cache")
    assert "shard-000001.tar" in str(error.value)


def test_damaged_members_and_missing_shards_are_reported(tmp_path):
    _, folder = _shard(tmp_path, CLIPS, repeat=2)
    (folder / INDEX_FILE).unlink()
    with tarfile.open(folder / "extra.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("000100.opus", (DATA / "LJ001-0008.opus").read_bytes()), ("000100.json", b"{not json")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match=r"extra.tar: 000100.json is not valid JSON"):
        load_features(folder, FeatureConfig(), tmp_path / "cache")

    _, folder = _shard(tmp_path, CLIPS, repeat=2, name="copy")
    (folder / "shard-000000.tar").unlink()
    with pytest.raises(ShardError, match="shard-000000.tar is listed in .* but missing"):
        load_features(folder, FeatureConfig(), tmp_path / "cache")


def test_train_cli_reports_a_damaged_shard(tmp_path, capsys):
    from asr.cli import main

    manifest, folder = _shard(tmp_path, CLIPS, repeat=4)
    _corrupt(folder, "shard-000001.tar", lambda b, _: b[:-5000])
    code = main(["train", "--train", str(folder), "-o", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert code == 2
    assert "shard-000001.tar" in capsys.readouterr().err
