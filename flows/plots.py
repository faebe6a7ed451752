"""Figures people would rather look at than read: a few trajectories of a data set."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on workers, CI or clusters

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flows.datasets import Dataset, DatasetManifest  # noqa: E402
from flows.storage import Storage  # noqa: E402


def trajectories(folder: Storage, manifest: DatasetManifest, count: int = 4):
    """Space–time heatmaps of the first `count` training samples (1-D fields), or
    snapshots of the first sample at `count` times (2-D fields). None if there is no data."""
    dataset = Dataset(folder, manifest)
    split = manifest.splits.get("train")
    if split is None or not split.shards:
        return None
    table = dataset.read_shard(split.shards[0])
    from flows.shards import field_array

    name = next(iter(manifest.fields))
    values = field_array(table, name)  # (rows, nt, nx) or (rows, nt, nx, ny)
    ids = table.column("sample_id").to_numpy()
    if len(values) == 0:
        return None
    t = np.asarray(manifest.grids["t"])
    vmin, vmax = float(values.min()), float(values.max())

    if values.ndim == 3:
        n = min(count, len(values))
        x = np.asarray(manifest.grids["x"])
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.0), squeeze=False, sharey=True)
        for k, ax in enumerate(axes[0]):
            image = ax.imshow(
                values[k],
                origin="lower",
                aspect="auto",
                vmin=vmin,
                vmax=vmax,
                extent=(x[0], x[-1], t[0], t[-1]),
                cmap="viridis",
            )
            ax.set_title(f"sample {ids[k]}")
            ax.set_xlabel("x")
        axes[0][0].set_ylabel("t")
    else:
        frames = np.linspace(0, values.shape[1] - 1, min(count, values.shape[1])).astype(int)
        fig, axes = plt.subplots(1, len(frames), figsize=(3.2 * len(frames), 3.0), squeeze=False)
        for ax, f in zip(axes[0], frames, strict=True):
            image = ax.imshow(
                values[0, f].T,
                origin="lower",
                vmin=vmin,
                vmax=vmax,
                extent=(0, 1, 0, 1),
                cmap="RdBu_r",
            )
            ax.set_title(f"sample {ids[0]}, t = {t[f]:.3g}")
            ax.set_xlabel("x")
        axes[0][0].set_ylabel("y")
    fig.colorbar(image, ax=axes[0].tolist(), label=name, shrink=0.9)
    fig.suptitle(f"{manifest.name} {manifest.version} — {manifest.pde['name']}")
    return fig


def prediction(u: np.ndarray, truth: np.ndarray, problem) -> plt.Figure:
    """Prediction, truth and absolute error of one test sample: (t, x) heatmaps for 1-D
    fields, the last time's (x, y) field for 2-D ones."""
    t = np.asarray(problem.grids["t"])
    if u.ndim == 3:  # (nt, nx, ny): show the final time
        u, truth = u[-1].T, truth[-1].T
        extent, xlabel, ylabel = (0, 1, 0, 1), "x", "y"
        title = f"t = {t[-1]:.3g}"
    else:
        x = np.asarray(problem.grids["x"])
        extent, xlabel, ylabel, title = (x[0], x[-1], t[0], t[-1]), "x", "t", ""
    error = np.abs(u - truth)
    rel = np.linalg.norm(u - truth) / np.linalg.norm(truth)
    vmin, vmax = float(truth.min()), float(truth.max())
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, values, name, cmap, limits in (
        (axes[0], u, "prediction", "viridis", (vmin, vmax)),
        (axes[1], truth, "truth", "viridis", (vmin, vmax)),
        (axes[2], error, "|error|", "magma", (0, float(error.max()))),
    ):
        image = ax.imshow(
            values,
            origin="lower",
            aspect="auto",
            extent=extent,
            cmap=cmap,
            vmin=limits[0],
            vmax=limits[1],
        )
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        fig.colorbar(image, ax=ax, shrink=0.85)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(f"test sample — relative L2 {rel:.2%} {title}")
    fig.tight_layout()
    return fig
