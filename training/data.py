"""Feature caching, length-bucketed batching and SpecAugment for CTC training."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from asr.audio import AudioError, load_audio
from asr.features import FeatureConfig, LogMelExtractor, compute_features
from asr.phones import Pronouncer, PronunciationError
from asr.text import Vocabulary, normalize_text

from .manifest import Utterance, read_manifest
from .shards import ShardError, iter_shards, shard_fingerprint

CACHE_VERSION = 1


@dataclass
class FeatureSet:
    """Log-mel features of a manifest, stored as one (total_frames, n_mels) float16 array."""

    utterances: list[Utterance]
    features: np.ndarray  # (total_frames, n_mels) float16, memory-mapped
    offsets: np.ndarray  # (N + 1,) int64 frame offsets

    def __len__(self) -> int:
        return len(self.utterances)

    def frames(self, index: int) -> np.ndarray:
        return self.features[self.offsets[index] : self.offsets[index + 1]]

    def num_frames(self, index: int) -> int:
        return int(self.offsets[index + 1] - self.offsets[index])


_extractor: LogMelExtractor | None = None


def _init_worker(config: FeatureConfig) -> None:
    global _extractor
    torch.set_num_threads(1)
    _extractor = LogMelExtractor(config)


def _featurise(source: Path | bytes) -> np.ndarray | str:
    assert _extractor is not None
    try:
        return compute_features(load_audio(source), _extractor).astype(np.float16)
    except AudioError as error:
        return str(error)


def _cache_key(manifest: Path, config: FeatureConfig) -> str:
    stat = manifest.stat()
    key = json.dumps([CACHE_VERSION, str(manifest.resolve()), stat.st_size, stat.st_mtime_ns, config.to_dict()])
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary file of this process's own, then rename it into place.

    Training runs that share a cache directory may compute the same cache at once: a rename never truncates a file
    that another process has open or memory-mapped, so each one reads a complete file, its own or the other's.
    """
    temporary = path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _save(folder: Path, results: list[np.ndarray], n_mels: int) -> None:
    offsets = np.zeros(len(results) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in results])
    features = np.concatenate(results) if offsets[-1] else np.zeros((0, n_mels), np.float16)
    _replace_atomically(folder / "features.npy", lambda path: np.save(path, features))
    _replace_atomically(folder / "offsets.npy", lambda path: np.save(path, offsets))  # last: marks the cache complete


def _load_shard_features(folder: Path, config: FeatureConfig, cache_dir: str | os.PathLike, workers: int) -> FeatureSet:
    """Features of a shard folder (``asr data shard``), streamed through the tars and cached like a manifest's.

    The cache is keyed by the shards' content (and the folder's name), so a moved or copied folder keeps its cache.
    """
    key = json.dumps([CACHE_VERSION, "shards", shard_fingerprint(folder), config.to_dict()])
    cache = Path(cache_dir) / f"{folder.resolve().name}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"
    if not (cache / "offsets.npy").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        rows, results = [], []
        pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (config,)) if workers > 1 else None
        if pool is None:
            _init_worker(config)
        try:
            pending: list = []

            def flush() -> None:
                audio = [sample.audio for sample in pending]
                results.extend(pool.map(_featurise, audio, chunksize=8) if pool else [_featurise(a) for a in audio])
                pending.clear()

            for sample in iter_shards(folder):
                fields = sample.fields
                rows.append(
                    {
                        "audio": str(sample.shard / sample.audio_name),
                        "duration": fields.get("duration"),
                        "text": normalize_text(str(fields["text"])),
                        "speaker": str(fields.get("speaker", "")),
                        "raw_text": str(fields.get("raw_text", fields["text"])),
                    }
                )
                pending.append(sample)
                if len(pending) >= 64 * max(1, workers):
                    flush()
            flush()
        finally:
            if pool is not None:
                pool.close()
                pool.join()
        errors = [(row["audio"], r) for row, r in zip(rows, results) if isinstance(r, str)]
        if errors:
            raise ShardError(f"{len(errors)} unreadable audio member(s) in {folder}, first: {errors[0][0]}: {errors[0][1]}")
        for row, features in zip(rows, results):
            if row["duration"] is None:
                row["duration"] = round(len(features) / 100, 3)
        _replace_atomically(cache / "utterances.json", lambda path: path.write_text(json.dumps(rows) + "\n", encoding="utf-8"))
        _save(cache, results, config.n_mels)
    rows = json.loads((cache / "utterances.json").read_text(encoding="utf-8"))
    utterances = [Utterance(Path(r["audio"]), float(r["duration"]), r["text"], r["speaker"], r["raw_text"]) for r in rows]
    return FeatureSet(utterances, np.load(cache / "features.npy", mmap_mode="r"), np.load(cache / "offsets.npy"))


