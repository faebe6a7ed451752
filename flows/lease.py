"""One job at a time writes a run: a lease in storage, beside what the job writes.

Two jobs under the same name (a command run twice, a submission retried) would otherwise
both continue from the same checkpoint, overwrite each other's checkpoints and state, and
both register a model. The job that holds `<folder>/lease.json` writes; another is refused
with one line that names the holder:

    {"owner": <uuid>, "host": ..., "pid": ..., "since": <ISO time>, "heard": <epoch s>}

The holder rewrites `heard` every `beat_s` from a thread and removes the lease when it
ends, however it ends. A lease not heard of for `ttl_s` belongs to a job that died unseen
(a lost node, kill -9) and is taken over, at once when it names a process of this host
that no longer exists.

Taking a lease: on a local folder the file is created exclusively (a hard link to a file
written whole), so two jobs cannot both succeed. S3 has no such create; there the job
writes its lease, waits `settle_s` and reads it back: of jobs that saw no lease and wrote
at about the same time, the last write is what every one of them reads back, and only its
writer goes on. The window left is a job whose own read and write lie more than
`settle_s` apart.

A holder that finds someone else's lease at a heartbeat (it stalled past `ttl_s` and was
taken over) marks itself `lost`; the job checks that before its writes (training: before
each checkpoint and the model; PBT and NAS: at each round or validation committed) and
stops, so that the job now holding the run is not overwritten for long.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from flows.errors import JobFailure, UserError
from flows.storage import Storage

TTL_S = 90.0
BEAT_S = 15.0
SETTLE_S = 1.0


class Lease:
    """`with Lease(storage, ("runs", name), "run 'x'"):` the job holds that folder of the
    storage while inside; `what` names it in messages."""

    def __init__(
        self,
        storage: Storage,
        folder: tuple[str, ...],
        what: str,
        ttl_s: float = TTL_S,
        beat_s: float = BEAT_S,
        settle_s: float = SETTLE_S,
    ):
        self.storage = storage
        self.path = storage.join(*folder, "lease.json")
        self.what = what
        self.ttl_s, self.beat_s, self.settle_s = ttl_s, beat_s, settle_s
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread: threading.Thread | None = None
        self._made: list[str] = []  # local folders made for the lease, outermost first
        self._heard_at = 0.0  # wall-clock time of the last renewal (suspends count)

    # the holder's record -------------------------------------------------------------

    def _record(self, since: str | None = None) -> dict[str, Any]:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": since or now,
            "heard": time.time(),
        }

    def holder(self) -> dict[str, Any] | None:
        """The lease as stored, or None (none, or not a lease)."""
        try:
            data = json.loads(self.storage.read_bytes(self.path))
        except (FileNotFoundError, ValueError):
            return None
        return data if isinstance(data, dict) and "owner" in data else None

    def _gone(self, holder: dict[str, Any]) -> bool:
        """Whether `holder`'s job has ended: not heard of for ttl_s, or a process of this
        host that no longer exists."""
        heard = holder.get("heard")
        if not isinstance(heard, (int, float)) or time.time() - heard > self.ttl_s:
            return True
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False

    def _refuse(self, holder: dict[str, Any]) -> UserError:
        heard = holder.get("heard")
        ago = (
            f", last heard {time.time() - heard:.0f} s ago"
            if isinstance(heard, (int, float))
            else ""
        )
        return UserError(
            f"{self.what}: another job is writing it (pid {holder.get('pid')} on "
            f"{holder.get('host')}, since {holder.get('since')}{ago}); wait for it to end, or "
            f"stop it. A job that died unseen is taken over {self.ttl_s:.0f} s after it was "
            f"last heard"
        )

    # taking and giving back ----------------------------------------------------------

    def acquire(self) -> Lease:
        holder = self.holder()
        if holder is not None and holder["owner"] != self.owner and not self._gone(holder):
            raise self._refuse(holder)
        record = self._record()
        if self.storage.is_local:
            if holder is not None:  # a dead job's: removed, then taken like any other
                self._take_over_local(holder, record)
            else:
                self._create_local(record)
        else:
            self.storage.write_json(self.path, record)
            try:
                time.sleep(self.settle_s)
                now = self.holder()
            except BaseException:  # Ctrl-C, the store out of reach: no lease left behind
                self._remove_if(self.owner)
                raise
            if now is None or now["owner"] != self.owner:
                raise self._refuse(now or record)
        self._heard_at = time.time()
        self._since = record["since"]
        self._thread = threading.Thread(target=self._beat, name="physflow-lease", daemon=True)
        self._thread.start()
        return self

    def _create_local(self, record: dict[str, Any]) -> None:
        # written whole under a name of its own, then linked: a link fails if the name
        # exists, so of two jobs only one takes it, and no reader sees it half done
        self._made = _make_folders(os.path.dirname(self.path))
        tmp = f"{self.path}.{self.owner}"
        with open(tmp, "w") as f:
            json.dump(record, f)
        try:
            _create_exclusive(tmp, self.path, record)
        except FileExistsError:
            raise self._refuse(self.holder() or record) from None
        finally:
            os.unlink(tmp)

    def _take_over_local(self, dead: dict[str, Any], record: dict[str, Any]) -> None:
        """Remove a dead job's lease and create ours, one job at a time: two that both
        found it dead would otherwise each remove what the other had just created."""
        import fcntl

        with open(f"{self.path}.lock", "a") as lock:  # stays: the folder holds a lease
            fcntl.flock(lock, fcntl.LOCK_EX)  # per open file: threads of one process too
            now = self.holder()
            if now is not None and now["owner"] != dead["owner"]:
                raise self._refuse(now)  # another job took it over first
            if now is not None:
                self.storage.remove(self.path)
            self._create_local(record)

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                self._renew()
            except Exception:  # a store out of reach for a while: try again next beat
                continue
            if self._lost.is_set():
                return

    def _renew(self) -> None:
        holder = self.holder()
        if holder is None or holder["owner"] != self.owner:
            self._lost.set()
            return
        self.storage.write_json(self.path, self._record(self._since))
        self._heard_at = time.time()

    def _remove_if(self, owner: str) -> None:
        holder = self.holder()
        if holder is not None and holder["owner"] == owner:
            self.storage.remove(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if not self._lost.is_set():
                self._remove_if(self.owner)
            for folder in reversed(self._made):  # a job refused early leaves no trace
                try:
                    os.rmdir(folder)
                except OSError:  # not empty: the job wrote there
                    break

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def check(self) -> None:
        """Before a write: stop if another job has taken the run over. Where the lease has
        not been renewed for two beats (a machine suspended, a process stopped), it is
        looked at now: the flag may be older than the takeover."""
        if not self._lost.is_set() and time.time() - self._heard_at > 2 * self.beat_s:
            self._renew()
        if self._lost.is_set():
            raise JobFailure(
                f"{self.what}: another job took it over while this one was not heard of "
                f"for {self.ttl_s:.0f} s; this one stops without writing"
            )

    def guarding(self, report: Callable[..., None] | None) -> Callable[..., None]:
        """`report` (a progress callback, called where the job has committed a piece of
        work), made to stop the job there if another has taken the run over."""

        def call(*args) -> None:
            self.check()
            if report is not None:
                report(*args)

        return call

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _create_exclusive(written: str, path: str, record: dict[str, Any]) -> None:
    """`path` with `record` in it, or FileExistsError: a hard link to the file written
    whole; where the file system has no hard links, an exclusive create."""
    try:
        os.link(written, path)
    except FileExistsError:
        raise
    except OSError:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)


def _make_folders(path: str) -> list[str]:
    """`os.makedirs(path)`; returns the folders it made, outermost first."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    if missing:
        os.makedirs(missing[0], exist_ok=True)
    return missing[::-1]
