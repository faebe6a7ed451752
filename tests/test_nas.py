"""Architecture search without Ray: super-networks, strategies against the exhaustively
evaluated truth of a tiny space, hypervolume against pymoo, determinism, export, spec errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pymoo.indicators.hv import HV

from actors.nas import (
    COUNTED,
    ElasticFNO,
    ElasticMLP,
    EvaluatorSetup,
    InProcessPool,
    LatencyOptions,
    Linas,
    NSGA2Search,
    RandomSearch,
    SubnetEvaluator,
    TrainOptions,
    digits_splits,
    front,
    hypervolume,
    measure_latency,
    pareto_mask,
    run_search,
    train_supernet,
)

OBJECTIVES = ["error", "macs"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks run fastest on one thread; the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """A trained super-network with 4 + 16 = 20 sub-networks, and the truth: every one of them
    evaluated on the validation split."""
    torch.manual_seed(0)
    splits = digits_splits(0)
    net = ElasticMLP(max_depth=2, widths=(8, 16, 24, 32))
    train_supernet(net, splits["train"], splits["validation"], TrainOptions(epochs=4))
    setup = EvaluatorSetup(net.checkpoint(), *splits["validation"], LatencyOptions(), False)
    evaluator = SubnetEvaluator(setup)
    truth = {net.space.key(c): evaluator.evaluate(c) for c in net.space.enumerate()}
    return net, evaluator, truth


def strategies(net, seed: int):
    space = net.space
    return {
        "random": RandomSearch(space, OBJECTIVES, seed),
        "nsga2": NSGA2Search(space, OBJECTIVES, seed, population=8),
        "linas": Linas(
            space, OBJECTIVES, seed, population=8, batch=4, inner_generations=10,
            counted=net.count, counted_names=COUNTED,
        ),
    }  # fmt: skip


def true_front(net, truth) -> set:
    keys = list(truth)
    values = np.array([[truth[k][o] for o in OBJECTIVES] for k in keys])
    return {k for k, m in zip(keys, pareto_mask(values), strict=True) if m}


@pytest.mark.parametrize("seed", [0, 2])
def test_digits_pixels_constant_in_training_are_only_centred(seed):
    """A pixel without ink in any training digit used to be divided by 1e-6: a test (seed
    0) or validation (seed 2) digit with ink there became 1e6."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    splits = digits_splits(seed)
    x, y = load_digits(return_X_y=True)
    x_train = train_test_split(x, y, test_size=0.4, random_state=seed, stratify=y)[0]
    constant = x_train.std(0) == 0
    assert constant.any()
    for name, (inputs, _) in splits.items():
        assert float(inputs.abs().max()) < 100, name
    assert float(splits["train"][0][:, torch.from_numpy(constant)].abs().max()) == 0.0


def test_pareto_mask_and_hypervolume_match_brute_force_and_pymoo():
    rng = np.random.default_rng(0)
    for d in (2, 3):
        points = rng.random((40, d))
        mask = pareto_mask(points)
        for i, p in enumerate(points):
            dominated = any(np.all(q <= p) and np.any(q < p) for q in points)
            assert mask[i] == (not dominated)
        reference = np.full(d, 0.9)  # some points lie beyond it and must add nothing
        assert hypervolume(points, reference) == pytest.approx(
            HV(ref_point=reference)(points[np.all(points < reference, axis=1)]), rel=1e-12
        )
    assert hypervolume(np.array([[2.0, 2.0]]), np.array([1.0, 1.0])) == 0.0


def test_digits_space_is_every_distinct_subnetwork_once():
    space = ElasticMLP().space
    assert space.size == 7 + 7**2 + 7**3 + 7**4
    # widths of layers a network does not have are not part of its identity
    a = {"depth": 1, "width_1": 16, "width_2": 96, "width_3": 8, "width_4": 48}
    b = {"depth": 1, "width_1": 16, "width_2": 8, "width_3": 24, "width_4": 8}
    assert space.key(a) == space.key(b)
    # sampling is uniform over distinct sub-networks, so depth 4 dominates (2401 of 2800)
    rng = np.random.default_rng(0)
    depths = [space.sample(rng)["depth"] for _ in range(2000)]
    assert 0.8 < np.mean(np.array(depths) == 4) < 0.915


