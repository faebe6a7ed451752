"""One job at a time writes a run: the lease, on a local folder and on a real S3 store."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from flows.errors import JobFailure, UserError
from flows.lease import Lease
from flows.storage import Storage


def lease(storage: Storage, **kwargs) -> Lease:
    return Lease(storage, ("runs", "x", "checkpoints"), "run 'x'", **kwargs)


def a_dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_holder(storage: Storage, **fields) -> None:
    record = {"owner": "someone", "host": socket.gethostname(), "pid": os.getppid(),
              "since": "2026-01-01T00:00:00+00:00", "heard": time.time(), **fields}  # fmt: skip
    storage.write_json(storage.join("runs", "x", "checkpoints", "lease.json"), record)


def race(storage: Storage, jobs: int) -> tuple[list[Lease], list[Lease]]:
    """`jobs` threads taking the same lease at once: (those that hold it, those refused)."""
    start = threading.Barrier(jobs)
    won, refused = [], []

    def job() -> None:
        mine = lease(storage)
        start.wait()
        try:
            won.append(mine.acquire())
        except UserError:
            refused.append(mine)

    threads = [threading.Thread(target=job) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, refused


def test_a_second_job_is_refused_until_the_first_ends(tmp_path):
    storage = Storage.at(str(tmp_path))
    path = tmp_path / "runs/x/checkpoints/lease.json"
    with lease(storage):
        held = json.loads(path.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(UserError) as refused:
            lease(storage).acquire()
        message = str(refused.value)
        assert message.startswith("run 'x': another job is writing it (pid ")
        assert f"on {socket.gethostname()}" in message and "last heard 0 s ago" in message
        assert "\n" not in message
    assert not path.exists()  # given back
    with lease(storage):  # and then taken
        assert path.exists()
    assert not (tmp_path / "runs").exists()  # a job that wrote nothing leaves no trace
    path.parent.mkdir(parents=True)
    (path.parent / "step-0000001.pt").write_bytes(b"")
    with lease(storage):
        pass
    assert [p.name for p in path.parent.iterdir()] == ["step-0000001.pt"]  # only the lease goes


def test_of_jobs_starting_together_one_holds_the_run(tmp_path):
    storage = Storage.at(str(tmp_path))
    won, refused = race(storage, 8)
    assert len(won) == 1 and len(refused) == 7
    won[0].release()


@pytest.mark.parametrize(
    "holder",
    [{"heard": time.time() - 1000}, {"pid": "dead"}, {"heard": "not a time"}],
    ids=["not heard of for the ttl", "its process is gone", "unreadable"],
)
def test_a_dead_jobs_lease_is_taken_over(tmp_path, holder):
    storage = Storage.at(str(tmp_path))
    if holder.get("pid") == "dead":
        holder = {"pid": a_dead_pid()}
    write_holder(storage, **holder)
    with lease(storage) as mine:
        assert mine.holder()["owner"] == mine.owner


def test_of_jobs_finding_the_same_dead_lease_one_takes_it_over(tmp_path):
    storage = Storage.at(str(tmp_path))
    write_holder(storage, pid=a_dead_pid())
    won, refused = race(storage, 8)
    assert len(won) == 1 and len(refused) == 7
    assert won[0].holder()["owner"] == won[0].owner
    won[0].release()


def test_a_holder_that_was_away_looks_before_it_writes(tmp_path):
    """A machine suspended past the ttl: its heartbeat has not run yet, but the first
    write it attempts finds the job that took over, and stops."""
    storage = Storage.at(str(tmp_path))
    with lease(storage, beat_s=3600) as mine:
        mine.check()  # renewed just now: nothing to look at
        write_holder(storage)  # taken over while this one was away
        mine._heard_at -= 7200  # (away for two hours)
        with pytest.raises(JobFailure, match="another job took it over"):
            mine.check()
    assert mine.holder()["owner"] == "someone"


def test_a_live_process_of_this_host_keeps_its_lease_within_the_ttl(tmp_path):
    storage = Storage.at(str(tmp_path))
    write_holder(storage, heard=time.time() - 60)  # our parent: alive
    with pytest.raises(UserError, match="last heard 60 s ago"):
        lease(storage, ttl_s=90).acquire()


def test_the_holder_is_heard_and_stops_once_taken_over(tmp_path):
    storage = Storage.at(str(tmp_path))
    with lease(storage, beat_s=0.05) as mine:
        first = mine.holder()["heard"]
        time.sleep(0.3)
        assert mine.holder()["heard"] > first  # the heartbeat
        mine.check()  # still ours: nothing to say
        # another job takes it over (this one stalled past the ttl); should a heartbeat
        # already under way write over it, that job finds itself lost instead: again
        deadline = time.monotonic() + 5
        while not mine.lost:
            assert time.monotonic() < deadline
            write_holder(storage)
            time.sleep(0.2)
        with pytest.raises(JobFailure, match="run 'x': another job took it over"):
            mine.check()
        with pytest.raises(JobFailure):
            mine.guarding(None)()
    assert mine.holder()["owner"] == "someone"  # the other job's lease is left alone


def test_on_s3_the_last_writer_holds_the_run(s3_env):
    storage = Storage.from_env()
    first = Lease(storage, ("runs", "s3-lease"), "run 's3-lease'", settle_s=0.2)
    with first:
        with pytest.raises(UserError, match="run 's3-lease': another job is writing it"):
            Lease(storage, ("runs", "s3-lease"), "run 's3-lease'", settle_s=0.2).acquire()
        assert first.holder()["owner"] == first.owner
    assert not storage.exists(storage.join("runs", "s3-lease", "lease.json"))
    # two jobs that both saw no lease (b read before a wrote): the last writer goes on
    a = Lease(storage, ("runs", "s3-race"), "run 's3-race'", settle_s=0.5)
    b = Lease(storage, ("runs", "s3-race"), "run 's3-race'", settle_s=0.5)
    reads = []
    real_holder = b.holder

    def read_before_a_wrote():
        reads.append(1)
        return None if len(reads) == 1 else real_holder()

    b.holder = read_before_a_wrote
    outcome: dict[str, object] = {}

    def take(name: str, mine: Lease, delay: float) -> None:
        time.sleep(delay)
        try:
            outcome[name] = mine.acquire()
        except UserError as refused:
            outcome[name] = refused

    threads = [threading.Thread(target=take, args=("a", a, 0.0)),
               threading.Thread(target=take, args=("b", b, 0.1))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcome["b"] is b and isinstance(outcome["a"], UserError)
    b.release()
