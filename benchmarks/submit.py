"""What going to a cluster costs: the same small job run embedded and submitted to a local
Ray head (token auth, 127.0.0.1), and what `make k8s-check` covers.

- submit-to-running: from the `submit_job` call to the job's status turning RUNNING
  (spec and code packaged and uploaded, runtime environment set up, driver started);
- overhead: wall time of the submitted job (submit → SUCCEEDED) over the same command run
  embedded in a subprocess here, both in this run, alternating;
- the number of rendered manifests, the checks run and the skips with their reasons.

    python -m benchmarks.submit [--quick]     # table, then one JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from unittest import mock

SPEC = """
name: {name}
samples: {samples}
samples_per_task: 4
test_fraction: 0.25
simulation: {{pde: diffusion-sorption, nx: 64, nt: 11, t_end: 100.0}}
"""


def embedded(spec: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [str(Path(sys.executable).parent / "physflow"), "preprocess", str(spec), "--workers", "1"],
        env={**os.environ, **env},
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def submitted(spec: Path, env: dict[str, str]) -> tuple[float, float]:
    """(submit-to-running, submit-to-succeeded) seconds."""
    from flows.submit import RayJobs, outcome, prepare

    with mock.patch.dict(os.environ, env):
        jobs = RayJobs()
        sub = prepare(spec, args=["--workers", "1"], submission_id=f"bench-{uuid.uuid4().hex}")
        start = time.perf_counter()
        sid = jobs.submit(sub)
        jobs.wait_running(sid)
        running = time.perf_counter() - start
        state = jobs.state(sid)
        while not state.terminal:
            time.sleep(0.05)
            state = jobs.state(sid)
        total = time.perf_counter() - start
        outcome(state)
        return running, total


def manifest_figures() -> dict:
    from infra import k8s_check

    checkov = os.environ.get("CHECKOV") or shutil.which(
        "checkov", path=str(Path(__file__).parents[1] / ".venv-checkov" / "bin")
    )
    overlays = sorted(
        p for p in k8s_check.OVERLAYS.iterdir() if (p / "kustomization.yaml").is_file()
    )
    report = k8s_check.check(overlays, k8s_check.SCHEMAS, checkov=checkov)
    return report.summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round, about a minute")
    args = parser.parse_args()
    rounds, samples = (1, 8) if args.quick else (3, 32)

    from infra.services import start_ray_head

    work = Path(tempfile.mkdtemp(prefix="physflow-bench-"))
    token = uuid.uuid4().hex
    head = start_ray_head(work / "ray", token, num_cpus=os.cpu_count())
    try:
        client_env = {**head.env, "PHYSFLOW_HOME": str(work / "home")}
        times = {"embedded": [], "submitted": [], "to_running": []}
        for i in range(rounds):
            for mode in ("embedded", "submitted") if i % 2 == 0 else ("submitted", "embedded"):
                name = f"bench-{mode}-{i}"
                spec = work / f"{name}.yaml"
                spec.write_text(SPEC.format(name=name, samples=samples))
                job_env = {
                    **client_env,
                    "PHYSFLOW_STORAGE": str(work / "store"),
                    "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
                }
                if mode == "embedded":
                    times["embedded"].append(embedded(spec, job_env))
                else:
                    running, total = submitted(spec, job_env)
                    times["to_running"].append(running)
                    times["submitted"].append(total)
    finally:
        head.stop()
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    figures = manifest_figures()
    print(f"{'what':<28}{'seconds':>10}")
    print(f"{'submit -> RUNNING':<28}{med['to_running']:>10.2f}")
    print(f"{'submitted (submit -> end)':<28}{med['submitted']:>10.2f}")
    print(f"{'embedded (same command)':<28}{med['embedded']:>10.2f}")
    print(f"overhead ratio submitted / embedded: {med['submitted'] / med['embedded']:.2f}")
    print(
        f"manifests {figures['manifests']} in {len(figures['overlays'])} overlays; "
        f"checks: {', '.join(figures['checks'])}; failures {figures['failures']}"
    )
    for rule, reason in figures["skips"].items():
        print(f"  skip {rule}: {reason}")
    print(
        json.dumps(
            {
                "submit_to_running_s": round(med["to_running"], 3),
                "submitted_s": round(med["submitted"], 3),
                "embedded_s": round(med["embedded"], 3),
                "overhead_ratio": round(med["submitted"] / med["embedded"], 3),
                "rounds": rounds,
                "manifests": figures["manifests"],
                "checks": len(figures["checks"]),
                "check_names": figures["checks"],
                "check_failures": figures["failures"],
                "skips": figures["skips"],
            }
        )
    )


if __name__ == "__main__":
    main()
