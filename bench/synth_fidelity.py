"""Fidelity of the synthetic world: label-blind measurements (neurokit2 R peaks + multi-lead median-beat
intervals) of generated 500 Hz records against their labels. Prints a table and a JSON line.

    .venv/bin/python bench/synth_fidelity.py --records 500 --patients 500 --seed 0
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from ecgray.synth.fidelity import checks, measure
from ecgray.synth.world import generate_world


def run(world: Path, records: int, with_nk: bool = True) -> dict:
    import wfdb
    from tqdm import tqdm

    db = pd.read_csv(world / "ptbxl" / "ptbxl_database.csv", index_col="ecg_id")
    agree: dict[str, list[bool]] = defaultdict(list)
    for _ecg_id, row in tqdm(list(db.head(records).iterrows()), desc="fidelity", file=sys.stderr):
        signal, fields = wfdb.rdsamp(str(world / "ptbxl" / row["filename_hr"]))
        codes = ast.literal_eval(row["scp_codes"])
        m = measure(signal, int(fields["fs"]), with_nk_delineation=with_nk)
        extra = row["extra_beats"]
        for k, v in checks(codes, row["heart_axis"], extra, m).items():
            agree[k].append(v)
        if with_nk:
            for k, v in checks(codes, row["heart_axis"], extra, m, prefix="nk_").items():
                agree["neurokit2 dwt " + k[3:]].append(v)
    return {k: {"agreement": round(float(np.mean(v)), 4), "n": len(v)} for k, v in sorted(agree.items())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=500)
    p.add_argument("--patients", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world", help="an existing `ecgray synth` output (default: generate one in a temp dir)")
    p.add_argument(
        "--no-nk-delineation", action="store_true", help="skip neurokit2's own dwt PR / QRS columns"
    )
    args = p.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(args.world) if args.world else Path(tmp)
        if not args.world:
            generate_world(world, args.patients, args.seed, progress=False)
        table = run(world, args.records, with_nk=not args.no_nk_delineation)
    print(f"{'check':48s} {'agreement':>9s} {'n':>5s}")
    for k, v in table.items():
        print(f"{k:48s} {v['agreement']:9.3f} {v['n']:5d}")
    print(json.dumps({"bench": "synth_fidelity", "records": args.records, "patients": args.patients, "seed": args.seed,
                      "fs": 500, "seconds": round(time.time() - t0, 1), "checks": table}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
