"""The pure parts of PBT: priors and moves, exploit rules, explore, lineage schedules,
checkpoint retention, and the spec's checks on search spaces. No Ray."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from actors.pbt import Lineage, Param, SearchSpace, Segment, explore, tournament, truncation
from actors.pbt.ledger import CheckpointLedger
from actors.pbt.lineage import MemberRecord
from flows.errors import UserError
from flows.pbt import PbtSpec, search_space, starting_points
from flows.spec import validate

LR = Param("lr", "log_uniform", 1e-4, 1e-1)
WIDTH = Param("width", "choice", values=(16, 32, 64))
H = Param("h", "uniform", -1.0, 1.0, perturb="noise", noise=0.3)
POINTS = Param("points", "int_uniform", 10, 20)


def test_samples_stay_in_bounds_and_repeat_with_the_seed():
    space = SearchSpace((LR, WIDTH, H, POINTS))
    draws = [space.sample(np.random.default_rng(7)) for _ in range(2)]
    assert draws[0] == draws[1]
    many = [space.sample(np.random.default_rng(s)) for s in range(200)]
    assert all(1e-4 <= d["lr"] <= 1e-1 and d["width"] in (16, 32, 64) for d in many)
    assert all(isinstance(d["points"], int) and 10 <= d["points"] <= 20 for d in many)
    # log-uniform: about as many draws per decade
    decades = np.histogram([math.log10(d["lr"]) for d in many], bins=3, range=(-4, -1))[0]
    assert decades.min() > 40


def test_perturb_multiplies_clips_and_moves_to_neighbours():
    rng = np.random.default_rng(0)
    seen = {LR.perturb_value(1e-2, rng) for _ in range(50)}
    assert sorted({round(v, 12) for v, _ in seen}) == [8e-3, 1.2e-2]
    assert {op for _, op in seen} == {"x 0.8", "x 1.2"}
    assert LR.perturb_value(0.1, np.random.default_rng(1))[0] <= 0.1  # clipped to high
    moves = {WIDTH.perturb_value(32, np.random.default_rng(s))[0] for s in range(20)}
    assert moves == {16, 64}
    assert WIDTH.perturb_value(64, np.random.default_rng(3))[0] in (32, 64)  # at the end
    value, op = H.perturb_value(0.0, np.random.default_rng(0))
    assert value != 0.0 and op.startswith(("+", "-"))  # additive: 0 does not stay 0


def test_truncation_copies_the_bottom_from_the_top():
    scores = {0: 1.0, 1: 4.0, 2: 3.0, 3: 2.0, 4: None}
    decisions = truncation(scores, "max", 0.2, np.random.default_rng(0))
    assert [(d.member, d.donor) for d in decisions] == [(4, 1)]  # no score ranks last
    decisions = truncation(scores, "min", 0.4, np.random.default_rng(0))
    assert {d.member for d in decisions} == {4, 1}
    assert {d.donor for d in decisions} <= {0, 3}
    assert truncation({0: 1.0}, "max", 0.2, np.random.default_rng(0)) == []


def test_tournament_copies_only_from_a_better_rival():
    scores = {0: 1.0, 1: 2.0}
    decisions = tournament(scores, "max", np.random.default_rng(0))
    assert [(d.member, d.donor) for d in decisions] == [(0, 1)]
    many = tournament({m: float(m) for m in range(10)}, "max", np.random.default_rng(1))
    assert all(d.donor > d.member for d in many) and many


def test_explore_says_what_it_did():
    space = SearchSpace((LR, WIDTH))
    new, ops = explore({"lr": 1e-2, "width": 32}, space, np.random.default_rng(0), 0.0)
    assert ops["lr"] in ("x 0.8", "x 1.2") and ops["width"].startswith("neighbour")
    new, ops = explore({"lr": 1e-2, "width": 32}, space, np.random.default_rng(0), 1.0)
    assert ops == {"lr": "resample", "width": "resample"}


def test_schedule_follows_exploits_back_to_the_root():
    lineage = Lineage("q", "max")
    a, b = MemberRecord(0, seed=10), MemberRecord(1, seed=11)
    a.segments = [Segment(0, 4, {"h": 1}, 0.5), Segment(4, 8, {"h": 2}, 0.9)]
    b.segments = [
        Segment(0, 4, {"h": 0}, 0.1),
        Segment(4, 8, {"h": 1.5}, 0.8, {"kind": "exploit", "donor": 0}),
        Segment(8, 12, {"h": 1.6}, 1.0, {"kind": "continue"}),
    ]
    lineage.members = [a, b]
    seed, segments = lineage.schedule(1)
    assert seed == 10
    assert [(s.start, s.end, s.hparams["h"]) for s in segments] == [
        (0, 4, 1),
        (4, 8, 1.5),
        (8, 12, 1.6),
    ]
    again = Lineage.from_json(lineage.to_json())
    assert again.schedule(1) == (seed, segments)
    assert again.winner() == {"member": 1, "score": 1.0, "step": 12}


def test_schedule_takes_the_donor_segments_it_had_when_copied():
    """Asynchronous PBT: member 0 copies member 1 at its step 12; member 1 then copies
    member 2, which lags at step 8, and trains 8-12 again. Member 0's weights carry member
    1's first three segments, not the later 8-12 (by step alone the two are the same)."""
    lineage = Lineage("q", "max")
    m0, m1, m2 = (MemberRecord(k, seed=10 + k) for k in range(3))
    m1.segments = [
        Segment(0, 4, {"h": 1}, 0.1),
        Segment(4, 8, {"h": 1}, 0.2, {"kind": "continue"}),
        Segment(8, 12, {"h": 1}, 0.3, {"kind": "continue"}),
        Segment(8, 12, {"h": 5}, 0.4, {"kind": "exploit", "donor": 2, "donor_segments": 2}),
    ]
    m2.segments = [Segment(0, 4, {"h": 2}, 0.1), Segment(4, 8, {"h": 2}, 0.2)]
    m0.segments = [
        Segment(0, 12, {"h": 0}, 0.0),
        Segment(12, 16, {"h": 3}, 0.5, {"kind": "exploit", "donor": 1, "donor_segments": 3}),
    ]
    lineage.members = [m0, m1, m2]
    seed, segments = Lineage.from_json(lineage.to_json()).schedule(0)
    assert seed == 11
    assert [(s.start, s.end, s.hparams["h"]) for s in segments] == [
        (0, 4, 1), (4, 8, 1), (8, 12, 1), (12, 16, 3)
    ]  # fmt: skip
    # and member 1's own weights: member 2's two segments, then its copy's
    seed, segments = lineage.schedule(1)
    assert seed == 12 and [s.hparams["h"] for s in segments] == [2, 2, 5]


