"""Corpora as tar shards in the WebDataset layout, to copy to a fresh machine and train from as they are.

A shard folder holds ``shard-000000.tar``, ``shard-000001.tar``, ... and ``shards.json`` (what each shard holds,
its size and SHA-256). In a shard every utterance is two consecutive members with the same key: the audio as it
was stored (``000123.opus``) and its manifest fields (``000123.json``). Plain tar (USTAR), readable by ``tar``,
Python's ``tarfile`` and the ``webdataset`` library.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .manifest import read_manifest_entries

INDEX_FILE = "shards.json"
SHARD_NAME = "shard-{:06d}.tar"
INDEX_FORMAT = "asr-webdataset-shards"
BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # tarfile pads a closed archive to a multiple of this
_KEY = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")  # WebDataset: key up to the first dot of the file name


class ShardError(ValueError):
    """Raised for a shard folder that is missing, incomplete, corrupt or not in the expected layout."""


@dataclass(frozen=True)
class ShardSample:
    """One utterance read from a shard: its audio bytes and the fields of its ``.json`` member."""

    shard: Path
    key: str
    audio_name: str  # member name, e.g. "000123.opus"
    audio: bytes
    fields: dict


def _member_bytes(size: int) -> int:
    return BLOCK + -(-size // BLOCK) * BLOCK


def _archive_bytes(members: int) -> int:
    """Size of a closed tar whose members take ``members`` bytes: end-of-archive blocks, padded to a record."""
    return -(-(members + 2 * BLOCK) // RECORD) * RECORD


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _ShardWriter:
    """Appends utterances to shard-NNNNNN.tar files, starting a new one before a shard would pass ``max_bytes``."""

    def __init__(self, folder: Path, max_bytes: int, log: Callable[[str], None] | None) -> None:
        self.folder, self.max_bytes, self.log = folder, max_bytes, log
        self.shards: list[dict] = []
        self.tar: tarfile.TarFile | None = None
        self.used = self.count = 0
        self.seconds = 0.0

    def _path(self) -> Path:
        return self.folder / (SHARD_NAME.format(len(self.shards)) + ".tmp")

    def add(self, members: list[tuple[str, bytes]], mtime: int, seconds: float) -> None:
        needed = sum(_member_bytes(len(data)) for _, data in members)
        if self.tar is not None and _archive_bytes(self.used + needed) > self.max_bytes:
            self.close()
        if self.tar is None:
            self.tar = tarfile.open(self._path(), "w", format=tarfile.USTAR_FORMAT)
            self.used = self.count = 0
            self.seconds = 0.0
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), mtime, 0o644
            self.tar.addfile(info, io.BytesIO(data))
        self.used += needed
        self.count += 1
        self.seconds += seconds

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.tar = None
        final = self._path().with_suffix("")
        os.replace(self._path(), final)
        size = final.stat().st_size
        if size > self.max_bytes:  # cannot happen unless tarfile changes its layout
            raise ShardError(f"{final} is {size} bytes, over the {self.max_bytes}-byte limit")
        entry = {"name": final.name, "utterances": self.count, "hours": round(self.seconds / 3600, 5), "bytes": size}
        self.shards.append({**entry, "sha256": file_sha256(final)})
        if self.log:
            self.log(f"{final.name}: {self.count} utterances, {size / 1e6:.1f} MB")

    def discard(self) -> None:
        """Remove everything written so far (after a failure)."""
        if self.tar is not None:
            self.tar.close()
            self.tar = None
        for path in [*(self.folder / s["name"] for s in self.shards), *self.folder.glob("*.tar.tmp")]:
            path.unlink(missing_ok=True)


def write_shards(
    manifests: Iterable[str | os.PathLike], output_dir: str | os.PathLike, max_mb: float = 100.0, log: Callable[[str], None] | None = None
) -> dict:
    """Write every utterance of the manifests into tar shards of at most ``max_mb`` MB (10^6 bytes) each.

    Returns the index that is also written to ``output_dir/shards.json``. Refuses a folder that already holds shards;
    after a failure (an unreadable audio file, an utterance larger than a shard) it leaves no shards behind.
    """
    out = Path(output_dir)
    max_bytes = int(max_mb * 1_000_000)
    sources = [Path(m) for m in manifests]
    if not sources:
        raise ShardError("no manifests to shard")
    entries = [(source, utt, entry) for source in sources for utt, entry in read_manifest_entries(source)]
    if out.exists() and (any(out.glob("*.tar")) or (out / INDEX_FILE).exists()):
        raise ShardError(f"{out} already holds shards; write to a new folder")
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, max_bytes, log)
    try:
        for index, (source, utt, entry) in enumerate(entries):
            key = f"{index:06d}"
            try:
                audio = utt.audio.read_bytes()
                mtime = int(utt.audio.stat().st_mtime)
            except OSError as error:
                raise ShardError(f"{source}: cannot read audio {utt.audio}: {error}") from error
            extension = utt.audio.suffix.lower().lstrip(".") or "audio"
            fields = {k: v for k, v in entry.items() if k != "audio"}
            fields.update(audio=f"{key}.{extension}", source=f"{source.resolve().parent.name}/{source.name}:{entry['audio']}")
            members = [(f"{key}.{extension}", audio), (f"{key}.json", json.dumps(fields, ensure_ascii=False).encode("utf-8"))]
            if _archive_bytes(sum(_member_bytes(len(data)) for _, data in members)) > max_bytes:
                raise ShardError(f"{utt.audio} ({len(audio)} bytes) does not fit in a {max_mb} MB shard; allow larger shards")
            writer.add(members, mtime, utt.duration)
        writer.close()
    except BaseException:
        writer.discard()
        raise
    index = {
        "format": INDEX_FORMAT,
        "version": 1,
        "max_mb": max_mb,
        "utterances": sum(s["utterances"] for s in writer.shards),
        "hours": round(sum(s["hours"] for s in writer.shards), 4),
        "sources": [f"{s.resolve().parent.name}/{s.name}" for s in sources],
        "shards": writer.shards,
    }
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return index


def read_index(folder: str | os.PathLike) -> dict | None:
    """The folder's ``shards.json``, or None when it has none (shards written by another tool)."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(index, dict) or not all(isinstance(s, dict) and {"name", "bytes"} <= s.keys() for s in index["shards"]):
            raise ValueError("no list of shards with names and sizes")
    except (ValueError, KeyError, TypeError) as error:
        raise ShardError(f"{path} is damaged: {error}") from error
    return index


