"""Signal-model speed: records per second on one core for 10 s, 12 leads at 500 Hz (label -> RecordSpec ->
signal, no file writing), and the whole `generate_world` wall time for the default world.

    .venv/bin/python bench/synth_speed.py --records 1000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--world-patients",
        type=int,
        default=None,
        help="also time generate_world (default: SynthConfig.patients)",
    )
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from ecgray.config import SynthConfig
    from ecgray.synth.labels import label_rows, record_spec, sample_patient
    from ecgray.synth.signal import synthesize
    from ecgray.synth.world import generate_world

    rng = np.random.default_rng(args.seed)
    rows = label_rows().sample(args.records, replace=True, random_state=args.seed).to_dict("records")
    t0 = time.perf_counter()
    specs = [record_spec(r["codes"], r, sample_patient(rng), rng) for r in rows]
    t1 = time.perf_counter()
    for spec, _ in specs:
        synthesize(spec, 500, 10.0, rng)
    t2 = time.perf_counter()
    patients = args.world_patients or SynthConfig().patients
    with tempfile.TemporaryDirectory() as tmp:
        t3 = time.perf_counter()
        summary = generate_world(tmp, patients, args.seed, progress=False)
        t4 = time.perf_counter()
    print(json.dumps({
        "bench": "synth_speed", "records": args.records, "fs": 500, "seconds_per_record": 10, "leads": 12,
        "cpu": platform.processor() or platform.machine(), "threads": os.environ.get("OMP_NUM_THREADS"),
        "records_per_s_signal": round(args.records / (t2 - t1), 1),
        "records_per_s_spec_and_signal": round(args.records / (t2 - t0), 1),
        "world_patients": patients, "world_records": summary["records"],
        "world_qa_samples": sum(summary["qa_samples"].values()), "world_seconds": round(t4 - t3, 1),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
