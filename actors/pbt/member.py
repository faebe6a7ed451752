"""One population member: a long-lived Ray actor that holds a trainer between calls.

The controller asks it to train up to a step, to hand over its state, to take another
member's state (exploit, in memory through the object store), or to load a checkpoint
(restart, resume, asynchronous exploit). Keeping the actor alive across exploits is the
point: no process start, no restore from storage on the hot path.

`train_until(target, hparams)` is idempotent in its target: a call retried after the
member's process was replaced continues from the checkpoint it was restarted with and
stops at the same step.

Checkpoints: pickled `{"step", "hparams", "trainer": state_dict()}` written through
`store` (any object with `write_bytes(path, data)` and `read_bytes(path)`, e.g. physflow's
Storage: a local folder or S3, each write atomic) to
`<folder>/member-MMM/step-SSSSSSS-<token>.pkl`. The token makes every checkpoint a new
file: a member that has gone back to a lagging donor's step saves that step again, and
another member told to copy the first one's weights may not have read them yet.
"""

from __future__ import annotations

import pickle
import posixpath
import time
import uuid
from typing import Any

from actors.pbt.space import Value
from actors.pbt.trainable import Builder, check_trainer


class Member:
    def __init__(
        self,
        member: int,
        builder: Builder,
        seed: int,
        options: dict[str, Any],
        store: Any,
        folder: str,
        checkpoint: str | None = None,
    ):
        self.member, self.store, self.folder = member, store, folder
        self.trainer = builder(seed, options)
        check_trainer(self.trainer, getattr(builder, "__name__", str(builder)))
        self.step = 0
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)

    def ready(self) -> int:
        """The step this member is at (the controller waits on this after creating it)."""
        return self.step

    def train_until(
        self, target: int, hparams: dict[str, Value], load_from: str | None = None
    ) -> dict[str, Any]:
        """Steps up to `target` with `hparams` (first loading the checkpoint `load_from`, an
        exploit's donor's), then evaluate and checkpoint -> the report: per-step metrics,
        the final metrics, where the checkpoint is, and timings."""
        if load_from is not None:
            self.load_checkpoint(load_from)
        start, history, step_seconds = self.step, [], 0.0
        while self.step < target:
            t0 = time.perf_counter()
            metrics = self.trainer.step(dict(hparams))
            step_seconds += time.perf_counter() - t0
            self.step += 1
            history.append({k: float(v) for k, v in metrics.items()})
        t0 = time.perf_counter()
        final = dict(history[-1]) if history else {}
        evaluate = getattr(self.trainer, "evaluate", None)
        if evaluate is not None:
            final.update({k: float(v) for k, v in evaluate().items()})
        eval_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        path = self.save(hparams)
        return {
            "member": self.member,
            "start": start,
            "step": self.step,
            "history": history,
            "metrics": final,
            "checkpoint": path,
            "step_seconds": step_seconds,
            "eval_seconds": eval_seconds,
            "save_seconds": time.perf_counter() - t0,
            "placement_groups": list(getattr(self.trainer, "placement_groups", lambda: [])()),
        }

    def state(self) -> bytes:
        """The trainer's state and step, pickled (what exploit copies)."""
        return pickle.dumps({"step": self.step, "trainer": self.trainer.state_dict()}, protocol=5)

    def load(self, blob: bytes) -> int:
        data = pickle.loads(blob)
        self.trainer.load_state_dict(data["trainer"])
        self.step = int(data["step"])
        return self.step

    def load_checkpoint(self, path: str) -> int:
        return self.load(self.store.read_bytes(path))

    def save(self, hparams: dict[str, Value]) -> str:
        name = f"step-{self.step:07d}-{uuid.uuid4().hex[:8]}.pkl"
        path = posixpath.join(self.folder, f"member-{self.member:03d}", name)
        data = pickle.dumps(
            {"step": self.step, "hparams": dict(hparams), "trainer": self.trainer.state_dict()},
            protocol=5,
        )
        self.store.write_bytes(path, data)
        return path

    def model(self) -> Any:
        get = getattr(self.trainer, "model", None)
        return get() if get is not None else None

    def close(self) -> None:
        close = getattr(self.trainer, "close", None)
        if close is not None:
            close()
