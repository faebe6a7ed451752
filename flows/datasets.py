"""Published data sets: their manifest, how to find them, and how training jobs read them.

Layout under a storage root:

    datasets/<name>/<version>/manifest.json        written last: the version exists once it does
    datasets/<name>/<version>/train/part-00000.parquet
    datasets/<name>/<version>/test/part-00000.parquet

Readers trust only what a manifest lists, and check each shard's sha256 before use.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flows.errors import JobFailure, UserError
from flows.shards import decode_shard, field_array, sha256
from flows.storage import Storage

MANIFEST = "manifest.json"
FORMAT = "physflow.dataset/1"
SPLITS = ("train", "test")
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str  # relative to the version folder
    rows: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class SplitEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rows: int = Field(ge=0)
    shards: list[ShardEntry]
    statistics: dict[str, dict[str, float]]  # field -> count, mean, std, min, max


class FieldEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shape: list[int]
    axes: list[str]
    dtype: str


class DatasetManifest(BaseModel):
    """Everything a reader needs to know about one published version."""

    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    name: str
    version: str
    pde: dict[str, Any]  # {"name": ..., "parameters": {...}}
    source: dict[str, Any]
    fields: dict[str, FieldEntry]
    grids: dict[str, list[float]]
    splits: dict[str, SplitEntry]
    schema_: str = Field(alias="schema")
    skipped: list[dict[str, Any]] = Field(default_factory=list)
    spec: dict[str, Any]
    spec_digest: str
    created: str

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.splits.values())

    @property
    def bytes(self) -> int:
        return sum(sh.bytes for s in self.splits.values() for sh in s.shards)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def check_name(name: str, what: str = "name") -> str:
    if not re.match(NAME_PATTERN, name):
        raise UserError(
            f"{what} {name!r}: use lower-case letters, digits, '.', '_' or '-' "
            f"(at most 63, starting with a letter or digit)"
        )
    return name


def version_folder(storage: Storage, name: str, version: str) -> Storage:
    return storage.child("datasets", name, version)


def read_manifest(folder: Storage) -> DatasetManifest:
    path = folder.join(MANIFEST)
    if not folder.exists(path):
        raise UserError(f"{folder.url}: no {MANIFEST} (not a published data set version)")
    try:
        return DatasetManifest.model_validate(folder.read_json(path))
    except (ValidationError, ValueError) as exc:
        raise JobFailure(f"{path}: manifest is corrupt ({str(exc).splitlines()[0]})") from None


def publish_manifest(folder: Storage, manifest: DatasetManifest) -> None:
    folder.write_json(folder.join(MANIFEST), manifest.to_json())


def _version_key(version: str) -> tuple:
    """Natural order: v2 < v10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", version))


def list_versions(storage: Storage, name: str) -> list[str]:
    """Published versions of `name` (those with a manifest), oldest first."""
    root = storage.child("datasets", name)
    versions = [v for v in storage.list_dirs(root.url) if storage.exists(root.join(v, MANIFEST))]
    return sorted(versions, key=_version_key)


def list_datasets(storage: Storage, unreadable: list[str] | None = None) -> list[DatasetManifest]:
    """Every published version under `storage`, by name then version; one whose manifest
    is corrupt is left out (and its error appended to `unreadable`, if given)."""
    out = []
    for name in storage.list_dirs(storage.join("datasets")):
        for version in list_versions(storage, name):
            try:
                out.append(read_manifest(version_folder(storage, name, version)))
            except JobFailure as exc:
                if unreadable is not None:
                    unreadable.append(str(exc))
    return out