def test_a_checkpoint_is_kept_while_a_member_can_still_load_it():
    ledger = CheckpointLedger()
    ledger.set_latest(0, "a4")
    ledger.set_latest(1, "b4")
    ledger.set_latest(1, "a4")  # member 1 exploited member 0 at step 4
    assert ledger.release() == ["b4"]
    ledger.set_latest(0, "a8")
    assert ledger.release() == []  # a4 is still member 1's latest
    ledger.set_latest(1, "b8")
    assert ledger.release() == ["a4"]
    ledger.set_latest(0, "a12")
    assert ledger.release(keep=frozenset({"a8"})) == []


def test_a_step_saved_again_leaves_the_first_checkpoint_as_it_was(tmp_path):
    # Asynchronous PBT: member 0 copied at step 4 goes back to a lagging donor's step 2 and
    # reaches step 4 again, while the member that copied it may not have read it yet.
    from actors.pbt.member import Member
    from actors.pbt.toy import build
    from flows.storage import Storage

    store = Storage.at(str(tmp_path))
    member = Member(0, build, 0, {"lr": 0.05}, store, store.join("pbt"))
    first = member.train_until(4, {"h0": 1.0, "h1": 0.0})["checkpoint"]
    copied = pickle.loads(store.read_bytes(first))
    lagging = Member(1, build, 1, {"lr": 0.05}, store, store.join("pbt"))
    lagging.train_until(2, {"h0": 0.0, "h1": 1.0})
    member.load(lagging.state())
    again = member.train_until(4, {"h0": 0.0, "h1": 1.0})["checkpoint"]
    assert again != first
    assert pickle.loads(store.read_bytes(first)) == copied
    assert pickle.loads(store.read_bytes(again))["trainer"] != copied["trainer"]


