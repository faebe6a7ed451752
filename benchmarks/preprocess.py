"""Preprocessing throughput: the same Navier–Stokes samples with 1 and with 2 Dask workers.

    python -m benchmarks.preprocess [--quick]

Each configuration runs on a LocalCluster started (and warmed up) before the clock starts,
so the figures are the job's own: simulate, check, encode, hash and write Parquet shards,
reduce statistics, publish the manifest. Prints a table, then one JSON line:
{"samples_per_s_1", "samples_per_s_2", "speedup_2_vs_1", "write_mb_per_s"}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from flows.preprocess import PreprocessSpec, run_preprocess
from flows.runtime import local_cluster
from flows.storage import Storage


def spec(quick: bool) -> PreprocessSpec:
    # Simulated on 256², stored on 64² (as the FNO data are made): T = 5, 64 frames.
    sim = {
        "pde": "navier-stokes",
        "resolution": 64,
        "sim_resolution": 256,
        "viscosity": 1e-4,
        "t_end": 5.0,
        "nt": 64,
    }
    samples = 16 if quick else 64
    return PreprocessSpec.model_validate(
        {
            "name": "bench-ns",
            "samples": samples,
            "test_fraction": 0.0,
            "samples_per_task": 1,
            "seed": 0,
            "simulation": sim,
        }
    )


def measure(job: PreprocessSpec, workers: int) -> dict:
    from distributed import Client

    from actors.pde import gaussian_random_field, navier_stokes

    def warm_up() -> None:
        import numpy as np

        w0 = gaussian_random_field(np.random.default_rng(0), 32)
        navier_stokes.simulate(w0, np.linspace(0, 0.05, 2))

    with local_cluster(workers) as cluster, Client(cluster) as client:
        client.run(warm_up)  # imports and FFT plans, off the clock
        with tempfile.TemporaryDirectory() as root:
            t0 = time.perf_counter()
            result = run_preprocess(job, Storage.at(root), dask_address=cluster.scheduler_address)
            wall = time.perf_counter() - t0
    return {
        "workers": workers,
        "samples": result.samples,
        "wall_s": wall,
        "samples_per_s": result.samples / wall,
        "mb": result.bytes / 1e6,
        "write_s": result.write_s,
        "produce_s": result.produce_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a one-minute run on 2 CPU cores")
    args = parser.parse_args()
    job = spec(args.quick)
    rows = [measure(job, 1), measure(job, 2)]
    print(
        f"{'workers':>7} {'samples':>7} {'wall s':>8} {'samples/s':>9} {'MB':>7} "
        f"{'simulate s':>10} {'write s':>8}"
    )
    for r in rows:
        print(
            f"{r['workers']:>7} {r['samples']:>7} {r['wall_s']:>8.2f} {r['samples_per_s']:>9.3f} "
            f"{r['mb']:>7.1f} {r['produce_s']:>10.2f} {r['write_s']:>8.3f}"
        )
    one, two = rows
    write_s = one["write_s"] + two["write_s"]
    figures = {
        "samples_per_s_1": round(one["samples_per_s"], 4),
        "samples_per_s_2": round(two["samples_per_s"], 4),
        "speedup_2_vs_1": round(two["samples_per_s"] / one["samples_per_s"], 3),
        "write_mb_per_s": round((one["mb"] + two["mb"]) / write_s, 2) if write_s else None,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
