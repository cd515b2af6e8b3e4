"""Peak memory of a short `ecgray train` against the size of the data set: is per-worker memory flat?

For each size (default ~1k, ~10k, ~50k ECGs) a synthetic prepared world is written (`write_toy_prepared`:
random ECGs of 1 s at 100 Hz, single-verify questions, one ECG per question, Parquet shards of 1,024 ECGs
in row groups of 64), then `ecgray train` runs on it as a fresh process (its own local Ray: features
stage, 2 workers x 1 CPU, tiny-llama, a random frozen encoder, 4 outer steps), and the bench reads what the
run printed: the driver's peak RSS, the largest training worker's peak RSS (`peak_rss_mb`, the max over
workers) and the episode-source actor's. Per-worker growth from the smallest to the largest world is the
target figure (<= 10 %); the 800k projection extrapolates each process linearly in the number of ECGs
from the two largest worlds.

    .venv/bin/python bench/memory_scale.py [--sizes 1000 10000 50000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecgray.train.toy import toy_overrides, write_toy_prepared  # noqa: E402

PER_CLASS = 50  # samples (= ECGs) per class; classes = 2 x templates
PROJECT_TO = 800_000  # MIMIC-IV-ECG's ECGs


def run_size(n_ecgs: int, workers: int, root: Path) -> dict:
    templates = max(5, round(n_ecgs / (2 * PER_CLASS)))
    prepared = root / f"prepared_{n_ecgs}"
    t0 = time.perf_counter()
    write_toy_prepared(prepared, n_templates=templates, per_class=PER_CLASS)
    written = time.perf_counter() - t0
    n = 2 * templates * PER_CLASS
    overrides = [
        *toy_overrides(prepared),
        f"train.num_workers={workers}", "train.cpus_per_worker=1", f"meta.tasks_per_step={2 * workers}",
        "meta.outer_steps=4", "meta.eval_every=4", "meta.checkpoint_every=4", "meta.eval_episodes=2",
        f"train.storage_path={root / 'runs'}", f"train.name=mem_{n_ecgs}",
    ]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "ecgray.cli", "train", "--set", *overrides],
        capture_output=True, text=True, env=env, timeout=3600,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"ecgray train on {n} ECGs failed (exit {proc.returncode})")
    metrics = next(
        json.loads(line.removeprefix("metrics: "))
        for line in proc.stdout.splitlines()
        if line.startswith("metrics: ")
    )
    driver = next(
        float(line.split(":")[1].split()[0])
        for line in proc.stdout.splitlines()
        if line.startswith("driver peak RSS:")
    )
    return {
        "ecgs": n,
        "write_s": round(written, 1),
        "train_s": round(seconds, 1),
        "driver_peak_rss_mb": round(driver),
        "worker_peak_rss_mb": round(metrics["peak_rss_mb"]),
        "episode_source_rss_mb": round(metrics["episode_source_rss_mb"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ecgray-memory-") as tmp:
        for size in args.sizes:
            row = run_size(size, args.workers, Path(tmp))
            rows.append(row)
            print(json.dumps(row), flush=True)
    first, last = rows[0], rows[-1]
    print(f"\n| ECGs | driver peak RSS MB | worker peak RSS MB (max of {args.workers}) | episode source MB |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['ecgs']:,} | {r['driver_peak_rss_mb']:,} | {r['worker_peak_rss_mb']:,} | "
            f"{r['episode_source_rss_mb']:,} |"
        )
    growth = last["worker_peak_rss_mb"] / first["worker_peak_rss_mb"] - 1
    print(f"\nper-worker peak RSS {first['ecgs']:,} -> {last['ecgs']:,} ECGs: {growth:+.1%} (target <= +10%)")
    if len(rows) >= 2:
        a, b = rows[-2], rows[-1]
        for key in ("driver_peak_rss_mb", "worker_peak_rss_mb", "episode_source_rss_mb"):
            slope = (b[key] - a[key]) / (b["ecgs"] - a["ecgs"])  # MB per ECG
            print(
                f"projected {key} at {PROJECT_TO:,} ECGs: {b[key] + slope * (PROJECT_TO - b['ecgs']):,.0f} MB "
                f"({slope * 1024:+.2f} kB per ECG)"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if growth <= 0.10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
