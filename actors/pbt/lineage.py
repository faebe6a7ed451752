"""The population's history: who trained which steps with which hyperparameters, and who
copied whom. It is written as JSON next to the search and is enough to replay the winner.

    members[m].segments = [Segment(start, end, hparams, score, origin), ...]

A segment is a run of steps with constant hyperparameters, ending at a ready point. Its
origin is "init" (the member's own start), "exploit" (weights and hyperparameters copied
from `donor` at the donor's step `start`, then explored; `donor_segments`: how many
segments the donor had then) or "explore" (the member's own weights, new
hyperparameters). Following origins backwards from a member gives the full schedule of
the weights it ends with (`schedule`), which `replay` trains again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from actors.pbt.space import Value


@dataclass
class Segment:
    start: int
    end: int
    hparams: dict[str, Value]
    score: float | None = None
    origin: dict[str, Any] = field(default_factory=lambda: {"kind": "init"})


@dataclass
class MemberRecord:
    member: int
    seed: int
    segments: list[Segment] = field(default_factory=list)
    status: str = "running"  # running | finished | failed
    restarts: int = 0
    run_id: str | None = None

    @property
    def step(self) -> int:
        return self.segments[-1].end if self.segments else 0


@dataclass
class Lineage:
    metric: str
    mode: str
    members: list[MemberRecord] = field(default_factory=list)
    exploits: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "members": [asdict(m) for m in self.members],
            "exploits": self.exploits,
            "winner": self.winner(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Lineage:
        members = [
            MemberRecord(
                member=m["member"],
                seed=m["seed"],
                segments=[Segment(**s) for s in m["segments"]],
                status=m.get("status", "running"),
                restarts=m.get("restarts", 0),
                run_id=m.get("run_id"),
            )
            for m in data["members"]
        ]
        return cls(data["metric"], data["mode"], members, list(data.get("exploits", [])))

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)

    def final_scores(self) -> dict[int, float | None]:
        return {
            m.member: (m.segments[-1].score if m.segments else None)
            for m in self.members
            if m.status != "failed"
        }

    def winner(self) -> dict[str, Any] | None:
        """The member with the best final score (ties: lowest index)."""
        from actors.pbt.policy import ranked

        scores = {k: v for k, v in self.final_scores().items() if v is not None}
        if not scores:
            return None
        best = ranked(scores, self.mode)[0]  # type: ignore[arg-type]
        return {"member": best, "score": scores[best], "step": self.members[best].step}

    def schedule(self, member: int) -> tuple[int, list[Segment]]:
        """(seed of the root ancestor, the segments that produced `member`'s final weights),
        oldest first."""
        out: list[Segment] = []
        m, segments = member, self.members[member].segments
        while True:
            record = self.members[m]
            chain = []
            for s in reversed(segments):
                chain.append(s)
                if s.origin.get("kind") == "exploit":
                    break
            out = list(reversed(chain)) + out
            first = chain[-1] if chain else None
            if first is None or first.origin.get("kind") != "exploit":
                return record.seed, out
            m = int(first.origin["donor"])
            donor = self.members[m].segments
            if "donor_segments" in first.origin:
                segments = donor[: int(first.origin["donor_segments"])]
            else:  # lineages written before the count was recorded: by step, which is
                # ambiguous once the donor has itself gone back to a lagging member's step
                segments = [s for s in donor if s.end <= first.start]


def draw(lineage: Lineage, title: str = ""):
    """Members over steps (one row each), segments coloured by their score, an arrow at
    each exploit from the donor's row to the member's; the winner's row in bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib import cm, colors

    scores = [s.score for m in lineage.members for s in m.segments if s.score is not None] or [0.0]
    # The scores within three inter-quartile ranges of the middle half: a diverged member
    # (-1e6 beside 1.2) would otherwise take the whole scale and paint the rest one colour.
    q1, q3 = np.percentile(scores, [25, 75])
    fenced = [v for v in scores if q1 - 3 * (q3 - q1) <= v <= q3 + 3 * (q3 - q1)]
    low, high = float(min(fenced)), float(max(fenced))
    norm = colors.Normalize(low, high if high > low else low + 1.0, clip=True)
    cmap = matplotlib.colormaps["viridis" if lineage.mode == "max" else "viridis_r"]
    height = 1.2 + 0.35 * len(lineage.members)
    fig, ax = plt.subplots(figsize=(8, min(height, 12)))
    winner = (lineage.winner() or {}).get("member")
    for m in lineage.members:
        for s in m.segments:
            colour = cmap(norm(s.score)) if s.score is not None else "lightgrey"
            width = 6 if m.member == winner else 4
            ax.plot([s.start, s.end], [m.member, m.member], color=colour, lw=width,
                    solid_capstyle="butt")  # fmt: skip
        if m.status == "failed":
            ax.plot([m.step], [m.member], "rx", ms=8)
    for e in lineage.exploits:
        ax.annotate(
            "",
            xy=(e["step"], e["member"]),
            xytext=(e.get("donor_step", e["step"]), e["donor"]),
            arrowprops={"arrowstyle": "->", "color": "0.3", "lw": 0.8},
        )
    ax.set_yticks([m.member for m in lineage.members])
    ax.set_yticklabels([f"member {m.member}" for m in lineage.members])
    ax.set_xlabel("step")
    ax.invert_yaxis()
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=lineage.metric)
    ax.set_title(title or f"lineage ({lineage.metric}, {lineage.mode})")
    fig.tight_layout()
    return fig
