"""Object-store benchmark: `sftgo-prep build` reading its JSONL inputs from, and writing --out to, s3:// on an
S3-protocol server on the loopback (moto in server mode, tests/s3server.py), against the same build on local files.

The corpora are bench_scale's (data/generate.py, half alpaca, half chat), uploaded once per run to a fresh bucket of
a server this script starts and stops; every build is a real `sftgo-prep build --strategy tfidf --workers N`
subprocess (bench_scale.build_cmd) with the server's AWS_* variables in its environment, measured by
bench_scale.TreeRSS (wall time; peak RSS of the process tree; the driver's own peak, its VmHWM).
  a  wall time of a build from s3:// inputs to an s3:// --out against the same build from local files to a local
     folder, --records (20,000) records, --repeats paired runs (the order alternates per pair), medians; the ratio
     store / local has no target: the loopback server is a single Python process sharing the 2 CPUs with the build.
     Per store build it records the server's CPU seconds and the requests it logged; after the builds, the median
     round trip of a small GET from this process.
  b  the driver's peak RSS (the sftgo-prep process alone, not its Dask workers) of a build reading from and writing
     to the store at the two --rss-records sizes; target <= 1.2x.  `make bench` runs 20,000 vs 200,000 records
     (a 200,000-record build from the store took 75-123 s on the 2 shared cores; the stage 3.8-4.1 minutes);
     `make bench-full` runs 100,000 vs 1,000,000 (an 11 s upload and a 256 s build; the stage 13 minutes).
     When the small size equals --records, its figure is the median of a's store builds (the same command), not a
     run of its own; --rss-repeats runs of each other measurement.

Usage: python bench/bench_store.py [--records 20000] [--rss-records 20000,200000] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from bench_scale import LoadSampler, TreeRSS, build_cmd, corpus  # noqa: E402

from tests.s3server import S3Server  # noqa: E402


def upload(paths: list[str], bucket: str) -> tuple[list[str], float]:
    """The s3:// URLs of the local files `paths`, uploaded under s3://bucket/in/ (this process's AWS_* point at the
    server); the seconds it took."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    t0 = time.perf_counter()
    urls = []
    for p in paths:
        key = f"{bucket}/in/{Path(p).name}"
        if not fs.exists(key):
            fs.put_file(p, key)
        urls.append(f"s3://{key}")
    return urls, time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=20000, help="records of the store-vs-local timing builds")
    p.add_argument(
        "--rss-records",
        default="20000,200000",
        help="SMALL,LARGE: the two corpora whose driver peak RSS is compared (builds from the store)",
    )
    p.add_argument("--repeats", type=int, default=3, help="paired store/local timing runs")
    p.add_argument("--rss-repeats", type=int, default=1, help="runs of each peak-RSS build not shared with a")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", default=str(ROOT / "bench/_work"))
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    try:
        rss_small, rss_large = (int(x) for x in args.rss_records.split(","))
    except ValueError:
        p.error(f"--rss-records takes SMALL,LARGE record counts (e.g. 20000,200000), not {args.rss_records!r}")
    os.environ.setdefault("SFTGO_CACHE", str(Path.home() / ".cache" / "sftgo"))
    work = Path(args.work)
    local = {n: corpus(work, n) for n in dict.fromkeys((args.records, rss_small, rss_large))}
    tmp = Path(tempfile.mkdtemp(prefix="bench-store-", dir=work))
    meter, load = TreeRSS(), LoadSampler()
    runs: dict[str, list] = {"local": [], "store": [], "rss_small": [], "rss_large": []}
    med = statistics.median
    load.start()
    try:
        with S3Server(log_dir=tmp) as server:
            os.environ.update(server.env)
            env = dict(os.environ)
            bucket = server.bucket("bench")
            uploaded, upload_s = {}, {}
            for n, paths in local.items():
                uploaded[n], upload_s[n] = upload(paths, bucket)
                print(
                    f"uploaded {n:,} records ({sum(Path(x).stat().st_size for x in paths) / 2**20:.0f} MB) "
                    f"in {upload_s[n]:.1f} s",
                    flush=True,
                )

            moto, log = psutil.Process(server.proc.pid), tmp / "moto.log"

            def served() -> tuple[float, int]:
                """(CPU seconds the server has used, requests it has logged) so far."""
                cpu = moto.cpu_times()
                with open(log, "rb") as fh:
                    return cpu.user + cpu.system, sum(b'HTTP/1.1" ' in line for line in fh)

            def store_build(n: int, out: str) -> dict:
                cpu, requests = served()
                res = meter.run(build_cmd(uploaded[n], f"s3://{bucket}/{out}", args.workers), env=env)
                cpu2, requests2 = served()
                return {**res, "server_cpu_s": cpu2 - cpu, "requests": requests2 - requests}

            def note(name: str, res: dict) -> None:
                print(
                    f"{name:<10} {res['wall_s']:7.2f} s  driver peak RSS {res['driver_peak_rss_mb']:6.0f} MB  "
                    f"tree {res['peak_rss_mb']:6.0f} MB"
                    + (
                        f"  server {res['server_cpu_s']:.1f} CPU-s, {res['requests']} requests"
                        if "requests" in res
                        else ""
                    )
                    + f"  (load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )

            # untimed: a first build fills caches (the embedded tokenizer, the server's first requests)
            warm, _ = upload(corpus(work, 200), bucket)
            meter.run(build_cmd(warm, f"s3://{bucket}/warm-out", args.workers), env=env)
            jobs = {
                "local": lambda: meter.run(build_cmd(local[args.records], tmp / "local-out", args.workers), env=env),
                "store": lambda: store_build(args.records, "timing-out"),
            }
            for r in range(args.repeats):  # paired runs; the order alternates
                for name in list(jobs)[:: 1 if r % 2 == 0 else -1]:
                    res = jobs[name]()
                    runs[name].append(res)
                    note(f"{r + 1} {name}", res)
            if rss_small == args.records:
                runs["rss_small"] = runs["store"]
            for r in range(args.rss_repeats):
                sides = [("rss_large", rss_large)] + ([] if rss_small == args.records else [("rss_small", rss_small)])
                for name, n in sides[:: 1 if r % 2 == 0 else -1]:
                    res = store_build(n, f"{name}-out")
                    runs[name].append(res)
                    note(f"{r + 1} {name}", res)
            import s3fs

            fs = s3fs.S3FileSystem()
            latency = []  # one small object's GET, from this process: the round trip of one request
            fs.pipe_file(f"{bucket}/probe", b"x" * 100)
            for _ in range(30):
                t0 = time.perf_counter()
                fs.cat_file(f"{bucket}/probe")
                latency.append(time.perf_counter() - t0)
            totals = {
                k: json.loads(fs.cat_file(f"{bucket}/{d}/manifest.json"))["totals"]
                for k, d in (("store", "timing-out"), ("rss_small", "timing-out"), ("rss_large", "rss_large-out"))
            }
            if rss_small != args.records:
                totals["rss_small"] = json.loads(fs.cat_file(f"{bucket}/rss_small-out/manifest.json"))["totals"]
            local_totals = json.loads((tmp / "local-out" / "manifest.json").read_text())["totals"]
    finally:
        load.stop.set()
        shutil.rmtree(tmp, ignore_errors=True)
    if local_totals != totals["store"]:
        raise SystemExit(f"the store build's totals {totals['store']} differ from the local build's {local_totals}")

    wall = {k: med([x["wall_s"] for x in v]) for k, v in runs.items()}
    driver = {k: med([x["driver_peak_rss_mb"] for x in v]) for k, v in runs.items()}
    tree = {k: med([x["peak_rss_mb"] for x in v]) for k, v in runs.items()}
    result = {
        "records": args.records,
        "tokens": totals["store"]["tokens"],
        "workers": args.workers,
        "repeats": args.repeats,
        "rss_repeats": args.rss_repeats,
        "rss_records": [rss_small, rss_large],
        "rss_tokens": [totals["rss_small"]["tokens"], totals["rss_large"]["tokens"]],
        "upload_s": {str(k): v for k, v in upload_s.items()},
        "input_mb": {str(k): sum(Path(x).stat().st_size for x in v) / 2**20 for k, v in local.items()},
        "cpus": os.cpu_count(),
        "runs": runs,
        "wall_s_median": wall,
        "driver_peak_rss_mb_median": driver,
        "tree_peak_rss_mb_median": tree,
        "store_over_local_wall": wall["store"] / wall["local"],
        "server_cpu_s_median": {k: med([x["server_cpu_s"] for x in runs[k]]) for k in ("store", "rss_large")},
        "requests_median": {k: med([x["requests"] for x in runs[k]]) for k in ("store", "rss_large")},
        "small_get_ms_median": 1000 * med(latency),
        "paired_store_over_local": [s["wall_s"] / x["wall_s"] for s, x in zip(runs["store"], runs["local"])],
        "driver_rss_large_over_small": driver["rss_large"] / driver["rss_small"],
        "target_rss": 1.2,
        "load_average": load.summary(),
    }
    print(
        f"\n{args.records:,} records ({result['tokens']:,} tokens), --workers {args.workers}, medians of "
        f"{args.repeats}; load average {result['load_average']['mean']:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"local -> local : {wall['local']:7.2f} s")
    print(f"s3 -> s3       : {wall['store']:7.2f} s   store / local {result['store_over_local_wall']:.2f} (no target)")
    print(
        f"server per store build: {result['server_cpu_s_median']['store']:.1f} CPU-s, "
        f"{result['requests_median']['store']:.0f} requests; a small GET {result['small_get_ms_median']:.1f} ms"
    )
    print(
        f"driver peak RSS from the store, {rss_large:,} / {rss_small:,} records: {driver['rss_large']:.0f} / "
        f"{driver['rss_small']:.0f} MB = {result['driver_rss_large_over_small']:.2f} (target <= 1.2)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
