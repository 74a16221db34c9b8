"""`make bench` and `make bench-full`: run the benchmarks under bench/, check each performance target, write the report.

Runs, one after the other, as subprocesses (each prints its own table; the output is also kept in
bench/_work/logs/STAGE.log and the figures in bench/_work/results/STAGE.json):
  prep        bench/bench_prep.py        tfidf build vs the tokenizer-only ceiling
  strategies  bench/bench_strategies.py  reference scoring vs the raw no-grad forward; semantic tokens/s
  train       bench/bench_train.py       sftgo vs sft step time; sftgo-train vs the HF Trainer and TRL tokens/s
  memory      bench/bench_memory.py      peak memory at 4,096-token batches vs the HF Trainer and TRL
  scale       bench/bench_scale.py       at 200,000 records: vs datasets.map(num_proc=2); 2 vs 1 workers; start-up;
                                         peak RSS at 100,000 vs 1,000,000 records (--full only)
  fsdp        bench/bench_fsdp.py        per-rank peak memory of the training phase, 2-rank FSDP2 vs 2-rank DDP
  store       bench/bench_store.py       a build from s3:// inputs to an s3:// --out (moto on the loopback, started
                                         by the stage) vs the same build on local files (no target); the driver's
                                         peak RSS of builds from the store at 20,000 vs 200,000 records
                                         (100,000 vs 1,000,000 with --full)
  profile     py-spy (installed into bench/_work/tools from PyPI if missing) over one
              `sftgo-prep build --workers 1`, plus the build's own per-phase times at 1 and 2 workers
Then writes bench/results.json and bench/RESULTS.md: one row per target (rows(), below: measured,
baseline, ratio, target, met), the machine, the load average during the run, and the command that
reproduces each row.  Every timing is a median of --repeats (>= 3) runs, measured side by side with its
baseline in the same run.

Two sizes (sizes(), below):
- default (`make bench`), about 25 minutes on 2 CPU cores: every stage but scale; prep at 40,000 records,
  strategies at 24 records, store at 20,000 records (its driver-RSS row at 20,000 vs 200,000), and one process
  per configuration for the peak-memory stages (memory, fsdp):
  a process's peak repeats from run to run far more closely than its timings (bench/analysis.md).  Stage
  times: train 5.7 and memory 10.3 minutes measured at these sizes (under a load average of about 3), store
  3.8-4.1 (load about 5); prep 1, strategies 2, fsdp 1.5 and profile 1 scaled from the last full run (load
  about 2.6).  The memory stage's three 4,096-token training processes are its cost.
- --full (`make bench-full`), about 68 minutes there: prep at 200,000 records, the scale stage (200,000
  and 1,000,000-record rows), strategies at 48 records, store at 100,000 records with its driver-RSS row at
  100,000 vs 1,000,000 (13 minutes under a load average of 3.2, of which the 1,000,000-record build from the
  loopback store took 4.3), and --repeats processes for the memory stages.
A stage not run keeps the figures of the committed bench/results.json, and the report says when and on what
CPU each stage ran.

Usage: python bench/run_all.py [--full] [--repeats 3] [--stages prep,strategies,train,store,...]
                               [--quick] [--report-only]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "_work"
RESULTS = WORK / "results"
LOGS = WORK / "logs"
PY = ".venv/bin/python"  # how the reproduce commands are written (make install's venv)
STAGES = ("prep", "strategies", "train", "memory", "scale", "fsdp", "store", "profile")
DEFAULT_STAGES = tuple(st for st in STAGES if st != "scale")  # `make bench`; --full adds the scale stage


def sizes(quick: bool, repeats: int, full: bool = True) -> dict:
    if quick:  # a smoke test of the whole chain, a few minutes; figures not meaningful
        return {
            "prep": ["--records", "2000", "--repeats", str(repeats)],
            "strategies": ["--records", "16", "--repeats", str(repeats), "--semantic-records", "8"],
            "train": ["--steps", "2", "--warmup", "1", "--repeats", str(repeats), "--paired-rounds", "3"],
            "scale": [
                "--records",
                "2000",
                "--rss-records",
                "same",
                "--startup-records",
                "20",
                "--repeats",
                str(repeats),
                "--train-steps",
                "2",
            ],
            "fsdp": ["--steps", "1", "--repeats", "1"],
            "memory": ["--batch-tokens", "512", "--steps", "2", "--repeats", str(repeats)],
            "store": ["--records", "2000", "--rss-records", "2000,20000", "--repeats", str(repeats)],
            "profile_records": 2000,
        }
    peaks = str(repeats) if full else "1"  # processes per configuration of the peak-memory stages
    return {
        "prep": ["--records", "200000" if full else "40000", "--repeats", str(repeats), "--workers", "2"],
        "strategies": [
            "--records",
            "48" if full else "24",
            "--repeats",
            str(repeats),
            "--semantic-records",
            "24" if full else "12",
        ],
        "train": [
            "--batch-tokens",
            "512",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--repeats",
            str(repeats),
            "--paired-rounds",
            "15",
        ],
        "scale": [  # run by --full only; a default run's report keeps the committed figures of this command
            "--records",
            "200000",
            "--rss-records",
            "100000,1000000",
            "--repeats",
            str(repeats),
            "--train-steps",
            "2",
        ],
        "fsdp": ["--steps", "3", "--repeats", peaks, "--batch-tokens", "256", "--grad-checkpointing"],
        "memory": ["--batch-tokens", "4096", "--steps", "2", "--repeats", peaks],
        # the store's driver peak RSS: a 1,000,000-record build from the loopback server took 256 s (and 200,000
        # 75-123 s), so the default compares 20,000 with 200,000 (the same 10x); the small side is the timing builds'
        "store": [
            "--records",
            "100000" if full else "20000",
            "--rss-records",
            "100000,1000000" if full else "20000,200000",
            "--repeats",
            str(repeats),
        ],
        "profile_records": 10000,
    }


def machine(load: list[float]) -> dict:
    from sftgo.core.machine import cpu_model

    model = cpu_model()
    flags = next(
        (line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), ""
    ).split()
    mem = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    load = load or [os.getloadavg()[0]]

    def ver(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "cpu_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        "ram_gib": round(mem / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": ver("torch"),
        "transformers": ver("transformers"),
        "datasets": ver("datasets"),
        "dask": ver("dask"),
        "tokenizers": ver("tokenizers"),
        "load_average_1min": {
            "mean": round(statistics.mean(load), 2),
            "median": round(statistics.median(load), 2),
            "min": round(min(load), 2),
            "max": round(max(load), 2),
            "samples": len(load),
        },
    }


def run_stage(name: str, cmd: list[str], env: dict) -> float:
    LOGS.mkdir(parents=True, exist_ok=True)
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(LOGS / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        proc.wait()
    dt = time.perf_counter() - t0
    print(f"=== {name}: exit {proc.returncode} after {dt:.0f} s", flush=True)
    if proc.returncode:
        raise SystemExit(f"stage {name} failed; see {LOGS / (name + '.log')}")
    return dt


# ---------------------------------------------------------------------------------------------- profile


def py_spy() -> str | None:
    found = shutil.which("py-spy") or (str(WORK / "tools/bin/py-spy") if (WORK / "tools/bin/py-spy").exists() else None)
    if found:
        return found
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--target", str(WORK / "tools"), "py-spy"],
        capture_output=True,
        text=True,
    )
    return str(WORK / "tools/bin/py-spy") if r.returncode == 0 and (WORK / "tools/bin/py-spy").exists() else None


def summarise_raw(path: Path, top: int = 15) -> dict:
    """Collapsed stacks -> total samples, self time per function, inclusive time of sftgo's own functions."""
    self_t, incl, total, per_proc = {}, {}, 0, {}
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        n = int(n)
        head = ""
        depth = 0
        while stack.startswith("process "):
            depth += 1  # --subprocesses: 'process PID:"command line"' per ancestor, outermost first
            end = stack.find('";', stack.find(':"'))  # the command line itself may hold ';'
            head, stack = (stack, "") if end < 0 else (stack[: end + 1], stack[end + 2 :])
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        pid = head.split(":", 1)[0]
        seen = per_proc.setdefault(pid, {"samples": 0, "driver": False, "tasks": False})
        seen["samples"] += n
        seen["driver"] |= depth == 1  # the outermost process (workers re-import the CLI module as __mp_main__)
        seen["tasks"] |= "prepare_partition" in stack or "write_partition" in stack
        total += n
        self_t[frames[-1]] = self_t.get(frames[-1], 0) + n
        for f in set(frames):
            if "/pipeline/" in f or "/grouping/" in f or "(pipeline/" in f or "(grouping/" in f:
                incl[f] = incl.get(f, 0) + n

    def pct(d):
        return [(k, round(100 * v / total, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    by_role = {}
    for v in per_proc.values():
        role = (
            "sftgo-prep driver (CLI process)"
            if v["driver"]
            else "Dask worker running the tasks"
            if v["tasks"]
            else "other processes (Dask nanny, resource tracker)"
        )
        by_role[role] = by_role.get(role, 0) + v["samples"]
    return {"samples": total, "self_pct": pct(self_t), "sftgo_inclusive_pct": pct(incl), "by_process_samples": by_role}


def profile_stage(records: int, env: dict) -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_scale import build_cmd, corpus  # the same corpus and command as the scale stage

    inputs = corpus(WORK, records)
    out = WORK / "profile-out"
    exe = str(Path(sys.executable).parent / "sftgo-prep")
    result = {"records": records, "phases": {}}
    for w in (1, 2):  # the build's own per-phase log line (not --quiet)
        cmd = [exe, "build", *inputs, "--out", str(out), "--strategy", "tfidf", "--workers", str(w), "--overwrite"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
        line = next((line for line in (r.stdout + r.stderr).splitlines() if "Time:" in line), "")
        result["phases"][f"workers_{w}"] = {"wall_s": round(wall, 2), "log": line.strip()}
        print(f"workers {w}: wall {wall:.1f} s; {line.strip()}", flush=True)
    spy = py_spy()
    if not spy:
        result["py_spy"] = "unavailable (pip install py-spy failed)"
        return result
    raw = WORK / "profile-build-w1.txt"
    cmd = [
        spy,
        "record",
        "--subprocesses",
        "-r",
        "50",
        "--format",
        "raw",
        "-o",
        str(raw),
        "--",
        *build_cmd(inputs, out, 1),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode or not raw.exists():
        result["py_spy"] = f"failed: {(r.stderr or r.stdout)[-500:]}"
        return result
    result["py_spy"] = summarise_raw(raw)
    result["py_spy"]["command"] = " ".join(["py-spy", *cmd[1:]]).replace(str(ROOT) + "/", "")
    shutil.rmtree(out, ignore_errors=True)
    result["train_py_spy"] = profile_train(spy, env)
    return result


TRAIN_PARTS = {  # inclusive share of a training run's samples whose stack holds one of these frames
    "process start-up and imports (module level)": ("<module> (",),
    "model load (load_for_training)": ("load_for_training",),
    "forward: decoder layers": ("LlamaModel.forward", "LlamaDecoderLayer"),
    "forward: LM head + CE at supervised positions (token_cross_entropy)": ("token_cross_entropy",),
    "backward (Tensor.backward)": ("Tensor.backward", "_engine_run_backward"),
    "optimizer (clip_grad_norm_, AdamW step, zero_grad)": ("clip_grad_norm_", "Optimizer.", "adamw", "AdamW"),
    "batches (ShardStream, Batches, collate)": ("ShardStream", "Batches.", "collate ("),
    "evaluation and final checkpoint (save_final)": ("save_final", "run_eval", "evaluate"),
}


def profile_train(spy: str, env: dict) -> dict:
    """py-spy over a short `sftgo-train --objective sft` run: where a CPU step's time goes."""
    data = WORK / "train-shards"  # bench_train's default shards (built from data/*.jsonl)
    if not (data / "manifest.json").exists():
        return {"error": f"{data} missing (run the train stage first)"}
    raw, run_dir = WORK / "profile-train.txt", WORK / "profile-train-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    train = [
        str(Path(sys.executable).parent / "sftgo-train"),
        "--data",
        str(data),
        "--out",
        str(run_dir),
        "--objective",
        "sft",
        "--max-steps",
        "4",
        "--batch-tokens",
        "512",
        "--no-progress",
    ]
    r = subprocess.run(
        [spy, "record", "-r", "50", "--format", "raw", "-o", str(raw), "--", *train],
        env=env,
        capture_output=True,
        text=True,
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    if r.returncode or not raw.exists():
        return {"error": (r.stderr or r.stdout)[-500:]}
    total, parts = 0, {k: 0 for k in TRAIN_PARTS}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        n = int(n)
        total += n
        frames = stack.split(";")
        for k, pats in TRAIN_PARTS.items():
            if k.startswith("process start-up"):
                hit = (
                    len(frames) > 1
                    and "<module> (" in frames[0]
                    and "_find_and_load" in stack
                    and "run (trainer" not in stack
                )
            else:
                hit = any(p in stack for p in pats)
            parts[k] += n if hit else 0
    cmd = " ".join(["py-spy", "record", "-r", "50", "--format", "raw", "-o", str(raw), "--", *train])
    return {
        "samples": total,
        "command": cmd.replace(str(ROOT) + "/", ""),
        "parts_pct": {k: round(100 * v / max(total, 1), 1) for k, v in parts.items()},
    }


# ---------------------------------------------------------------------------------------------- report


def rows(res: dict, args_sizes: dict, commands: dict | None = None) -> list[dict]:
    """The report's rows; `commands`: the command each stage's figures came from (stages.json), else the sizes'."""
    med = statistics.median
    out, extra = [], []

    def cmd(script, stage):
        return (commands or {}).get(stage) or f"{PY} bench/{script} {' '.join(args_sizes[stage])}"

    if "prep" in res:
        p = res["prep"]
        ceiling = p["ceiling"].get("ceiling_tok_s", p["ceiling"]["encode_batch_tok_s"])  # the faster raw encode call
        out.append(
            {
                "target": "prep `tfidf` tokens/s vs tokenizer-only ceiling (one-process batch encode)",
                "measured": f"{p['build_tfidf']['tok_s']:,.0f} tok/s",
                "baseline": f"{ceiling:,.0f} tok/s",
                "ratio": p["ratio_vs_encode_batch"],
                "op": ">=",
                "goal": 0.6,
                "command": cmd("bench_prep.py", "prep"),
                "note": f"vs `tokenizer(texts)`: {p['ratio_vs_tokenizer_call']:.3f}; "
                f"{p['build_tfidf']['tokens']:,} tokens",
            }
        )
    if "memory" in res:
        m = res["memory"]
        for base, label in (("hf_trainer", "Hugging Face `Trainer`"), ("trl_sft", "TRL `SFTTrainer` (padding-free)")):
            out.append(
                {
                    "target": f"memory: peak of one training process at {m['batch_tokens']:,}-token batches vs {label}",
                    "measured": f"{m['median']['sftgo_train']['peak_mb']:,.0f} MB",
                    "baseline": f"{m['median'][base]['peak_mb']:,.0f} MB",
                    "ratio": m["median"]["sftgo_train"]["peak_mb"] / m["median"][base]["peak_mb"],
                    "op": "<=",
                    "goal": 0.7,
                    "command": f"{PY} bench/bench_memory.py --batch-tokens {m['batch_tokens']} --steps {m['steps']} "
                    f"--repeats {m['repeats']}"
                    + ("" if m.get("grad_checkpointing") else " --no-grad-checkpointing")
                    + ("" if m.get("allocator_env") else " --no-same-allocator"),  # as the result was made
                    "note": (
                        "each step's own peak, medians (ours; theirs): "
                        + "; ".join(
                            f"step {i + 1} {a:,.0f}; {b:,.0f} MB"
                            for i, (a, b) in enumerate(
                                zip(m["median"]["sftgo_train"]["step_peaks_mb"], m["median"][base]["step_peaks_mb"])
                            )
                        )
                        + "; "
                        if "step_peaks_mb" in m["median"]["sftgo_train"]
                        else ""
                    )
                    + f"{'all with' if m.get('grad_checkpointing') else 'none with'} gradient checkpointing; "
                    + (
                        f"all under {', '.join(f'{k}={v}' for k, v in m['allocator_env'].items())} (sftgo-train's own "
                        "CPU setting, given to all); "
                        if m.get("allocator_env")
                        else ""
                    )
                    + "what the steps added over the loaded model: ours "
                    f"{m['median']['sftgo_train']['steps_added_mb']:,.0f} MB, "
                    f"theirs {m['median'][base]['steps_added_mb']:,.0f} MB; the full fp32 logits of one step would be "
                    f"{m['full_logits_fp32_mb']:,.0f} MB"
                    + (
                        "; sftgo-train --pack (padding-free): "
                        f"{m['median']['sftgo_train_pack']['peak_mb']:,.0f} MB peak"
                        if "sftgo_train_pack" in m["median"]
                        else ""
                    ),
                }
            )
    if "scale" in res:
        s = res["scale"]
        out.append(
            {
                "target": "prep `tfidf` tokens/s vs `datasets.map(num_proc=2)` doing the same work",
                "measured": f"{s['tok_s']['build_w2_10x']:,.0f} tok/s",
                "baseline": f"{s['tok_s']['hf_datasets_10x']:,.0f} tok/s",
                "ratio": s["sftgo_over_datasets"],
                "op": ">=",
                "goal": s.get("target_sftgo_over_datasets", 3.0),
                "command": cmd("bench_scale.py", "scale"),
                "note": f"both end to end as CLI subprocesses, {s['tokens_10x']:,} tokens ({s['records_10x']:,} "
                "records), "
                "same columns (groups and scores matched sftgo's on all 1,000 records of a check when the "
                "baseline was written)",
            }
        )
        out.append(
            {
                "target": f"prep start-up: wall time of a {s['startup_records']:,}-record build (no target)",
                "measured": f"{s['startup_s']:.1f} s",
                "baseline": f"{s['wall_s_median']['build_w2_10x']:.1f} s",
                "ratio": s["startup_share"],
                "op": "<=",
                "goal": None,
                "command": cmd("bench_scale.py", "scale"),
                "note": f"baseline: the {s['records_10x']:,}-record build; the ratio is start-up's share of it "
                "(cluster start, "
                "tokenizer loads, manifest, cluster stop: see the build's per-phase times below)",
            }
        )
    if "strategies" in res:
        t = res["strategies"]["results"]
        out.append(
            {
                "target": "prep `reference` scoring vs raw batched no-grad forward",
                "measured": f"{t['reference score (loss)']['tokens_per_s']:,.0f} tok/s",
                "baseline": f"{t['raw forward (full logits)']['tokens_per_s']:,.0f} tok/s",
                "ratio": res["strategies"]["reference_vs_raw"],
                "op": ">=",
                "goal": 0.9,
                "command": cmd("bench_strategies.py", "strategies"),
                "note": f"semantic (no target): {t['semantic score (occlusion)']['tokens_per_s']:,.0f} tok/s",
            }
        )
    if "train" in res:
        t = res["train"]
        ps, pg = med(t["paired_times_s"]["sft"]), med(t["paired_times_s"]["sftgo"])
        out.append(
            {
                "target": "train: SFT-GO step time vs plain-CE step (same trainer)",
                "measured": f"{pg:.3f} s/step",
                "baseline": f"{ps:.3f} s/step",
                "ratio": t["paired_sftgo_over_sft"],
                "op": "<=",
                "goal": 1.03,
                "command": cmd("bench_train.py", "train"),
                "note": f"median of per-pair ratios, steps alternated in one process; separate runs: "
                f"{t['sftgo_over_sft_step_time']:.3f}",
            }
        )
        out.append(
            {
                "target": "train: sftgo-train tokens/s vs Hugging Face `Trainer` (same model, data, batches)",
                "measured": f"{t['tokens_per_s']['sft']:,.0f} tok/s",
                "baseline": f"{t['tokens_per_s']['hf_trainer']:,.0f} tok/s",
                "ratio": t["ours_over_hf_tokens_per_s"],
                "op": ">=",
                "goal": 1.2,
                "command": cmd("bench_train.py", "train"),
                "note": "CE objective on both; sftgo objective: "
                f"{t['tokens_per_s']['sftgo'] / t['tokens_per_s']['hf_trainer']:.3f}; "
                f"fastest-step ratio {t['ours_over_hf_fastest']:.3f}",
            }
        )
        if "trl_sft" in t["tokens_per_s"]:
            out.append(
                {
                    "target": "train: sftgo-train tokens/s vs TRL `SFTTrainer` (padding-free; same model and "
                    "samples per step)",
                    "measured": f"{t['tokens_per_s']['sft']:,.0f} tok/s",
                    "baseline": f"{t['tokens_per_s']['trl_sft']:,.0f} tok/s",
                    "ratio": t["ours_over_trl_tokens_per_s"],
                    "op": ">=",
                    "goal": 1.2,
                    "command": cmd("bench_train.py", "train"),
                    "note": "CE objective on both; gradient checkpointing "
                    + ("on in both" if t.get("grad_checkpointing") else "off in both (TRL's own default is on)")
                    + "; the Liger kernel needs a GPU and is not used on a CPU",
                }
            )
        if t.get("cpu_bf16_over_fp32_tokens_per_s"):  # information, after the rows (their numbers stay)
            extra.append(
                {
                    "target": "train: `--precision bf16` (autocast, fp32 weights) vs fp32 tokens/s on this CPU "
                    "(no target)",
                    "measured": f"{t['tokens_per_s']['sft_bf16']:,.0f} tok/s",
                    "baseline": f"{t['tokens_per_s']['sft']:,.0f} tok/s",
                    "ratio": t["cpu_bf16_over_fp32_tokens_per_s"],
                    "op": ">=",
                    "goal": None,
                    "command": cmd("bench_train.py", "train"),
                    "note": "the CPU has native bf16 (AVX512-BF16 or AMX); sft objective, same batches",
                }
            )
    if "scale" in res:
        s = res["scale"]
        r = s["peak_rss_mb_median"]
        small, large = s["rss_records"]
        out.append(
            {
                "target": f"memory: peak RSS of `sftgo-prep build` (process tree), {large:,} vs {small:,} records",
                "measured": f"{r['build_rss_10x']:,.0f} MB",
                "baseline": f"{r['build_rss_1x']:,.0f} MB",
                "ratio": s["build_rss_10x_over_1x"],
                "op": "<=",
                "goal": 1.2,
                "command": cmd("bench_scale.py", "scale"),
                "note": f"--workers 2, {s['rss_repeats']} run(s) each; datasets.map baseline peak at "
                f"{s['records_10x']:,} records "
                f"{r['hf_datasets_10x']:,.0f} MB",
            }
        )
        if "train_rss_10x_over_1x" in s:
            out.append(
                {
                    "target": f"memory: peak RSS of `sftgo-train` (process tree), shards of {large:,} vs "
                    f"{small:,} records",
                    "measured": f"{r['train_10x']:,.0f} MB",
                    "baseline": f"{r['train_1x']:,.0f} MB",
                    "ratio": s["train_rss_10x_over_1x"],
                    "op": "<=",
                    "goal": 1.2,
                    "command": cmd("bench_scale.py", "scale"),
                    "note": f"{s['train_steps']} steps, --batch-tokens {s['train_batch_tokens']}",
                }
            )
        out.append(
            {
                "target": "2 Dask workers vs 1 (`sftgo-prep build` throughput)",
                "measured": f"{s['tok_s']['build_w2_10x']:,.0f} tok/s",
                "baseline": f"{s['tok_s']['build_w1_10x']:,.0f} tok/s",
                "ratio": s["w2_over_w1"],
                "op": ">=",
                "goal": 1.7,
                "command": cmd("bench_scale.py", "scale"),
                "note": f"wall {s['wall_s_median']['build_w2_10x']:.1f} s vs "
                f"{s['wall_s_median']['build_w1_10x']:.1f} s",
            }
        )
    if "fsdp" in res:
        f = res["fsdp"]
        out.append(
            {
                "target": "FSDP2 with 2 ranks: per-rank peak memory vs DDP with 2 ranks (same model, data, steps)",
                "measured": f"{f['fsdp_peak_mb']:,.0f} MB",
                "baseline": f"{f['ddp_peak_mb']:,.0f} MB",
                "ratio": f["ratio"],
                "op": "<=",
                "goal": 0.6,
                "command": cmd("bench_fsdp.py", "fsdp"),
                "note": f"{f['measure']} (the training phase, after set-up), the larger rank, median of "
                f"{len(f['runs']['ddp'])}"
                + (
                    f"; whole process: FSDP {f['whole_process']['fsdp_peak_mb']:,.0f} MB vs DDP "
                    f"{f['whole_process']['ddp_peak_mb']:,.0f} MB, ratio {f['whole_process']['ratio']:.3f}"
                    if "whole_process" in f
                    else ""
                )
                + "; "
                "--batch-tokens "
                f"{f['batch_tokens']}{' with gradient checkpointing' if f['grad_checkpointing'] else ''}",
            }
        )
    if "store" in res:  # after the rows above, whose numbers bench/analysis.md cites
        o = res["store"]
        w, d = o["wall_s_median"], o["driver_peak_rss_mb_median"]
        small, large = o["rss_records"]
        extra.append(
            {
                "target": "prep from an object store: wall time of a build from s3:// inputs to an s3:// --out vs "
                "the same build from local files to a local folder (no target)",
                "measured": f"{w['store']:.1f} s",
                "baseline": f"{w['local']:.1f} s",
                "ratio": o["store_over_local_wall"],
                "op": "<=",
                "goal": None,
                "command": cmd("bench_store.py", "store"),
                "note": f"{o['records']:,} records ({o['tokens']:,} tokens), --workers {o['workers']}, both real "
                "`sftgo-prep build` subprocesses; the store is moto in server mode on the loopback "
                "(tests/s3server.py), one Python process sharing the CPUs with the build; per-pair ratios "
                + ", ".join(f"{x:.2f}" for x in o["paired_store_over_local"])
                + (
                    f"; per store build the server used {o['server_cpu_s_median']['store']:.1f} CPU-s for "
                    f"{o['requests_median']['store']:.0f} requests (a small GET: {o['small_get_ms_median']:.1f} ms)"
                    if "server_cpu_s_median" in o
                    else ""
                ),
            }
        )
        extra.append(
            {
                "target": f"memory: driver peak RSS (the sftgo-prep process alone) of a build from s3://, "
                f"{large:,} vs {small:,} records",
                "measured": f"{d['rss_large']:,.0f} MB",
                "baseline": f"{d['rss_small']:,.0f} MB",
                "ratio": o["driver_rss_large_over_small"],
                "op": "<=",
                "goal": o.get("target_rss", 1.2),
                "command": cmd("bench_store.py", "store"),
                "note": "the driver's VmHWM (Dask workers not counted), inputs read from and --out written to the "
                f"store; process tree (workers and nannies too): {o['tree_peak_rss_mb_median']['rss_large']:,.0f} "
                f"vs {o['tree_peak_rss_mb_median']['rss_small']:,.0f} MB; the local build's driver at "
                f"{o['records']:,} records: {o['driver_peak_rss_mb_median']['local']:,.0f} MB",
            }
        )
    out += extra
    for r in out:  # a row without a goal is information, never a miss
        r["met"] = r["goal"] is None or (r["ratio"] >= r["goal"] if r["op"] == ">=" else r["ratio"] <= r["goal"])
    return out


def peak_runs(report: dict) -> str:
    """How many processes per configuration the peak-memory stages took, where that differs from --repeats
    (`make bench` runs them once: their peaks repeat closely, bench/analysis.md)."""
    res = report.get("results", {})
    runs = {}
    if "memory" in res:
        runs["memory"] = res["memory"].get("repeats")
    if "fsdp" in res:
        runs["fsdp"] = len(res["fsdp"].get("runs", {}).get("ddp", []))
    fewer = {k: v for k, v in runs.items() if v and v != report["repeats"]}
    if not fewer:
        return ""
    return "; the peak-memory figures come from " + ", ".join(
        f"{v} process(es) per configuration ({k})" for k, v in fewer.items()
    )


def markdown(report: dict) -> str:
    m = report["machine"]
    la = m["load_average_1min"]
    L = [
        "# sftgo benchmark results",
        "",
        f"Generated by `make bench{'-full' if report.get('full') else ''}` (`{PY} bench/run_all.py"
        f"{' --full' if report.get('full') else ''}`) on {report['finished']}, in "
        f"{report['wall_min']:.1f} minutes. "
        f"Every timing is the median of {report['repeats']} runs"
        + peak_runs(report)
        + "; each ratio's two sides were measured in the same run, interleaved or back to back. Targets: the "
        "`target` column, set in `bench/run_all.py`.",
        "",
        *(
            [
                "Stages rerun on their own keep the other stages' figures; when each stage ran, and on what CPU: "
                + "; ".join(f"{st} {v['finished']} ({v['cpu']})" for st, v in report["stage_runs"].items())
                + ".",
                "",
            ]
            if len({v["finished"] for v in report.get("stage_runs", {}).values()}) > 1
            else []
        ),
        "## Machine",
        "",
        f"- {m['cpus']} CPUs, {m['cpu_model']}, {m['ram_gib']} GiB RAM, no GPU used; {m['platform']}",
        f"- Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, tokenizers {m['tokenizers']}, "
        f"datasets {m['datasets']}, dask {m['dask']}",
        f"- 1-minute load average during the run (sampled every 10 s): mean {la['mean']}, median {la['median']}, "
        f"min {la['min']}, max {la['max']}. The machine is shared: "
        + (
            "the load exceeded the CPU count, so absolute figures are depressed and noisy; the ratios, measured side "
            "by side, are what to read."
            if la["mean"] > m["cpus"]
            else "the load stayed within the CPU count."
        ),
        "",
        "## Targets",
        "",
        "| # | what | measured | baseline | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(report["rows"], 1):
        goal = "—" if r["goal"] is None else f"{r['op']} {r['goal']}"
        met = "—" if r["goal"] is None else ("yes" if r["met"] else "**no**")
        L.append(f"| {i} | {r['target']} | {r['measured']} | {r['baseline']} | {r['ratio']:.3f} | {goal} | {met} |")
    L += ["", "Notes per row:", ""]
    for i, r in enumerate(report["rows"], 1):
        L.append(f"{i}. {r['note']}. Reproduce: `{r['command']}`")
    missed = [(i, r) for i, r in enumerate(report["rows"], 1) if not r["met"]]
    L += ["", "## Missed targets", ""]
    if not missed:
        L.append("None.")
    else:
        L.append(
            "Missed: "
            + "; ".join(f"row {i} ({r['target']}: {r['ratio']:.3f}, target {r['op']} {r['goal']})" for i, r in missed)
            + "."
        )
        L.append("")
        L += report.get("analysis", [])
    prof = report.get("results", {}).get("profile")
    if prof:
        L += [
            "",
            "## Profile of one build",
            "",
            f"`sftgo-prep build` on the scale corpus ({prof['records']:,} records), per-phase times from the "
            "build's own log line:",
            "",
        ]
        for k, v in prof["phases"].items():
            L.append(f"- {k.replace('_', ' ')}: wall {v['wall_s']} s (process start to exit); {v['log']}")
        spy = prof.get("py_spy")
        if isinstance(spy, dict):
            L += [
                "",
                f"py-spy, all processes, 50 Hz, on-CPU samples only (`{spy['command']}`), {spy['samples']} samples. "
                "Samples per process:",
                "",
            ]
            for k, v in sorted(spy["by_process_samples"].items(), key=lambda kv: -kv[1]):
                L.append(f"- `{k}`: {v} ({100 * v / spy['samples']:.0f}%)")
            L += ["", "sftgo functions, inclusive share of all samples:", "", "| % | function |", "|---|---|"]
            L += [f"| {p} | `{f}` |" for f, p in spy["sftgo_inclusive_pct"]]
            L += ["", "Leaf functions (self time), share of all samples:", "", "| % | function |", "|---|---|"]
            L += [f"| {p} | `{f}` |" for f, p in spy["self_pct"]]
        elif spy:
            L += ["", f"py-spy: {spy}"]
        tspy = prof.get("train_py_spy")
        if isinstance(tspy, dict) and "parts_pct" in tspy:
            L += [
                "",
                "## Profile of one training run",
                "",
                f"py-spy over 4 `sftgo-train --objective sft` steps (`--batch-tokens 512`, the bench_train data), "
                f"{tspy['samples']} samples (`{tspy['command']}`). Inclusive share of all samples (parts may overlap):",
                "",
                "| % | part |",
                "|---|---|",
            ]
            L += [f"| {v} | {k} |" for k, v in tspy["parts_pct"].items()]
        elif tspy:
            L += ["", f"training profile: {tspy}"]
    L += gpu_bench_markdown(GPU_DIR / "results.json")
    L += gpu_markdown(GPU_DIR)
    L += ["", "## Stages", "", "| stage | command | minutes |", "|---|---|---|"]
    for k, v in report["stages"].items():
        L.append(f"| {k} | `{v['command']}` | {v['seconds'] / 60:.1f} |")
    L += ["", "Raw figures: `bench/results.json`; logs of the last run: `bench/_work/logs/`.", ""]
    return "\n".join(L)


GPU_DIR = ROOT / "bench" / "gpu"  # the train and memory benches' JSON from a GPU machine (not run by make bench)
H200_BF16_DENSE_TFLOPS = 989.4  # NVIDIA's H200 SXM figure (without sparsity), for MFU
EMBEDDED_PARAMETERS = 134_515_008  # SmolLM2-135M-Instruct, the embedded model (for JSON that does not record its count)


def gpu_bench_markdown(path: Path) -> list[str]:
    """The rows of bench/gpu/run.sh's results.json (copied from a GPU machine's OUT), when there is one."""
    if not path.exists():
        return []
    r = json.loads(path.read_text())
    g = r.get("gemm") or {}
    rate = f"{g['flops_per_s'] / 1e12:,.0f} TFLOP/s" if "flops_per_s" in g else f"not measured ({g.get('error')})"
    L = [
        "",
        f"## GPU benchmark (`bash bench/gpu/run.sh`, {r.get('device')}, {r.get('started')})",
        "",
        f"Measured bf16 matmul rate ({g.get('n', '?')}^3, median): {rate}. {r.get('warmup_steps')} warm-up and "
        f"{r.get('timed_steps')} timed steps per configuration, each in a fresh process; MFU = tokens/s x "
        "(6 N + 12 L q T_eff) over that rate (trainer/flops.py); versions: "
        + ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items() if v)
        + ".",
        "",
        "| configuration | status | tokens/step | tokens/s | peak CUDA MB | MFU |",
        "|---|---|---|---|---|---|",
    ]
    for row in r.get("rows", []):
        if row.get("status") == "ok":
            peak, mfu = row.get("max_memory_allocated_mb"), row.get("mfu")
            peak = "—" if peak is None else f"{peak:,.0f}"
            mfu = "—" if mfu is None else f"{100 * mfu:.1f}%"
            L.append(
                f"| {row['label']} | ok | {row['tokens_per_step']:,.0f} | {row['tokens_per_s']:,.0f} | {peak} | {mfu} |"
            )
        else:
            L.append(f"| {row['label']} | {row.get('status')}: {row.get('reason')} | | | | |")
    return L


def gpu_markdown(folder: Path) -> list[str]:
    """The GPU rows: bench_train's tokens/s and bench_memory's peak CUDA memory, from JSON files a GPU run left in
    `folder` (train_*.json, memory_*.json).  MFU = 6 x parameters x tokens/s over the GPU's dense bf16 peak."""
    trains = sorted(folder.glob("train_*.json"), key=lambda p: json.loads(p.read_text())["batch_tokens"])
    mems = sorted(folder.glob("memory_*.json"))
    if not trains and not mems:
        return []
    L = [
        "",
        "## GPU rows (bench_train and bench_memory, run by hand on a GPU machine; files in `bench/gpu/`)",
        "",
        "| batch tokens | device | runs | tokens/step | sftgo-train sft | HF Trainer | TRL SFTTrainer | ours/HF "
        "(median) | ours/TRL (median) "
        "| ours/HF (fastest step) | ours/TRL (fastest step) | MFU of sftgo-train (median; fastest) |",
        "|---" * 12 + "|",
    ]
    for path in trains:
        r = json.loads(path.read_text())
        tps, fast, tok = r["tokens_per_s"], r["fastest_step_s"], r["tokens_per_step"]
        mfu = [
            6 * r.get("parameters", EMBEDDED_PARAMETERS) * t / (H200_BF16_DENSE_TFLOPS * 1e12)
            for t in (tps["sft"], tok / fast["sft"])
        ]
        L.append(
            f"| {r['batch_tokens']:,} | {r['device']} | {r['repeats']} | {tok:,.0f} | {tps['sft']:,.0f} | "
            f"{tps['hf_trainer']:,.0f} | "
            f"{tps['trl_sft']:,.0f} | {tps['sft'] / tps['hf_trainer']:.3f} | {tps['sft'] / tps['trl_sft']:.3f} | "
            f"{fast['hf_trainer'] / fast['sft']:.3f} | {fast['trl_sft'] / fast['sft']:.3f} | "
            f"{100 * mfu[0]:.1f}%; {100 * mfu[1]:.1f}% |"
        )
    for path in mems:
        m = json.loads(path.read_text())
        med = m["median"]
        L += [
            "",
            f"Peak CUDA memory at {m['batch_tokens']:,}-token batches (`{path.name}`, median of {m['repeats']}, "
            f"{'with' if m['grad_checkpointing'] else 'without'} gradient checkpointing): "
            + ", ".join(f"{c} {v['peak_mb']:,.0f} MB" for c, v in med.items())
            + f"; ours/HF {m['ours_over_hf_peak']:.3f}, ours/TRL {m['ours_over_trl_peak']:.3f} (target <= 0.7 "
            "for both).",
        ]
    return L


def analysis(res: dict, rows_: list[dict]) -> list[str]:
    """Plain statements, from the measured figures, of why a missed target is missed."""
    out = []
    miss = {r["target"].split(":")[0].split(" vs")[0]: r for r in rows_ if not r["met"]}
    prof = res.get("profile", {})
    phases = {k: v["log"] for k, v in prof.get("phases", {}).items()}
    extra = ANALYSIS_FILE.read_text() if ANALYSIS_FILE.exists() else ""
    if extra:
        out += extra.strip().splitlines()
    elif miss:
        out.append(
            "Per-phase times of the build (see the profile below): " + "; ".join(f"{k}: {v}" for k, v in phases.items())
        )
    return out


ANALYSIS_FILE = ROOT / "bench" / "analysis.md"  # optional hand-written explanation of the misses, pasted in


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="`make bench-full`: the scale stage and the larger sizes")
    ap.add_argument("--stages", help=f"default: {','.join(DEFAULT_STAGES)}; with --full: {','.join(STAGES)}")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the chain (figures meaningless)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from bench/_work/results/*.json")
    args = ap.parse_args()
    if args.repeats < 3 and not args.quick:
        ap.error("--repeats must be >= 3")
    env = dict(os.environ)
    env.setdefault("SFTGO_CACHE", str(Path.home() / ".cache" / "sftgo"))
    env["PYTHONUNBUFFERED"] = "1"
    sz = sizes(args.quick, args.repeats, args.full)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stages = [s for s in (args.stages or ",".join(STAGES if args.full else DEFAULT_STAGES)).split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        ap.error(f"unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(STAGES)}")
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_scale import LoadSampler  # one load sampler for every benchmark

    load = LoadSampler(every=10.0)
    load.start()
    t0 = time.perf_counter()
    timing = {}
    prev = RESULTS / "stages.json"
    partial = set(stages) != set(STAGES)
    last = ROOT / "bench" / "results.json"  # the committed report: what a partial run on a fresh checkout keeps
    committed = json.loads(last.read_text()) if last.exists() and (args.report_only or partial) else {}
    if committed:  # the committed run's stage times, under this checkout's own where it has them
        timing = dict(committed.get("stages", {}))
    if (args.report_only or partial) and prev.exists():
        timing.update(json.loads(prev.read_text()))
    scripts = {
        "prep": "bench_prep.py",
        "strategies": "bench_strategies.py",
        "train": "bench_train.py",
        "scale": "bench_scale.py",
        "fsdp": "bench_fsdp.py",
        "memory": "bench_memory.py",
        "store": "bench_store.py",
    }
    if not args.report_only:
        for st in stages:
            if st == "profile":
                t1 = time.perf_counter()
                print("\n=== profile", flush=True)
                prof = profile_stage(sz["profile_records"], env)
                (RESULTS / "profile.json").write_text(json.dumps(prof, indent=2) + "\n")
                timing[st] = {"command": "bench/run_all.py --stages profile", "seconds": time.perf_counter() - t1}
                continue
            cmd = [sys.executable, f"bench/{scripts[st]}", *sz[st], "--json", str(RESULTS / f"{st}.json")]
            sec = run_stage(st, cmd, env)
            timing[st] = {"command": f"{PY} bench/{scripts[st]} {' '.join(sz[st])}", "seconds": sec}
        prev.write_text(json.dumps(timing, indent=2) + "\n")
    load.stop.set()
    res = {st: json.loads((RESULTS / f"{st}.json").read_text()) for st in STAGES if (RESULTS / f"{st}.json").exists()}
    kept = [st for st in STAGES if st not in res and st in committed.get("results", {})]
    for st in kept:  # not measured here (a fresh checkout has no bench/_work): the committed figures, said so
        res[st] = committed["results"][st]
    if kept:
        print(
            f"stages not in {RESULTS}: {', '.join(kept)} kept from bench/results.json "
            f"(finished {committed.get('finished')})",
            flush=True,
        )
    raw = WORK / "profile-build-w1.txt"
    if args.report_only and isinstance(res.get("profile", {}).get("py_spy"), dict) and raw.exists():
        res["profile"]["py_spy"].update(summarise_raw(raw))
    samples = load.samples
    if args.report_only and (RESULTS / "load.json").exists():
        samples = json.loads((RESULTS / "load.json").read_text())
    elif not args.report_only:
        if partial and (RESULTS / "load.json").exists():  # a partial rerun adds its samples to the full run's
            samples = json.loads((RESULTS / "load.json").read_text()) + samples
        (RESULTS / "load.json").write_text(json.dumps(samples) + "\n")
    table = rows(res, sz, {st: v["command"] for st, v in timing.items() if st in res})
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    # --report-only rewrites the report; the run it reports finished earlier
    finished = json.loads(last.read_text()).get("finished", now) if args.report_only and last.exists() else now
    mach = machine(samples)
    cpu = mach["cpu_model"] + (", AVX512-BF16" if mach["cpu_bf16"] else "")
    stage_runs = dict(committed.get("stage_runs", {}))  # when and on what CPU each stage's figures were measured
    for st in res:
        if st in kept or (args.report_only and st in stage_runs):
            stage_runs.setdefault(
                st, {"finished": committed.get("finished"), "cpu": committed.get("machine", {}).get("cpu_model")}
            )
        elif not args.report_only and st in stages:
            stage_runs[st] = {"finished": now, "cpu": cpu}
        else:
            stage_runs.setdefault(st, {"finished": finished, "cpu": cpu})
    report = {
        "finished": finished,
        "reported": now,
        "repeats": args.repeats,
        "full": args.full,
        "quick": args.quick,
        "stage_runs": stage_runs,
        # the stages run now (a kept stage's time is in the stages table, not in this run's)
        "wall_min": (
            sum(v["seconds"] for st, v in timing.items() if args.report_only or st in stages) / 60
            if timing
            else (time.perf_counter() - t0) / 60
        ),
        "machine": mach,
        "stages": timing,
        "rows": table,
        "results": res,
    }
    report["analysis"] = analysis(res, table)
    (ROOT / "bench" / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (ROOT / "bench" / "RESULTS.md").write_text(markdown(report))
    print("\n" + "\n".join(line for line in markdown(report).splitlines() if line.startswith("|")))
    print(f"\nwrote bench/RESULTS.md and bench/results.json ({report['wall_min']:.1f} min)")


if __name__ == "__main__":
    main()
