"""Is the synthetic world too easy? Logistic regression on trivial features (the record's signal energy and
mean absolute amplitude; and, stronger, the same two per lead) versus hand-crafted physiologic features (rate,
RR irregularity, PR, QRS, axis, voltage, ST level and Q depth by territory) for a few attributes; balanced
binary tasks, so chance is 0.5.

    .venv/bin/python bench/linear_probe.py --patients 500 --records 800 --seed 0
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ecgray.synth.fidelity import measure
from ecgray.synth.labels import axis_answer
from ecgray.synth.world import generate_world

GROUPS = {"inferior": [1, 2, 5], "anterior": [6, 7, 8, 9], "lateral": [0, 4, 10, 11]}
ATTRIBUTES = {
    "atrial fibrillation": lambda c, r: "AFIB" in c,
    "complete bundle branch block": lambda c, r: bool(c & {"CLBBB", "CRBBB"}),
    "myocardial infarction (any territory)": lambda c, r: bool(c & {"IMI", "ASMI", "AMI", "ALMI", "ILMI", "LMI", "IPLMI", "IPMI", "PMI"}),
    "left ventricular hypertrophy / voltage": lambda c, r: bool(c & {"LVH", "VCLVH", "HVOLT"}),
    "left axis deviation": lambda c, r: axis_answer(r["heart_axis"], c) == "left axis deviation",
    "sinus tachycardia": lambda c, r: "STACH" in c,
    "first degree av block": lambda c, r: bool(c & {"1AVB", "LPR"}),
}  # fmt: skip


def features(signal: np.ndarray, fs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    trivial = np.array([(signal**2).mean(), np.abs(signal).mean()])  # (2,)
    per_lead = np.concatenate([(signal**2).mean(0), np.abs(signal).mean(0)])  # (24,)
    m = measure(signal, fs)
    phys = [m["hr"], m["rr_cv"], m["pr_ms"], np.isnan(m["pr_ms"]), m["qrs_ms"]]
    phys += [np.cos(np.radians(m["axis_deg"])), np.sin(np.radians(m["axis_deg"]))]
    if "beat" in m:
        beat, on, off = m["beat"], m["qrs_on"], m["qrs_off"]
        b = beat - beat[on]
        st = b[min(off + int(0.06 * fs), len(b) - 1)]  # ST level 60 ms after the J point, (12,)
        q = b[on : on + int(0.04 * fs)].min(0)  # initial 40 ms
        sokolow = -b[on:off, 6].min() + b[on:off, 10].max()
        phys += [sokolow, np.ptp(b[on:off], 0).mean()]
        phys += [st[g].mean() for g in GROUPS.values()] + [q[g].mean() for g in GROUPS.values()]
    else:
        phys += [np.nan] * 8
    return trivial, per_lead, np.array(phys, dtype=float)


def probe(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    n = min(len(pos), len(neg))
    idx = np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)])  # balanced
    model = make_pipeline(SimpleImputer(), StandardScaler(), LogisticRegression(max_iter=2000))
    return float(cross_val_score(model, x[idx], y[idx], cv=5, scoring="accuracy").mean()), int(2 * n)


def main() -> int:
    import wfdb
    from tqdm import tqdm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=500)
    p.add_argument("--records", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        generate_world(tmp, args.patients, args.seed, progress=False)
        db = pd.read_csv(Path(tmp) / "ptbxl/ptbxl_database.csv", index_col="ecg_id").head(args.records)
        triv, lead, phys, rows = [], [], [], []
        for _, row in tqdm(list(db.iterrows()), desc="features", file=sys.stderr):
            sig, fields = wfdb.rdsamp(str(Path(tmp) / "ptbxl" / row["filename_hr"]))
            t, pl, f = features(sig, int(fields["fs"]))
            triv.append(t)
            lead.append(pl)
            phys.append(f)
            rows.append((set(ast.literal_eval(row["scp_codes"])), row))
    triv, lead, phys = np.array(triv), np.array(lead), np.array(phys)
    result = {}
    print(f"{'attribute':40s} {'n':>5s} {'trivial':>8s} {'per-lead':>8s} {'physiologic':>11s}")
    for name, fn in ATTRIBUTES.items():
        y = np.array([fn(c, r) for c, r in rows])
        if min(y.sum(), (~y).sum()) < 10:
            print(f"{name:40s} skipped: {int(y.sum())} positives of {len(y)} records")
            continue
        acc_t, n = probe(triv, y, args.seed)
        acc_l, _ = probe(lead, y, args.seed)
        acc_p, _ = probe(phys, y, args.seed)
        result[name] = {
            "n_balanced": n,
            "trivial": round(acc_t, 3),
            "per_lead_energy": round(acc_l, 3),
            "physiologic": round(acc_p, 3),
        }
        print(f"{name:40s} {n:5d} {acc_t:8.3f} {acc_l:8.3f} {acc_p:11.3f}")
    print(json.dumps({"bench": "linear_probe", "patients": args.patients, "records": len(rows), "seed": args.seed, "chance": 0.5,
                      "cv": "5-fold, balanced", "seconds": round(time.time() - t0, 1), "accuracy": result}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
