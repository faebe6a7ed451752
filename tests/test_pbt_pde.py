"""A PDE population on a tiny diffusion–sorption set: each member a Ray actor with its own
expert actors and placement group, exploit copying the model's weights, the winner's
model registered."""

from __future__ import annotations

import mlflow
import pytest

from flows.pbt import PbtSpec, run_pbt
from flows.pbt_replay import replay
from flows.preprocess import PreprocessSpec, run_preprocess
from flows.runtime import start_local_ray
from flows.storage import Storage
from tests.test_train import DATA


@pytest.fixture(scope="module")
def ray_local():
    import ray

    start_local_ray(2)
    yield
    ray.shutdown()


def spec(**changes) -> PbtSpec:
    data = {
        "name": "pde-tiny",
        "trainable": "pde",
        "train": {
            "name": "pde-tiny",
            "dataset": "ds-tiny",
            "model": {"kind": "moe", "basis": 6, "width": 8, "modes": 4, "layers": 2,
                      "splits": [1, 2]},
            "constraint": {"max_iterations": 15, "collocation_points": 60},
            "training": {"steps": 4, "batch_size": 2, "lr": 3e-3},
            "experts": {"executor": "ray"},
        },
        "eval_samples": 2,
        "strategy": "exploit_only",
        "population": 2,
        "steps_per_member": 4,
        "ready_interval_steps": 2,
        "metric": "test_rel_l2",
        "mode": "min",
        "search_space": {
            "lr": {"prior": "log_uniform", "low": 1e-3, "high": 3e-2},
            "damping": {"prior": "log_uniform", "low": 1e-4, "high": 1e-2},
            "ridge": {"prior": "log_uniform", "low": 1e-6, "high": 1e-3},
            "collocation_points": {"prior": "int_uniform", "low": 30, "high": 90},
        },
        "initial": [
            {"lr": 1e-3, "damping": 1e-3, "ridge": 1e-4, "collocation_points": 60},
            {"lr": 3e-2, "damping": 1e-2, "ridge": 1e-6, "collocation_points": 30},
        ],
        "register_as": "pde-tiny-winner",
    }  # fmt: skip
    data.update(changes)
    return PbtSpec.model_validate(data)


def test_a_pde_population_owns_its_experts_copies_weights_and_registers(
    home, dask_address, ray_local
):
    import ray

    run_preprocess(PreprocessSpec.model_validate(DATA), Storage.from_env(), dask_address)
    groups: list[list[dict]] = []

    def watch(done, total, best):
        table = ray.util.placement_group_table().values()
        groups.append([g for g in table if g["state"] == "CREATED"])

    result = run_pbt(spec(), progress=watch)
    # while training: one placement group per member, a bundle per expert
    assert max(len(g) for g in groups) == 2
    assert all(len(g["bundles"]) == 2 for snapshot in groups for g in snapshot)
    # closed: none left behind
    table = ray.util.placement_group_table().values()
    assert not [g for g in table if g["state"] == "CREATED"]

    exploit = result.lineage["exploits"][0]
    m, donor, step = exploit["member"], exploit["donor"], exploit["step"]
    runs = mlflow.search_runs(
        experiment_names=["pde-tiny"],
        filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'",
        output_format="list",
    )
    ids = {int(r.data.tags["physflow.member"]): r.info.run_id for r in runs}
    loss = {
        k: {h.step: h.value for h in mlflow.MlflowClient().get_metric_history(ids[k], "loss")}
        for k in (m, donor)
    }
    assert loss[m][step] != loss[donor][step]  # different weights and settings before...
    assert loss[m][step + 1] == pytest.approx(loss[donor][step + 1], rel=1e-9)  # ...same after
    for key in ("hp.lr", "hp.damping", "hp.ridge", "hp.collocation_points"):
        history = mlflow.MlflowClient().get_metric_history(ids[m], key)
        assert len(history) == 4 and len({h.value for h in history}) == 2  # the copy shows

    assert result.registered == "pde-tiny-winner"
    model = mlflow.pytorch.load_model(result.model_uri)
    assert model.kind == "moe"
    versions = mlflow.MlflowClient().search_model_versions("name='pde-tiny-winner'")
    assert [v.run_id for v in versions] == [ids[result.winner]]

    # the winner's schedule, retrained in this process with its own experts
    again = replay(result.run_id)
    assert again.member == result.winner and again.steps == 4
    assert again.score == pytest.approx(again.recorded, rel=1e-3)


def test_a_missing_data_set_is_one_user_error_before_any_member_starts(home):
    """Not a member crash retried three times per member: the driver checks first."""
    from flows.errors import UserError

    with pytest.raises(UserError, match="data set 'ds-tiny' not found"):
        run_pbt(spec(), Storage.from_env())
    assert not Storage.from_env().exists(Storage.from_env().join("pbt", "pde-tiny"))


def test_a_model_the_data_set_cannot_hold_is_refused_before_any_member_starts(home, dask_address):
    """As `physflow train` refuses it: one line, not three restarts of every member."""
    from flows.errors import UserError

    run_preprocess(PreprocessSpec.model_validate(DATA), Storage.from_env(), dask_address)
    train = spec().train.resolved()
    train["model"]["splits"] = [1, 400]
    with pytest.raises(UserError, match=r"model.splits \[1, 400\]"):
        run_pbt(spec(train=train), Storage.from_env())
    assert not Storage.from_env().exists(Storage.from_env().join("pbt", "pde-tiny"))
