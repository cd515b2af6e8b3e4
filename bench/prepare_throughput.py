"""Records/s of reading PTB-XL-sized WFDB records: `ecgray prepare` (Ray Data) vs wfdb.rdsamp vs the fast path.

    .venv/bin/python bench/prepare_throughput.py [--n 1000] [--batch-size 64] [--num-cpus N]

Writes N records (12 leads x 5,000 samples, 500 Hz, format 16, as PTB-XL's records500) plus a matching
ptbxl_database.csv and ECG-QA tree into a temporary directory, then times, on the same files:
- `wfdb_rdsamp`: a plain `wfdb.rdsamp` loop (raw signals only);
- `fast_numpy`: `read_record_fast` loop, one header parse per layout (raw signals only);
- `fast_numpy_canonical`: the same + `to_canonical` (what each Ray task does), one process;
- `ray_data_read_write_cold` / `_warm`: `prepare.write_ecgs`, the Ray Data pipeline (the workers read the
  records and write the ECG shards to a staging folder; the driver gets status rows only), consumed to the
  end (Ray already started; the cold pass also starts the worker processes);
- `prepare_end_to_end`: `prepare()` as the CLI runs it (after the above), with QA, report and the swap.
`driver_received_bytes_per_record`: what reaches the driver per record in the pipeline (the float32 window
alone is 12 x n_samples x 4 bytes). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecgray.config import LEAD_NAMES, DataConfig, versions  # noqa: E402
from ecgray.data import prepare as prep  # noqa: E402
from ecgray.data.ptbxl import HeaderCache, read_record_fast, record_path  # noqa: E402


def build(root: Path, n: int, seed: int = 0) -> DataConfig:
    import wfdb

    rng = np.random.default_rng(seed)
    ptb, qa = root / "ptbxl", root / "ecgqa" / "ptbxl"
    rows = ["ecg_id,patient_id,age,sex,scp_codes,strat_fold"]
    for ecg_id in range(1, n + 1):
        path = record_path(ptb, ecg_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        x = rng.normal(0, 0.3, (5000, 12)).round(3)  # (T, 12) mV
        wfdb.wrsamp(
            path.name,
            fs=500,
            units=["mV"] * 12,
            sig_name=list(LEAD_NAMES),
            p_signal=x,
            fmt=["16"] * 12,
            adc_gain=[1000.0] * 12,
            baseline=[0] * 12,
            write_dir=str(path.parent),
        )
        rows.append(f"{ecg_id},{ecg_id}.0,50,0,\"{{'NORM': 100.0}}\",{ecg_id % 10 + 1}")
    ptb.joinpath("ptbxl_database.csv").write_text("\n".join(rows) + "\n")
    (qa / "template" / "train").mkdir(parents=True)
    samples = [
        {
            "template_id": 1,
            "question_id": 1,
            "sample_id": i,
            "question_type": "single-verify",
            "attribute_type": "scp_code",
            "question": "Does this ECG show X?",
            "answer": ["yes"],
            "ecg_id": [i + 1],
            "attribute": ["x"],
        }
        for i in range(n)
    ]
    (qa / "template" / "train" / "0.json").write_text(json.dumps(samples))
    return DataConfig(ptbxl_dir=str(ptb), ecgqa_dir=str(root / "ecgqa"))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="records to write and read")
    ap.add_argument(
        "--batch-size", type=int, default=64, help="records per Ray Data task (data.read_batch_size)"
    )
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs given to the local Ray")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        cfg = replace(build(root, args.n), read_batch_size=args.batch_size)
        t_build = time.perf_counter() - t0
        paths = [str(record_path(cfg.ptbxl_dir, i)) for i in range(1, args.n + 1)]

        import wfdb

        seconds = {}
        seconds["wfdb_rdsamp"] = timed(lambda: [wfdb.rdsamp(p) for p in paths])
        cache = HeaderCache()
        seconds["fast_numpy"] = timed(lambda: [read_record_fast(p, cache) for p in paths])
        seconds["fast_numpy_canonical"] = timed(lambda: [read_record_fast(p, cache, cfg) for p in paths])

        import ray

        t0 = time.perf_counter()
        ray.init(
            num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
        ray_init = time.perf_counter() - t0
        _, items, _, _, _ = prep.collect(cfg)
        rows_per_shard = prep.shard_size(len(items), cfg, args.num_cpus)
        received = []

        def pipeline(pass_name: str) -> None:
            staging = root / f"staging-{pass_name}"
            received.clear()
            received.extend(t.nbytes for t in prep.write_ecgs(items, cfg, str(staging), rows_per_shard))

        # The first pass also starts Ray's worker processes and imports ecgray in them.
        seconds["ray_data_read_write_cold"] = timed(lambda: pipeline("cold"))
        seconds["ray_data_read_write_warm"] = timed(lambda: pipeline("warm"))
        received_per_record = sum(received) / args.n
        report = {}
        seconds["prepare_end_to_end"] = timed(
            lambda: report.update(prep.prepare(cfg, root / "prepared", progress=False))
        )
        ray.shutdown()
        assert report["records"]["read"] == args.n, report["records"]

    print(
        json.dumps(
            {
                "records": args.n,
                "records_per_s": {k: round(args.n / v, 1) for k, v in seconds.items()},
                "seconds": {k: round(v, 3) for k, v in seconds.items()},
                "driver_received_bytes_per_record": round(received_per_record, 1),
                "signal_bytes_per_record": 12 * cfg.n_samples * 4,
                "conditions": {
                    "record": "12 leads x 5000 samples, 500 Hz, format 16 (PTB-XL records500)",
                    "window": f"{cfg.window_s} s at {cfg.fs} Hz -> float32 (12, {cfg.n_samples})",
                    "read_batch_size": args.batch_size,
                    "shard_rows": rows_per_shard,
                    "row_group_rows": prep.ECG_ROW_GROUP_ROWS,
                    "ray_num_cpus": args.num_cpus,
                    "machine_cpus": os.cpu_count(),
                    "ray_init_s": round(ray_init, 2),
                    "build_records_s": round(t_build, 2),
                    "prepare_timings_s": report["timings_s"],
                    "versions": {k: versions()[k] for k in ("python", "ray", "wfdb", "numpy", "pyarrow")},
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