def load_features(source: str | os.PathLike, config: FeatureConfig, cache_dir: str | os.PathLike, workers: int = 1) -> FeatureSet:
    """Features of every utterance of a JSONL manifest or a shard folder, computed once and cached under ``cache_dir``.

    Unreadable audio files are reported in the error, never silently dropped.
    """
    if Path(source).is_dir():
        return _load_shard_features(Path(source), config, cache_dir, workers)
    manifest = Path(source)
    utterances = read_manifest(manifest)
    folder = Path(cache_dir) / f"{manifest.parent.name}-{manifest.stem}-{_cache_key(manifest, config)}"
    feats_path, offsets_path = folder / "features.npy", folder / "offsets.npy"
    if not offsets_path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        paths = [u.audio for u in utterances]
        if workers > 1:
            with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (config,)) as pool:
                results = pool.map(_featurise, paths, chunksize=8)
        else:
            _init_worker(config)
            results = [_featurise(p) for p in paths]
        errors = [r for r in results if isinstance(r, str)]
        if errors:
            raise AudioError(f"{len(errors)} unreadable file(s) in {manifest}, first: {errors[0]}")
        _save(folder, results, config.n_mels)
    return FeatureSet(utterances, np.load(feats_path, mmap_mode="r"), np.load(offsets_path))


def feature_statistics(sets: list[FeatureSet]) -> tuple[np.ndarray, np.ndarray]:
    """Global per-bin mean and standard deviation (n_mels,) over all frames of the given sets."""
    total = 0
    sums = sq = None
    for fs in sets:
        for start in range(0, len(fs.features), 200_000):
            block = np.asarray(fs.features[start : start + 200_000], dtype=np.float64)
            sums = block.sum(0) + (0 if sums is None else sums)
            sq = (block**2).sum(0) + (0 if sq is None else sq)
            total += len(block)
    if not total:
        raise ValueError("no feature frames to compute statistics from")
    mean = sums / total
    std = np.sqrt(np.maximum(sq / total - mean**2, 1e-10))
    return mean.astype(np.float32), std.astype(np.float32)


@dataclass(frozen=True)
class Example:
    set_index: int
    utt_index: int
    frames: int
    targets: tuple[int, ...]
    duration: float
    phone_targets: tuple[int, ...] = ()  # when the model has a phone output layer


def ctc_fits(targets: list[int], output_frames: int) -> bool:
    """Whether CTC can align ``targets`` to ``output_frames`` (a blank is needed between repeated tokens)."""
    repeats = sum(a == b for a, b in zip(targets, targets[1:]))
    return bool(targets) and output_frames >= len(targets) + repeats


