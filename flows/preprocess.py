"""`physflow preprocess`: simulate or ingest PDE trajectories into a published data set.

The driver plans shards (a chunk of samples per Dask task, train and test apart), the
workers produce, validate and write them, and the driver reduces the statistics and
publishes the manifest last:

    describe source ──► plan shards ──► Dask: [samples → check → Parquet → sidecar] × S
                                          │
                 manifest.json (last) ◄── reduce statistics, checksums

A sidecar `_work/<split>-part-NNNNN.json` records each finished shard's checksum and partial
statistics, so a re-run of the same spec and version skips shards that verify and rewrites
the rest. Nothing is visible to readers until the manifest is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from flows.datasets import (
    NAME_PATTERN,
    SPLITS,
    DatasetManifest,
    publish_manifest,
    read_manifest,
    utc_now,
    version_folder,
)
from flows.errors import UserError
from flows.shards import FieldStats, decode_shard, encode_shard, sha256
from flows.sources import (
    BadSample,
    PDEBenchIngest,
    Simulation,
    SourceInfo,
    check_sample,
)
from flows.spec import Spec
from flows.storage import Storage

EXPERIMENT = "preprocess"
WORK = "_work"


class PreprocessSpec(Spec):
    """A data set to build: where the samples come from, how many, how to split them."""

    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field("v1", pattern=NAME_PATTERN)
    samples: int | None = Field(None, ge=2, description="total samples (default: all in file)")
    test_fraction: float = Field(0.125, ge=0.0, lt=1.0)
    samples_per_task: int = Field(8, ge=1, le=100_000)
    seed: int = Field(0, ge=0)
    dtype: Literal["float32", "float64"] = "float32"
    on_bad_sample: Literal["fail", "skip"] = "fail"
    simulation: Simulation | None = None
    ingest: PDEBenchIngest | None = None

    @model_validator(mode="after")
    def _one_source(self) -> PreprocessSpec:
        if (self.simulation is None) == (self.ingest is None):
            raise ValueError("give exactly one of 'simulation' or 'ingest'")
        if self.simulation is not None and self.samples is None:
            raise ValueError("'samples' is required with 'simulation'")
        return self

    @property
    def source(self):
        return self.simulation if self.simulation is not None else self.ingest


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int
    sample_ids: list[int]

    @property
    def path(self) -> str:
        return f"{self.split}/part-{self.index:05d}.parquet"

    @property
    def sidecar(self) -> str:
        return f"{WORK}/{self.split}-part-{self.index:05d}.json"


@dataclass
class ShardResult:
    split: str
    index: int
    path: str
    rows: int
    bytes: int
    sha256: str
    statistics: dict[str, dict[str, float]]  # field -> FieldStats.state()
    skipped: list[dict[str, Any]] = field(default_factory=list)
    produce_s: float = 0.0  # simulate or read, and check
    write_s: float = 0.0  # encode, hash and write
    resumed: bool = False


@dataclass
class PreprocessResult:
    manifest: DatasetManifest
    folder: str
    shards_written: int
    shards_resumed: int
    seconds: float
    produce_s: float
    write_s: float
    already_published: bool = False

    @property
    def samples(self) -> int:
        return self.manifest.rows

    @property
    def bytes(self) -> int:
        return self.manifest.bytes


def plan_shards(n_samples: int, test_fraction: float, per_task: int) -> list[ShardTask]:
    """Samples 0..n_train-1 are train, the rest test; each split chunked by `per_task`."""
    n_test = int(round(n_samples * test_fraction))
    if test_fraction > 0:
        n_test = max(n_test, 1)
    n_train = n_samples - n_test
    if n_train < 1:
        raise UserError(f"test_fraction {test_fraction}: leaves no training samples")
    tasks = []
    for split, ids in (("train", range(n_train)), ("test", range(n_train, n_samples))):
        for index, start in enumerate(range(0, len(ids), per_task)):
            tasks.append(ShardTask(split, index, list(ids[start : start + per_task])))
    return tasks


def build_shard(task: ShardTask, spec_data: dict, folder: Storage, digest: str) -> ShardResult:
    """Produce, check and write one shard. Runs on a Dask worker."""
    spec = PreprocessSpec.model_validate(spec_data)
    resumed = _resume(task, folder, digest)
    if resumed is not None:
        return resumed

    t0 = time.perf_counter()
    source = spec.source
    info = source.describe()
    ids, keys, params, skipped = [], [], [], []
    fields: dict[str, list[np.ndarray]] = {name: [] for name in info.fields}
    for sample in source.samples(task.sample_ids, spec.seed):
        where = f"{sample.source_key} (sample {sample.sample_id})"
        try:
            check_sample(sample, info, where)
        except BadSample as exc:
            if spec.on_bad_sample == "fail":
                raise
            skipped.append(
                {"sample_id": sample.sample_id, "source_key": sample.source_key, "reason": str(exc)}
            )
            continue
        ids.append(sample.sample_id)
        keys.append(sample.source_key)
        params.append(sample.parameters)
        for name in info.fields:
            fields[name].append(np.asarray(sample.fields[name], dtype=spec.dtype))
    t1 = time.perf_counter()

    shape = {name: (0, *fi.shape) for name, fi in info.fields.items()}
    arrays = {n: np.stack(v) if v else np.empty(shape[n], spec.dtype) for n, v in fields.items()}
    # Statistics of what is stored (after the cast to dtype), not of what was computed.
    stats = {name: FieldStats.of(a).state() for name, a in arrays.items()}
    data = encode_shard(ids, keys, params, arrays, spec.dtype)
    checksum = sha256(data)
    folder.write_bytes(folder.join(task.path), data)
    result = ShardResult(
        split=task.split,
        index=task.index,
        path=task.path,
        rows=len(ids),
        bytes=len(data),
        sha256=checksum,
        statistics=stats,
        skipped=skipped,
        produce_s=t1 - t0,
        write_s=time.perf_counter() - t1,
    )
    # The sidecar comes after the shard: a sidecar always vouches for a whole shard.
    folder.write_json(folder.join(task.sidecar), {"spec_digest": digest, **asdict(result)})
    return result


def _resume(task: ShardTask, folder: Storage, digest: str) -> ShardResult | None:
    """The recorded result of a finished shard whose file still verifies, else None."""
    sidecar, shard = folder.join(task.sidecar), folder.join(task.path)
    if not (folder.exists(sidecar) and folder.exists(shard)):
        return None
    try:
        record = folder.read_json(sidecar)
    except ValueError:
        return None
    if record.pop("spec_digest", None) != digest:
        return None
    if sha256(folder.read_bytes(shard)) != record.get("sha256"):
        return None
    record.update(resumed=True, produce_s=0.0, write_s=0.0)
    return ShardResult(**record)


ProgressFn = Callable[[int, int], None]


def run_preprocess(
    spec: PreprocessSpec,
    storage: Storage,
    dask_address: str | None = None,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    plan: tuple | None = None,
) -> PreprocessResult:
    """Build and publish the data set `spec` describes (no tracking; see `preprocess`);
    `plan`: `_plan`'s answer, when the caller has it already."""
    from distributed import as_completed

    from flows.runtime import dask_client

    t0 = time.perf_counter()
    folder, digest, existing, info, n_samples = plan or _plan(spec, storage)
    if existing is not None:
        return PreprocessResult(existing, folder.url, 0, 0, 0.0, 0.0, 0.0, True)
    tasks = plan_shards(n_samples, spec.test_fraction, spec.samples_per_task)
    if progress:
        progress(0, len(tasks))

    results: list[ShardResult] = []
    with dask_client(dask_address, workers) as client:
        futures = [
            client.submit(build_shard, task, spec.resolved(), folder, digest, pure=False)
            for task in tasks
        ]
        try:
            for future in as_completed(futures):
                results.append(future.result())
                if progress:
                    progress(len(results), len(tasks))
        except BaseException:
            client.cancel(futures)
            raise

    manifest = _manifest(spec, info, results, digest)
    publish_manifest(folder, manifest)  # the data set exists from here on
    folder.remove(folder.join(WORK), recursive=True)
    return PreprocessResult(
        manifest=manifest,
        folder=folder.url,
        shards_written=sum(not r.resumed for r in results),
        shards_resumed=sum(r.resumed for r in results),
        seconds=time.perf_counter() - t0,
        produce_s=sum(r.produce_s for r in results),
        write_s=sum(r.write_s for r in results),
    )


