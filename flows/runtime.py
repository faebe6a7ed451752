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
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from actors.heap import HEAP_ENV
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
    from distributed import Client

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

    with local_cluster(workers or default_workers()) as cluster:
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()


# One thread per worker process: simulations are numpy-bound and hold the GIL.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@contextlib.contextmanager
def local_cluster(workers: int) -> Iterator:
    """A LocalCluster of `workers` single-threaded processes on 127.0.0.1, no dashboard."""
    import dask
    from distributed import LocalCluster

    pre_spawn = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in HEAP_ENV.items()}
    with dask.config.set(pre_spawn), _workers_ignore_ctrl_c():
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            # The scheduler still serves health/metrics over HTTP: loopback, any free port.
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
            # A failed task is the driver's to report (one line); the workers' own log of it
            # (and of a lost scheduler on Ctrl-C) would come first, with a traceback.
            silence_logs=logging.CRITICAL,
            env=WORKER_ENV,
        )
    try:
        yield cluster
    finally:
        cluster.close()


@contextlib.contextmanager
def _workers_ignore_ctrl_c() -> Iterator[None]:
    """Spawn worker processes with SIGINT ignored (the disposition survives exec, and Python
    keeps it): Ctrl-C then reaches only the driver, which shuts the workers down cleanly
    instead of each printing its own KeyboardInterrupt traceback. The main thread blocks it
    meanwhile as well, so that a Ctrl-C it gets while the workers start is kept (Linux
    drops an ignored signal unless it is blocked) and arrives once the driver's handler is
    back. (One the kernel hands to another thread of the driver is still dropped.)"""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


_SIGTERM_CAME = threading.Event()  # inside a `sigterm_requests_stop`
_LOCAL_RAY_ENDED = threading.Event()  # by `ray_session`, after a SIGTERM


class Terminated(KeyboardInterrupt):
    """A SIGTERM (a stopped cluster job, a deleted pod, `kill`), acted on where the work
    can stop cleanly; an interrupt, as Ctrl-C is, to whoever catches it."""


@contextlib.contextmanager
def sigterm_requests_stop(interrupt: bool = False) -> Iterator[Callable[[], bool]]:
    """While inside, SIGTERM no longer ends the process: it is noted, and the function
    yielded says whether it came, for the work to stop at its next safe point (a training
    step's end). With `interrupt`, SIGTERM also raises `Terminated` where the main thread
    is, as Ctrl-C raises KeyboardInterrupt, for work whose every committed state is safe
    to stop at (a search commits after each round); a raise that lands where Python
    swallows exceptions (a finaliser, a weakref callback) is then caught at the next safe
    point by the function yielded. Ray's waits hand the raise back as a plain
    KeyboardInterrupt: leaving, it is a `Terminated` again. Enter it before `ray_session`,
    which puts it back over the handler of Ray's core worker (that one would dump native
    stack traces and end the process). Outside the main thread, where no handler can be
    set: never."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    came = _SIGTERM_CAME
    came.clear()

    def note(signum, frame) -> None:
        came.set()
        if interrupt:
            raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, note)
    try:
        yield came.is_set
    except KeyboardInterrupt as stop:
        if interrupt and came.is_set() and not isinstance(stop, Terminated):
            raise Terminated("SIGTERM") from None  # from one of Ray's waits
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        came.clear()


@contextlib.contextmanager
def interrupts_deferred(held_at_most: int | None = None, notice: str = "") -> Iterator[None]:
    """Ctrl-C and SIGTERM wait for the block to end: for a change that must happen whole
    (an optimiser's update and the step count that names it, saved together on an
    interrupt). With `held_at_most`, the one after that many arrives at once (a save that
    hangs on a store out of reach can still be abandoned); `notice` is said when the first
    is held. Outside the main thread, where no handler can be set: as it is."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []

    def restore() -> None:
        for s, h in kept.items():
            signal.signal(s, h)

    def hold(signum, frame) -> None:
        came.append(signum)
        if held_at_most is not None and len(came) > held_at_most:
            restore()
            signal.raise_signal(signum)
        elif notice and len(came) == 1:
            sys.stderr.write(notice + "\n")

    # a handler set outside Python (None) cannot be put back: left as it is
    kept = {s: h for s in (signal.SIGINT, signal.SIGTERM) if (h := signal.getsignal(s)) is not None}
    for s in kept:
        signal.signal(s, hold)
    try:
        yield
    finally:
        restore()
        # SIGTERM first: what raises ends the loop, and a stop asked for by the cluster
        # (143) says more than a Ctrl-C that came with it
        for s in sorted(set(came), key=lambda s: s != signal.SIGTERM):
            signal.raise_signal(s)


def reporting_stops(report: Callable[..., None] | None, terminated: Callable[[], bool]):
    """`report` (a progress callback, called where the work has committed what it did),
    made a safe point: there a SIGTERM whose raise was swallowed raises `Terminated`."""

    def call(*args) -> None:
        if report is not None:
            report(*args)
        if terminated():
            raise Terminated("SIGTERM")

    return call


