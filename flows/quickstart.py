"""`physflow run`: the whole path in one command — preprocess a data set, train a model on
it, evaluate it on the test split, register it, and say where to look.

The spec has a `preprocess` section and a `train` section (whose `dataset` defaults to the
preprocessed one). Re-running it reuses the published data set and continues the training
run from its last checkpoint.
"""

from __future__ import annotations

from pydantic import model_validator

from flows.errors import UserError
from flows.preprocess import PreprocessSpec, preprocess
from flows.spec import Spec
from flows.storage import Storage
from flows.train import TrainResult, TrainSpec, train, training_device


class RunSpec(Spec):
    preprocess: PreprocessSpec
    train: TrainSpec

    @model_validator(mode="before")
    @classmethod
    def _dataset_from_preprocess(cls, data):
        if isinstance(data, dict) and isinstance(data.get("train"), dict):
            pre = data.get("preprocess") or {}
            data["train"].setdefault("dataset", pre.get("name"))
        return data

    @model_validator(mode="after")
    def _same_pde(self) -> RunSpec:
        pre = self.preprocess
        if self.train.dataset != pre.name:
            raise ValueError(
                f"train.dataset: {self.train.dataset!r}, but physflow run trains on the data "
                f"set it publishes ({pre.name!r}); physflow train takes any other"
            )
        if self.train.dataset_version not in (None, pre.version):
            raise ValueError(
                f"train.dataset_version: {self.train.dataset_version!r}, but physflow run "
                f"trains on the version it publishes ({pre.version!r})"
            )
        if pre.test_fraction == 0:
            raise ValueError(
                "preprocess.test_fraction: 0 leaves no test split, which physflow run "
                "evaluates the model on"
            )
        simulated = self.preprocess.simulation
        if self.train.pde and simulated is not None and simulated.pde != self.train.pde:
            raise ValueError(
                f"train.pde is {self.train.pde}, but preprocess.simulation.pde is "
                f"{simulated.pde}: the model would be trained on another PDE's data"
            )
        return self


def run(
    spec: RunSpec,
    storage: Storage | None = None,
    preprocess_progress=None,
    train_progress=None,
    dask_address=None,
    workers=None,
    ray_address=None,
):
    storage = storage or Storage.from_env()
    training_device(spec.train)  # a device this machine lacks: said before any simulating
    try:
        data, _ = preprocess(spec.preprocess, storage, dask_address, workers, preprocess_progress)
    except UserError as exc:  # its keys are under preprocess. here
        raise UserError(str(exc).replace("--set version=", "--set preprocess.version=")) from None
    spec.train.dataset = data.folder
    result: TrainResult = train(
        spec.train, storage, resume="auto", progress=train_progress, ray_address=ray_address
    )
    return data, result