@pytest.mark.parametrize("kind", ["random", "nsga2", "linas"])
def test_strategy_front_is_part_of_the_true_front(tiny, kind):
    net, evaluator, truth = tiny
    space = net.space
    outcome = run_search(
        strategies(net, seed=1)[kind], InProcessPool(evaluator), space, OBJECTIVES, space.size
    )
    keys = [space.key(r.config) for r in outcome.rows]
    assert len(keys) == len(set(keys)), "a sub-network was validated twice"
    found = front(outcome.rows, OBJECTIVES)
    assert found and {space.key(r.config) for r in found} <= true_front(net, truth)
    for r in outcome.rows:  # what the search recorded is what the sub-network measures
        assert r.measures == truth[space.key(r.config)]
    values = np.array([r.objectives(OBJECTIVES) for r in found])
    reference = values.max(0) * 1.1
    assert hypervolume(values, reference) == pytest.approx(HV(ref_point=reference)(values))


@pytest.mark.parametrize("kind", ["random", "nsga2", "linas"])
def test_same_seed_same_search(tiny, kind):
    net, evaluator, _ = tiny
    space = net.space
    budget = 12

    def search(seed: int):
        strategy = strategies(net, seed)[kind]
        rows = run_search(strategy, InProcessPool(evaluator), space, OBJECTIVES, budget).rows
        return [space.key(r.config) for r in rows], strategy

    first, strategy = search(3)
    again, _ = search(3)
    assert first == again and len(first) == budget
    assert search(4)[0] != first
    if kind == "linas":  # each refit's predictors were scored on the batch they chose
        assert strategy.quality and all(q["objective"] == "error" for q in strategy.quality)
        assert all(q["model"] in ("ridge", "svr") for q in strategy.quality)
        assert all(np.isfinite(q["mape"]) for q in strategy.quality)


def test_linas_ends_where_the_space_does(tiny):
    """A budget beyond a small space: every sub-network validated once, then the search
    ends (it used to fail on an empty batch); what it records of its predictors is strict
    JSON."""
    net, evaluator, _ = tiny
    small = net.space.restrict({name: list(c[:2]) for name, c in net.space.choices.items()})
    strategy = Linas(small, OBJECTIVES, 0, population=4, batch=8, inner_generations=5,
                     counted=net.count, counted_names=COUNTED)  # fmt: skip
    rows = run_search(strategy, InProcessPool(evaluator), small, OBJECTIVES, small.size + 5).rows
    assert sorted(small.key(r.config) for r in rows) == sorted(
        small.key(c) for c in small.enumerate()
    )
    json.dumps(strategy.quality, allow_nan=False)  # strict JSON: no NaN


def test_exported_mlp_equals_activated_subnetwork(tiny):
    net, _, _ = tiny
    x = digits_splits(0)["test"][0]
    for config in [net.space.largest(), net.space.smallest(), {"depth": 2, "width_1": 24,
                                                               "width_2": 8}]:  # fmt: skip
        with torch.no_grad():
            activated = net.activate(config)(x)
            exported = net.extract(config)(x)
        torch.testing.assert_close(exported, activated, rtol=0, atol=1e-6)
        sizes = [64, *(config[f"width_{i + 1}"] for i in range(config["depth"])), 10]
        macs = sum(a * b for a, b in zip(sizes, sizes[1:], strict=False))
        assert net.count(config) == {
            "params": sum(p.numel() for p in net.extract(config).parameters()),
            "macs": macs,
        }


def test_elastic_fno_shares_weights_and_exports_the_same_network():
    torch.manual_seed(0)
    net = ElasticFNO(grid=(9, 16), depths=(1, 2), widths=(4, 8), modes=(3, 5), padding=2)
    x = torch.randn(2, 3, 9, 16)
    for config in [net.space.smallest(), {"depth": 2, "width": 4, "modes": 5}]:
        exported = net.extract(config)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), net.activate(config)(x), rtol=0, atol=1e-6)
        assert net.count(config)["params"] == sum(p.numel() for p in exported.parameters())
    # a sub-network's gradient reaches only the weights it uses
    net.zero_grad()
    net.activate({"depth": 1, "width": 4, "modes": 3})(x).square().mean().backward()
    assert net.full.spectral[1].weight.grad is None
    lift = net.full.lift.weight.grad
    assert lift[:4].abs().sum() > 0 and lift[4:].abs().sum() == 0


def test_latency_is_a_median_and_spread_over_repeats():
    calls = []
    median, iqr = measure_latency(
        lambda: calls.append(1), LatencyOptions(warmup=3, repeats=9), torch.device("cpu")
    )
    assert len(calls) == 12 and median >= 0 and iqr >= 0