def shard_files(folder: str | os.PathLike) -> list[Path]:
    """The shards of a folder in order: those listed in ``shards.json`` (checked to be present and complete),
    else every ``*.tar`` by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"shard folder not found: {folder}")
    on_disk = sorted(folder.glob("*.tar"))
    index = read_index(folder)
    if index is None:
        if not on_disk:
            raise ShardError(f"{folder} holds no .tar shards")
        return on_disk
    listed = [folder / s["name"] for s in index["shards"]]
    for path, entry in zip(listed, index["shards"]):
        if not path.is_file():
            raise ShardError(f"{path.name} is listed in {folder / INDEX_FILE} but missing (incomplete copy?)")
        if path.stat().st_size != entry["bytes"]:
            raise ShardError(f"{path} is {path.stat().st_size} bytes, {INDEX_FILE} says {entry['bytes']} (truncated or incomplete copy?)")
    extra = sorted(set(on_disk) - set(listed))
    if extra:
        raise ShardError(f"{extra[0]} is not listed in {folder / INDEX_FILE}; remove it or write the shards again")
    if not listed:
        raise ShardError(f"{folder / INDEX_FILE} lists no shards")
    return listed


def shard_fingerprint(folder: str | os.PathLike) -> str:
    """A digest of the shards' content: the SHA-256 values in ``shards.json``, or of the files themselves without one."""
    folder = Path(folder)
    files = shard_files(folder)
    index = read_index(folder)
    if index is not None and all("sha256" in s for s in index["shards"]):
        parts = [(s["name"], s["bytes"], s["sha256"]) for s in index["shards"]]
    else:
        parts = [(f.name, f.stat().st_size, file_sha256(f)) for f in files]
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()