def _plan(spec: PreprocessSpec, storage: Storage):
    """(folder, digest, the manifest already published or None, the source's description,
    samples): what can refuse the job before any work, one `UserError` line each."""
    folder = version_folder(storage, spec.name, spec.version)
    digest = spec.digest()
    existing = _existing(folder, spec, digest)
    if existing is not None:
        return folder, digest, existing, None, 0
    info = spec.source.describe()
    n_samples = spec.samples or info.available or 0
    if info.available is not None and n_samples > info.available:
        raise UserError(
            f"samples: {n_samples} requested but {spec.ingest.path} holds {info.available}"
        )
    return folder, digest, None, info, n_samples


def _existing(folder: Storage, spec: PreprocessSpec, digest: str) -> DatasetManifest | None:
    if not folder.exists(folder.join("manifest.json")):
        return None
    manifest = read_manifest(folder)
    if manifest.spec_digest != digest:
        raise UserError(
            f"data set {spec.name} version {spec.version} is already published from a "
            f"different spec; choose another version (e.g. --set version=v2)"
        )
    return manifest


def _manifest(
    spec: PreprocessSpec, info: SourceInfo, results: list[ShardResult], digest: str
) -> DatasetManifest:
    results = sorted(results, key=lambda r: (SPLITS.index(r.split), r.index))
    splits: dict[str, Any] = {}
    for split in SPLITS:
        mine = [r for r in results if r.split == split]
        if not mine:
            continue
        stats = {}
        for name in info.fields:
            total = FieldStats()
            for r in mine:
                total = total.merge(FieldStats(**r.statistics[name]))
            stats[name] = total.summary()
        splits[split] = {
            "rows": sum(r.rows for r in mine),
            "shards": [
                {"path": r.path, "rows": r.rows, "bytes": r.bytes, "sha256": r.sha256} for r in mine
            ],
            "statistics": stats,
        }
    if splits.get("train", {}).get("rows", 0) == 0:
        raise UserError(f"data set {spec.name}: every training sample was skipped as bad")
    schema = _schema_text(info, spec.dtype)
    described = info.to_json()
    return DatasetManifest(
        name=spec.name,
        version=spec.version,
        pde=described["pde"],
        source={"kind": "simulation" if spec.simulation else "pdebench", **info.details},
        fields={k: {**v, "dtype": spec.dtype} for k, v in described["fields"].items()},
        grids=described["grids"],
        splits=splits,
        schema=schema,
        skipped=[s for r in results for s in r.skipped],
        spec=spec.resolved(),
        spec_digest=digest,
        created=utc_now(),
    )


