"""Train the experiment's missing runs in parallel lanes on one machine (a GPU, or a CPU with cores to spare).

    python experiments/skills_lanes.py [--work experiments/skills] [--seeds 0,1,2,3,4] [--tune-seeds 0]
        [--lanes 8] [--dry-run] [compare.py options ...]

Input: the built worlds and the cached runs under WORK/runs, the tuning seeds' lr grid complete (skills.py makes
both); the same compare.py options skills.py takes (its DEFAULTS where none are given).
Output: each missing run's WORK/runs/NAME/result.json, made as skills.py would make it (the same settings, each
method at the lr the tuning seeds chose), --lanes runs at a time; then `skills.py --report-only` or
skills_report.py reports them.  A seed's runs are split into lanes by grouping (the sftgo runs of each grouping,
then dft, rho1 and weighted), so one GPU trains several small runs at once.  Each lane's log is WORK/lanes/*.log.
`weighted` needs the mean group weight of its seed's sftgo run (first grouping, λ 0.9).  A result cached before
results kept that ratio (`group_weight_ratio`), whose training log did not travel with it, has its run trained
again with the same settings under WORK/reruns (its result is kept there: the two machines' runs can be compared),
and the ratio of that rerun is used.
Exit status 1 when any run is still missing at the end, naming them.
Cost: the missing runs (and any reruns), --lanes at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402
import skills  # noqa: E402


def settings(argv=None) -> tuple[argparse.Namespace, argparse.Namespace]:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=(
            "example: python experiments/skills_lanes.py --lanes 10 --dry-run (the plan), then without --dry-run; "
            "then python experiments/skills.py --report-only && python experiments/skills_report.py"
        ),
    )
    ap.add_argument("--work", default="experiments/skills")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--tune-seeds", default="0")
    ap.add_argument("--lanes", type=int, default=8)
    ap.add_argument("--dry-run", action="store_true", help="print the lanes and train nothing")
    ap.add_argument("--lane", help=argparse.SUPPRESS)  # internal: a JSON list of runs for one lane process
    args, rest = ap.parse_known_args(argv)
    if args.lanes < 1:
        ap.error(f"--lanes must be at least 1, not {args.lanes}")
    return args, compare.parse(skills.compare_argv(Path(args.work), args.seeds, args.tune_seeds, rest))


def plan(cargs) -> list[list[dict]]:
    """The lanes: lists of {"name", "seed", "lr", "rerun"} to train in order, one list per process."""
    work = Path(cargs.work)
    specs = compare.method_specs(cargs.methods.split(","), cargs.groups.split(","), cargs.lams.split(","))
    tune = [int(s) for s in cargs.tune_seeds.split(",")]

    def done(spec, seed: int, lr: float) -> Path:
        return work / "runs" / dataclasses.replace(spec, seed=seed, lr=lr).key / "result.json"

    grid = [done(s, seed, float(lr)) for s in specs for seed in tune for lr in cargs.lrs.split(",")]
    if missing := [str(p.parent.name) for p in grid if not p.exists()]:
        raise SystemExit(
            f"Error: the tuning seeds' lr grid is not complete ({len(missing)} run(s), e.g. {missing[0]}): "
            "train it with experiments/skills.py first."
        )
    lrs = compare.pick_lrs([json.loads(p.read_text()) for p in grid], set(tune), cargs.select)
    base = f"sftgo-{cargs.groups.split(',')[0]}"
    lanes: dict[tuple[int, str], list[dict]] = {}
    for seed in (int(s) for s in cargs.seeds.split(",") if int(s) not in tune):
        for spec in specs:
            if done(spec, seed, lrs[spec.name]).exists():
                continue
            family = spec.groups if spec.objective == "sftgo" and spec.name != base else "baselines"
            lane = lanes.setdefault((seed, family), [])
            if spec.objective == "weighted":
                result = done(next(s for s in specs if s.name == base), seed, lrs[base])
                kept = result.exists() and json.loads(result.read_text()).get("group_weight_ratio") is not None
                if result.exists() and not kept and not (result.parent / "metrics.jsonl").exists():
                    lane.insert(0, {"name": base, "seed": seed, "lr": lrs[base], "rerun": True})
            lane.append({"name": spec.name, "seed": seed, "lr": lrs[spec.name], "rerun": False})
    return [lane for lane in lanes.values() if lane]


def run_lane(cargs, lane: list[dict]) -> None:
    """Train one lane's runs in order (compare.one_run, which caches each result)."""
    specs = {
        s.name: s
        for s in compare.method_specs(cargs.methods.split(","), cargs.groups.split(","), cargs.lams.split(","))
    }
    work = Path(cargs.work)
    for job in lane:
        spec = dataclasses.replace(specs[job["name"]], seed=job["seed"], lr=job["lr"])
        if job["rerun"]:  # the same run again, elsewhere, for its training log
            compare.one_run(argparse.Namespace(**{**vars(cargs), "work": str(work / "reruns")}), spec)
            shutil.copyfile(
                work / "reruns" / "runs" / spec.key / "metrics.jsonl", work / "runs" / spec.key / "metrics.jsonl"
            )
        else:
            compare.one_run(cargs, spec)
        print(f"done {spec.key}{' (rerun)' if job['rerun'] else ''}", file=sys.stderr, flush=True)


def main(argv=None) -> None:
    args, cargs = settings(argv)
    if args.lane:
        return run_lane(cargs, json.loads(args.lane))
    lanes = plan(cargs)
    todo = [f"{j['name']}-s{j['seed']}" for lane in lanes for j in lane if not j["rerun"]]
    print(f"{len(todo)} run(s) to train in {len(lanes)} lane(s), {args.lanes} at a time", file=sys.stderr, flush=True)
    if args.dry_run:
        for lane in lanes:
            print(
                " -> ".join(f"{j['name']}-s{j['seed']}-lr{j['lr']:g}{' (rerun)' if j['rerun'] else ''}" for j in lane)
            )
        return
    logs = Path(cargs.work) / "lanes"
    logs.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.lanes))),
    }
    forwarded = list(argv if argv is not None else sys.argv[1:])

    def one(k: int, lane: list[dict]) -> int:
        with (logs / f"lane-{k}.log").open("w") as log:
            return subprocess.run(
                [sys.executable, __file__, *forwarded, "--lane", json.dumps(lane)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            ).returncode

    with ThreadPoolExecutor(max_workers=args.lanes) as pool:
        codes = list(pool.map(one, range(len(lanes)), lanes))
    failed = [k for k, code in enumerate(codes) if code != 0]
    left = [t for lane in plan(cargs) for t in (f"{j['name']}-s{j['seed']}" for j in lane if not j["rerun"])]
    print(
        f"{len(todo) - len(left)} of {len(todo)} run(s) trained"
        + (f"; lanes {failed} failed (see {logs})" if failed else ""),
        file=sys.stderr,
    )
    if left:
        raise SystemExit(f"Error: {len(left)} run(s) still missing: {', '.join(left)}.")


if __name__ == "__main__":
    main()