class _HashingReader:
    """A read-only file wrapper that hashes everything read through it."""

    def __init__(self, handle) -> None:
        self.handle, self.digest = handle, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        return data

    def finish(self) -> str:
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest()


def _sample(shard: Path, key: str, members: dict[str, bytes]) -> ShardSample:
    if "json" in members:
        try:
            fields = json.loads(members.pop("json").decode("utf-8"))
            if not isinstance(fields, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            raise ShardError(f"{shard}: {key}.json is not valid JSON ({error})") from error
    elif "txt" in members:
        fields = {"text": members.pop("txt").decode("utf-8", "replace").strip()}
    else:
        raise ShardError(f"{shard}: sample {key} has no .json (or .txt) member")
    if "text" not in fields:
        raise ShardError(f"{shard}: {key}.json has no 'text' field")
    if len(members) != 1:
        raise ShardError(f"{shard}: sample {key} should have one audio member besides its .json, has {sorted(members) or 'none'}")
    [(extension, audio)] = members.items()
    return ShardSample(shard, key, f"{key}.{extension}", audio, fields)


def _check_end(path: Path, offset: int) -> None:
    """A tar reader stops quietly at a damaged header or at the end of the file: require a real end-of-archive."""
    with path.open("rb") as handle:
        handle.seek(offset)
        rest = handle.read()
    if len(rest) < 2 * BLOCK or rest.count(0) != len(rest):
        raise ShardError(f"{path}: corrupt or truncated shard (no valid member or end of archive at byte {offset})")


def iter_shard(path: str | os.PathLike, expected: dict | None = None) -> Iterator[ShardSample]:
    """Stream the samples of one shard (never extracting to disk).

    ``expected`` (its ``shards.json`` entry) is checked at the end: utterance count and SHA-256.
    """
    path = Path(path)
    samples = 0
    try:
        with path.open("rb") as raw:
            reader = _HashingReader(raw)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                key, members = None, {}
                for member in tar:
                    if not member.isfile():
                        continue
                    match = _KEY.match(member.name)
                    if match is None:
                        raise ShardError(f"{path}: member {member.name!r} has no key.extension name")
                    handle = tar.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    if len(data) != member.size:
                        raise ShardError(f"{path}: member {member.name} is truncated")
                    if match.group(1) != key:
                        if key is not None:
                            yield _sample(path, key, members)
                            samples += 1
                        key, members = match.group(1), {}
                    if match.group(2) in members:
                        raise ShardError(f"{path}: sample {key} has two .{match.group(2)} members")
                    members[match.group(2)] = data
                _check_end(path, tar.offset)
                if key is not None:
                    yield _sample(path, key, members)
                    samples += 1
            digest = reader.finish()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ShardError(f"{path}: corrupt or truncated shard ({error})") from error
    if expected is not None:
        if "utterances" in expected and samples != expected["utterances"]:
            raise ShardError(f"{path}: {samples} utterances, {INDEX_FILE} says {expected['utterances']} (truncated or corrupt?)")
        if "sha256" in expected and digest != expected["sha256"]:
            raise ShardError(f"{path}: SHA-256 differs from {INDEX_FILE} (corrupt copy?)")
    if samples == 0:
        raise ShardError(f"{path}: no samples")


def iter_shards(folder: str | os.PathLike) -> Iterator[ShardSample]:
    """Stream every sample of a shard folder in order, checking each shard against ``shards.json`` when there is one."""
    files = shard_files(folder)
    index = read_index(folder)
    entries = {s["name"]: s for s in index["shards"]} if index else {}
    for path in files:
        yield from iter_shard(path, entries.get(path.name))