BASE = {
    "name": "s",
    "metric": "q",
    "search_space": {"h0": {"prior": "uniform", "low": 0, "high": 1}},
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"search_space": {"lr": {"prior": "uniform", "low": 1, "high": 1}}},
         "search_space.lr: Value error, empty range"),
        ({"search_space": {"lr": {"prior": "log_uniform", "low": -1, "high": 1}}},
         "search_space.lr: Value error, a log scale needs bounds above 0"),
        ({"search_space": {"lr": {"prior": "log_uniform", "low": 0, "high": 1}}},
         "search_space.lr: Value error, a log scale needs bounds above 0"),
        ({"search_space": {"w": {"prior": "choice", "values": []}}},
         "search_space.w: Value error, a choice needs"),
        ({"search_space": {}}, "search_space: Value error, empty"),
        ({"initial": [{"nope": 1}]}, "initial[0].nope: not in search_space"),
        ({"trainable": "pde"}, "train: required by the pde trainable"),
        ({"trainable": "pde", "search_space": {"lr": {"prior": "uniform", "low": 0, "high": 1}},
          "train": {"name": "t", "dataset": "d", "training": {"device": "cuda"}}},
         "train.training.device: cuda is not supported"),
        ({"exploit": {"quantile": 0.7}}, "exploit.quantile"),
    ],
)  # fmt: skip
def test_bad_search_specs_name_the_key(change, message):
    with pytest.raises(UserError) as caught:
        validate(PbtSpec, {**BASE, **change}, "x.yaml")
    text = str(caught.value)
    assert message in text and "\n" not in text


def test_random_and_grid_starting_points():
    spec = PbtSpec.model_validate(
        {
            **BASE,
            "population": 4,
            "search_space": {
                "a": {"prior": "uniform", "low": 0, "high": 1},
                "b": {"prior": "log_uniform", "low": 1e-3, "high": 1e-1},
            },
            "initial": [{"a": 0.5}],
        }
    )
    space_ = search_space(spec)
    pbt = starting_points(spec, space_, np.random.default_rng(0))
    assert pbt[0]["a"] == 0.5 and len(pbt) == 4
    grid = starting_points(spec.model_copy(update={"initial": [], "strategy": "grid"}),
                           space_, np.random.default_rng(0))  # fmt: skip
    assert sorted({p["a"] for p in grid}) == [0.0, 1.0]
    assert sorted({round(p["b"], 6) for p in grid}) == [1e-3, 1e-1]
    rnd = starting_points(spec.model_copy(update={"strategy": "random"}), space_,
                          np.random.default_rng(0))  # fmt: skip
    assert len({p["a"] for p in rnd}) == 4


def test_a_diverged_member_does_not_take_the_lineage_plots_whole_colour_scale():
    from actors.pbt.lineage import draw

    lineage = Lineage("q", "max")
    members = [MemberRecord(i, seed=i) for i in range(4)]
    for i, m in enumerate(members):
        m.segments = [
            Segment(0, 4, {"h": i}, 1.0 + 0.05 * i),
            Segment(4, 8, {"h": i}, 1.1 + 0.02 * i),
        ]
    members[3].segments[1].score = -1.7e6  # diverged
    lineage.members = members
    fig = draw(lineage)
    colourbar = fig.axes[-1]
    low, high = colourbar.get_ylim()
    assert 0.9 < low < 1.1 < high < 1.2  # the healthy members' range, not -1.7e6 .. 1.2