def build_examples(
    sets: list[FeatureSet],
    vocabulary: Vocabulary,
    stack_frames: int,
    max_frames: int,
    phones: tuple[Pronouncer, Vocabulary] | None = None,
    reasons: Counter | None = None,
) -> tuple[list[Example], int]:
    """Usable (example) utterances and the number skipped as too long or too short for CTC.

    With ``phones`` (a pronouncer and the phone vocabulary) each example also gets phone targets; an utterance
    with a word that has no pronunciation is skipped. ``reasons`` counts the skipped utterances by reason.
    """
    reasons = Counter() if reasons is None else reasons
    if phones is not None:  # one espeak-ng call for all the words CMUdict lacks
        pronouncer = phones[0]
        words = {w for fs in sets for utt in fs.utterances for w in utt.text.split()}
        unknown = sorted(w for w in words if not pronouncer.in_dictionary(w))
        if unknown and pronouncer.has_fallback:
            pronouncer.guess(unknown)
    examples, skipped = [], 0
    for si, fs in enumerate(sets):
        for ui, utt in enumerate(fs.utterances):
            frames = fs.num_frames(ui)
            targets = vocabulary.encode(utt.text)
            phone_targets: list[int] = []
            if phones is not None:
                try:
                    phone_targets = phones[1].encode(phones[0].phones_of_text(utt.text))
                except PronunciationError:
                    skipped += 1
                    reasons["a word without a pronunciation"] += 1
                    continue
            fits = ctc_fits(targets, frames // stack_frames) and (phones is None or ctc_fits(phone_targets, frames // stack_frames))
            if not fits or frames > max_frames:
                skipped += 1
                reasons["longer than the limit" if frames > max_frames else "too short for its transcript"] += 1
                continue
            examples.append(Example(si, ui, frames, tuple(targets), frames / 100.0, tuple(phone_targets)))
    return examples, skipped


def bucket_batches(
    examples: list[Example],
    batch_frames: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    shortest_first: bool = False,
) -> list[list[int]]:
    """Batches of similar length whose padded size stays under ``batch_frames`` 10 ms frames, in random order, or
    from the shortest utterances to the longest with ``shortest_first`` (SortaGrad, Deep Speech 2).

    The order depends only on (seed, epoch), so an interrupted epoch can be resumed exactly.
    Each rank gets every world_size-th batch; all ranks get the same number of batches.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = sorted(range(len(examples)), key=lambda i: (examples[i].frames, rng.random()))
    batches, current, longest = [], [], 0
    for i in order:
        longest_if_added = max(longest, examples[i].frames)
        if current and longest_if_added * (len(current) + 1) > batch_frames:
            batches.append(current)
            current, longest_if_added = [], examples[i].frames
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    if not shortest_first:
        rng.shuffle(batches)
    usable = len(batches) - len(batches) % world_size if len(batches) >= world_size else len(batches)
    return batches[rank:usable:world_size]


def collate(sets: list[FeatureSet], examples: list[Example], batch: list[int]) -> dict[str, torch.Tensor]:
    """Pad a batch: features (B, T, n_mels), lengths (B,), targets (sum U,), target_lengths (B,), and the same for phones."""
    items = [examples[i] for i in batch]
    longest = max(e.frames for e in items)
    n_mels = sets[0].features.shape[1]
    features = np.zeros((len(items), longest, n_mels), dtype=np.float32)
    for row, e in enumerate(items):
        features[row, : e.frames] = sets[e.set_index].frames(e.utt_index)
    return {
        "features": torch.from_numpy(features),
        "lengths": torch.tensor([e.frames for e in items]),
        "targets": torch.tensor([t for e in items for t in e.targets]),
        "target_lengths": torch.tensor([len(e.targets) for e in items]),
        "phone_targets": torch.tensor([t for e in items for t in e.phone_targets], dtype=torch.long),
        "phone_target_lengths": torch.tensor([len(e.phone_targets) for e in items]),
        "duration": torch.tensor(sum(e.duration for e in items)),
    }


def prefetched_batches(
    sets: list[FeatureSet], examples: list[Example], batches: list[list[int]], pin_memory: bool = False, depth: int = 2
) -> Iterator[dict[str, torch.Tensor]]:
    """collate() of each batch in order, prepared up to ``depth`` batches ahead on a background thread.

    Reading and padding the features (numpy copies, which release the GIL) then overlaps the model's step, so a GPU
    does not wait for its input. With ``pin_memory`` the features land in page-locked memory for an asynchronous copy.
    """

    def prepare(batch: list[int]) -> dict[str, torch.Tensor]:
        collated = collate(sets, examples, batch)
        if pin_memory:
            collated["features"] = collated["features"].pin_memory()
        return collated

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="collate") as pool:
        pending: deque[Future] = deque(pool.submit(prepare, b) for b in batches[:depth])
        for upcoming in batches[depth:]:
            ready = pending.popleft().result()
            pending.append(pool.submit(prepare, upcoming))
            yield ready
        while pending:
            yield pending.popleft().result()


class SpecAugment(torch.nn.Module):
    """Frequency and time masks (torchaudio transforms) on normalised features (B, T, n_mels)."""

    def __init__(self, freq_masks: int = 2, freq_width: int = 15, time_masks: int = 2, time_width: int = 40) -> None:
        super().__init__()
        try:
            import torchaudio.transforms as T
        except (ImportError, OSError) as error:
            raise RuntimeError(
                f"SpecAugment needs torchaudio, which failed to load ({error}); install a torchaudio "
                "matching your torch build, or train with --no-specaugment"
            ) from error
        self.masks = torch.nn.ModuleList(
            [T.FrequencyMasking(freq_width, iid_masks=True) for _ in range(freq_masks)]
            + [T.TimeMasking(time_width, iid_masks=True, p=0.2) for _ in range(time_masks)]
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.transpose(1, 2).unsqueeze(1)  # torchaudio masks expect (B, C, freq, time)
        for mask in self.masks:
            x = mask(x)
        return x.squeeze(1).transpose(1, 2)