def _schema_text(info: SourceInfo, dtype: str) -> str:
    """The shards' Arrow schema, as text, from an empty shard of the same shape."""
    fields = {name: np.zeros((0, *fi.shape), dtype) for name, fi in info.fields.items()}
    table = decode_shard(encode_shard([], [], [], fields, dtype))
    return table.schema.to_string(show_schema_metadata=False)


def preprocess(
    spec: PreprocessSpec,
    storage: Storage | None = None,
    dask_address: str | None = None,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> tuple[PreprocessResult, str | None]:
    """Run the job as an MLflow run in experiment `preprocess`; returns (result, run id).
    A data set already published from the same spec is left as it is, and no run opened
    (run id None)."""
    from flows import plots, tracking
    from flows.runtime import reporting_stops, sigterm_requests_stop

    storage = storage or Storage.from_env()
    run_name = f"{spec.name}-{spec.version}"
    plan = _plan(spec, storage)  # a refused job opens no MLflow run
    folder, _, existing, _, _ = plan
    if existing is not None:  # published from this spec: nothing to do, nothing to record
        return PreprocessResult(existing, folder.url, 0, 0, 0.0, 0.0, 0.0, True), None
    with (
        tracking.job_run(EXPERIMENT, run_name, spec.resolved()) as run,
        sigterm_requests_stop(interrupt=True) as terminated,  # as Ctrl-C: shards kept
    ):
        progress = reporting_stops(progress, terminated)
        run.set_tags(
            {
                "dataset.name": spec.name,
                "dataset.version": spec.version,
                "dataset.storage": storage.url,
            }
        )
        result = run_preprocess(spec, storage, dask_address, workers, progress, plan)
        seconds = max(result.seconds, 1e-9)
        run.log_metrics(
            {
                "samples": result.samples,
                "bytes": result.bytes,
                "seconds": result.seconds,
                "samples_per_s": result.samples / seconds if not result.already_published else 0.0,
                "shards_written": result.shards_written,
                "shards_resumed": result.shards_resumed,
                "samples_skipped": len(result.manifest.skipped),
            }
        )
        run.set_tags(
            {"dataset.url": result.folder, "dataset.already_published": result.already_published}
        )
        run.log_json(result.manifest.to_json(), "manifest.json")
        figure = plots.trajectories(Storage.at(result.folder), result.manifest)
        if figure is not None:
            run.log_figure(figure, "trajectories.png")
    return result, run.run_id