# Ray -----------------------------------------------------------------------------------

RAY_ADDRESS_VAR = "RAY_ADDRESS"
LOOPBACK = ("127.0.0.1", "localhost")


@contextlib.contextmanager
def _token_auth_notice_hidden() -> Iterator[None]:
    """Without Ray's notice that token authentication is on by default (printed at every
    start or join): physflow wants it on. A warning that it is off is never hidden."""
    notices = logging.getLogger("ray._private.authentication.authentication_token_setup")

    def enabled_notice(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")

    notices.addFilter(enabled_notice)
    try:
        yield
    finally:
        notices.removeFilter(enabled_notice)


@contextlib.contextmanager
def _single_machine_mode() -> Iterator[None]:
    """Ray's single-machine mode (its default on macOS and Windows) while inside: a Ray
    started listens on 127.0.0.1 alone (otherwise on every interface, its agents on this
    host's address), and a Ray at 127.0.0.1 is joined there (otherwise at this host's
    address, where it does not listen)."""
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved = os.environ.get(name)
    os.environ[name] = "0"  # for the processes it starts
    ray_constants.ENABLE_RAY_CLUSTER, cluster = False, ray_constants.ENABLE_RAY_CLUSTER
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster
        if saved is None:
            os.environ.pop(name)
        else:
            os.environ[name] = saved


def start_local_ray(num_cpus: int) -> str:
    """A new Ray on this machine (never one already running here), on 127.0.0.1, without a
    dashboard, quiet; returns its GCS address."""
    import ray

    # every process of it, the GCS, raylet, agents and workers, on 127.0.0.1 alone
    with _single_machine_mode(), _token_auth_notice_hidden():
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
        address = ray.get_runtime_context().gcs_address  # with 127.0.0.1, not this host's
    # the token Ray generates for it (the default path) is written readable by all users
    token = Path.home() / ".ray" / "auth_token"
    if "RAY_AUTH_TOKEN_PATH" not in os.environ and token.is_file():
        if token.stat().st_mode & 0o077:
            token.chmod(0o600)
    return address


def ray_is_ending() -> bool:
    """Whether a SIGTERM came and the Ray is this process's own. `timeout`, Slurm's scancel
    and systemd send it to the whole process group, raylet and GCS included: a call to
    Ray may then hang for a minute and end the process. The job's cleanup skips Ray, and
    `ray_session` ends this Ray's processes itself."""
    return _SIGTERM_CAME.is_set() and _started_here()


def _started_here() -> bool:
    try:
        import ray

        node = ray._private.worker._global_node
        return node is not None and node.head  # not a cluster joined
    except Exception:  # Ray's internals moved
        return False


def _end_local_ray() -> None:
    """Kill this process's Ray without a word to it (no GCS call), and keep Ray's exit hook
    from waiting on it."""
    import atexit

    import ray

    try:
        ray._private.worker._global_node.kill_all_processes(check_alive=False,
                                                            allow_graceful=False)  # fmt: skip
    except Exception:  # Ray's internals moved: its processes end with this one
        pass
    atexit.unregister(ray.shutdown)
    _LOCAL_RAY_ENDED.set()


def local_ray_ended() -> bool:
    """Whether this process ended its own Ray after a SIGTERM: Ray's core worker, left
    behind, would crash the interpreter's exit (exit with `os._exit`)."""
    return _LOCAL_RAY_ENDED.is_set()


@contextlib.contextmanager
def _sigterm_handler_kept() -> Iterator[None]:
    """Ray's core worker takes SIGTERM when it starts (to dump stack traces and end the
    process): a handler of the job's own (`sigterm_requests_stop`) is put back."""
    import signal

    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(handler):
            signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def ray_session(address: str | None = None, enabled: bool = True) -> Iterator[None]:
    """Ray for the length of a job: joined at `address` / `RAY_ADDRESS` (a cluster with its
    own token authentication, read by Ray from the environment), else started locally on
    127.0.0.1 sized to this machine, without a dashboard. A Ray already initialised in this
    process (a driver submitted as a Ray job, a test) is used as it is and left running."""
    if not enabled:
        yield
        return
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get(RAY_ADDRESS_VAR)
    try:
        with _sigterm_handler_kept():
            if address:
                host = address.rsplit("://", 1)[-1].rsplit(":", 1)[0]
                here = _single_machine_mode() if host in LOOPBACK else contextlib.nullcontext()
                with here, _token_auth_notice_hidden():
                    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            else:
                start_local_ray(os.cpu_count() or 1)
    except ConnectionError as exc:
        raise UserError(f"Ray cluster {address}: cannot connect ({exc})") from None
    try:
        yield
    except BaseException as exc:
        # The frames it left hold actor handles; let go of them while Ray still runs, or
        # Ray logs a failure for each when they are collected after it has stopped.
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        if ray_is_ending():
            _end_local_ray()
        else:
            ray.shutdown()