class Dataset:
    """One published version, opened for reading."""

    def __init__(self, folder: Storage, manifest: DatasetManifest):
        self.folder = folder
        self.manifest = manifest

    @property
    def fields(self) -> list[str]:
        return list(self.manifest.fields)

    def grid(self, axis: str) -> np.ndarray:
        return np.asarray(self.manifest.grids[axis])

    def statistics(self, field: str, split: str = "train") -> dict[str, float]:
        """Normalisation statistics (from the train split unless told otherwise)."""
        return self.manifest.splits[split].statistics[field]

    def _split(self, split: str) -> SplitEntry:
        if split not in self.manifest.splits:
            raise UserError(
                f"data set {self.manifest.name}/{self.manifest.version}: no split {split!r} "
                f"(has {', '.join(self.manifest.splits)})"
            )
        return self.manifest.splits[split]

    def read_shard(self, shard: ShardEntry, verify: bool = True):
        """One shard as an Arrow table, its checksum checked first (with `verify`)."""
        return decode_shard(self._shard_bytes(shard, verify))

    def _shard_bytes(self, shard: ShardEntry, verify: bool) -> bytes:
        path = self.folder.join(shard.path)
        if not self.folder.exists(path):
            raise JobFailure(f"{path}: shard listed in the manifest is missing")
        data = self.folder.read_bytes(path)
        if verify and sha256(data) != shard.sha256:
            raise JobFailure(f"{path}: checksum mismatch (shard is corrupt or was modified)")
        return data

    def verify(self) -> int:
        """Check every shard's checksum; returns the number of shards checked."""
        n = 0
        for split in self.manifest.splits.values():
            for shard in split.shards:
                self._shard_bytes(shard, verify=True)  # the bytes: nothing to decode
                n += 1
        return n

    def arrays(self, split: str = "train", verify: bool = True) -> dict[str, np.ndarray]:
        """The whole split in memory: sample_id (N,) and each field (N, *shape)."""
        entry = self._split(split)
        parts: dict[str, list[np.ndarray]] = {"sample_id": []}
        parts.update({f: [] for f in self.fields})
        for shard in entry.shards:
            table = self.read_shard(shard, verify)
            parts["sample_id"].append(table.column("sample_id").to_numpy())
            for f in self.fields:
                parts[f].append(field_array(table, f))
        return {k: np.concatenate(v) if v else np.empty(0) for k, v in parts.items()}

    def batches(
        self,
        split: str = "train",
        batch_size: int = 8,
        shuffle: bool = False,
        seed: int = 0,
        normalize: bool = False,
        verify: bool = True,
        drop_last: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """Stream torch batches: {"sample_id": (B,), field: (B, *shape), ...}.

        Shards are read one at a time (checksum first); with `shuffle`, shard order and
        rows within a shard are permuted by `seed`. With `normalize`, each field is
        standardised with the train split's mean and std.
        """
        import torch

        if batch_size < 1:
            raise UserError(f"batch_size {batch_size}: must be at least 1")
        entry = self._split(split)
        rng = random.Random(seed)
        shards = list(entry.shards)
        if shuffle:
            rng.shuffle(shards)
        buffer: dict[str, list[np.ndarray]] = {}
        held = 0

        def emit(n: int) -> dict[str, Any]:
            nonlocal held
            joined = {k: np.concatenate(v) for k, v in buffer.items()}
            out = {k: torch.from_numpy(np.ascontiguousarray(a[:n])) for k, a in joined.items()}
            for k, a in joined.items():
                buffer[k] = [a[n:]]
            held -= n
            return out

        for shard in shards:
            table = self.read_shard(shard, verify)
            order = np.arange(table.num_rows)
            if shuffle:
                rng.shuffle(order)  # in place, seeded
            cols = {"sample_id": table.column("sample_id").to_numpy()[order]}
            for f in self.fields:
                values = field_array(table, f)[order]
                if normalize:
                    stats = self.statistics(f)
                    values = (values - stats["mean"]) / (stats["std"] or 1.0)
                cols[f] = values
            for k, v in cols.items():
                buffer.setdefault(k, []).append(v)
            held += table.num_rows
            while held >= batch_size:
                yield emit(batch_size)
        if held and not drop_last:
            yield emit(held)


def resolve(ref: str, version: str | None = None, storage: Storage | None = None) -> Storage:
    """A data set reference -> its version folder.

    `ref` is a name under the storage root (latest version unless `version` is given), or a
    URL/path of a version folder (`s3://b/p/datasets/ds/v1`, `/data/ds/v1`).
    """
    if "/" in ref or "://" in ref:
        return Storage.at(ref)
    storage = storage or Storage.from_env()
    check_name(ref, "data set")
    versions = list_versions(storage, ref)
    if not versions:
        names = storage.list_dirs(storage.join("datasets"))
        known = sorted(n for n in names if list_versions(storage, n))
        raise UserError(
            f"data set {ref!r} not found in {storage.url} (published: {', '.join(known) or 'none'})"
        )
    if version is None:
        return version_folder(storage, ref, versions[-1])
    if version not in versions:
        raise UserError(
            f"data set {ref!r} has no version {version!r} (published: {', '.join(versions)})"
        )
    return version_folder(storage, ref, version)


def open_dataset(
    ref: str, version: str | None = None, storage: Storage | None = None, verify: bool = False
) -> Dataset:
    """Open a published data set; with `verify`, check every shard's checksum now."""
    folder = resolve(ref, version, storage)
    dataset = Dataset(folder, read_manifest(folder))
    if verify:
        dataset.verify()
    return dataset


def utc_now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")
