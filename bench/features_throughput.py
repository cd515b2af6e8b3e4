"""ECGs/s of `ecgray features` (Ray Data actor pool) vs the encoder in one process, and the reader's cost.

    .venv/bin/python bench/features_throughput.py [--n 2000] [--num-cpus N] [--set KEY=VALUE ...]

Writes N random ECGs (the toy prepared layout, 100 Hz x 5 s windows as configs/demo.yaml) and, with the
demo's encoder architecture at random init (or --set overrides), times on the same shards:
- `key_s`: `feature_key` (the random encoder's state_dict hashed, the shards' footers read);
- `ray_init_s`: starting the local Ray (not part of the job when a cluster runs);
- `job_cold_s`: `compute_features` end to end (actor start-up, read, encode, write Parquet, check, commit);
- `in_process_s`: `load_encoder` + the encoder on the same signals in batches of 32, one process with
  every core (what the job's encoding would cost with no Ray at all);
- `reuse_s`: the second `compute_features` (finds the committed folder);
- `read_batch_ms`: `FeatureStore.features` of 25 random ids (an episode's support set), against
  `encode_batch_ms`: the same ids' signals read (`ECGStore`) and encoded (what training does without features).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="ECGs to write and encode (a multiple of 20)")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs given to the local Ray")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], help="config overrides (encoder.*)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import torch

    from ecgray import features as F
    from ecgray.config import load_config, versions
    from ecgray.data.shards import ECGStore
    from ecgray.models.encoder import load_encoder
    from ecgray.train.toy import write_toy_prepared

    demo = load_config(REPO / "configs" / "demo.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = write_toy_prepared(tmp, n_templates=10, per_class=args.n // 20, fs=100, window_s=5.0)
        e = demo.encoder
        cfg = load_config(
            None,
            [
                f"data.prepared_dir={prepared}", "data.fs=100", "data.window_s=5.0", "encoder.fs=100",
                f"encoder.d_enc={e.d_enc}", f"encoder.n_layers={e.n_layers}", f"encoder.n_heads={e.n_heads}",
                f"encoder.stem_channels={e.stem_channels}", "encoder.random_init=true", *args.overrides,
            ],
        )  # fmt: skip
        seconds = {}
        t = time.perf_counter()
        F.feature_key(cfg)
        seconds["key_s"] = time.perf_counter() - t

        import ray

        t = time.perf_counter()
        ray.init(
            num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
        seconds["ray_init_s"] = time.perf_counter() - t
        t = time.perf_counter()
        report = F.compute_features(cfg, progress=False)
        seconds["job_cold_s"] = time.perf_counter() - t
        t = time.perf_counter()
        F.compute_features(cfg, progress=False)
        seconds["reuse_s"] = time.perf_counter() - t
        ray.shutdown()

        store = ECGStore.open(prepared)
        ids = store.ecg_ids
        signals, mask = torch.from_numpy(store.signals(ids).copy()), torch.from_numpy(store.lead_mask(ids))
        t = time.perf_counter()
        encoder = load_encoder(cfg.encoder, "cpu", seed=cfg.seed)
        with torch.no_grad():
            for i in range(0, len(ids), 32):
                encoder(signals[i : i + 32], mask[i : i + 32])
        seconds["in_process_s"] = time.perf_counter() - t

        rng = np.random.default_rng(0)
        batches = [rng.choice(ids, 25, replace=False) for _ in range(40)]
        features = F.open_features(cfg)
        t = time.perf_counter()
        for b in batches:
            features.features(b)
        read_ms = (time.perf_counter() - t) / len(batches) * 1e3
        t = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                encoder(torch.from_numpy(store.signals(b).copy()), torch.from_numpy(store.lead_mask(b)))
        encode_ms = (time.perf_counter() - t) / len(batches) * 1e3

    out = {
        "conditions": {
            "ecgs": len(ids),
            "input": f"12 x {cfg.data.n_samples} ({cfg.data.fs} Hz)",
            "encoder": {"d_enc": cfg.encoder.d_enc, "n_layers": cfg.encoder.n_layers, "random_init": True},
            "ray_cpus": args.num_cpus,
            "plan": report["plan"],
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "torch_threads_in_process": torch.get_num_threads(),
            "versions": {k: versions()[k] for k in ("torch", "ray", "pyarrow")},
        },
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "job_ecgs_per_s": round(len(ids) / seconds["job_cold_s"], 1),
        "job_encode_and_write_ecgs_per_s": report["ecgs_per_s"],
        "in_process_ecgs_per_s": round(len(ids) / seconds["in_process_s"], 1),
        "read_batch_ms": round(read_ms, 2),
        "encode_batch_ms": round(encode_ms, 2),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
