"""Compute runtimes: a Dask client for data preparation, embedded or on a cluster.

Not given an address (argument, `PHYSFLOW_DASK_ADDRESS` or `DASK_SCHEDULER_ADDRESS`), a
job starts a `LocalCluster` of single-threaded worker processes on 127.0.0.1 with no
dashboard, and stops it when the job ends. Given one, it joins that scheduler and leaves it
running.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from flows.errors import UserError

DASK_ADDRESS_VARS = ("PHYSFLOW_DASK_ADDRESS", "DASK_SCHEDULER_ADDRESS")


def dask_address(address: str | None = None) -> str | None:
    if address:
        return address
    for var in DASK_ADDRESS_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


@contextlib.contextmanager
def dask_client(address: str | None = None, workers: int | None = None) -> Iterator:
    """A connected `distributed.Client`: to `address` if set, else to a fresh LocalCluster."""
    from distributed import Client, LocalCluster

    # The scheduler's own chatter (e.g. on shutdown) is not the user's business.
    for name in ("distributed", "distributed.worker", "distributed.scheduler", "tornado"):
        logging.getLogger(name).setLevel(logging.ERROR)

    address = dask_address(address)
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1")
    if address:
        try:
            client = Client(address, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise UserError(f"Dask scheduler {address}: cannot connect ({exc})") from None
        try:
            yield client
        finally:
            client.close()
        return

    # One thread per worker process: simulations are numpy-bound and hold the GIL.
    cluster = LocalCluster(
        n_workers=workers or default_workers(),
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        # The scheduler still serves health/metrics over HTTP: loopback, any free port.
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        silence_logs=logging.ERROR,
        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
