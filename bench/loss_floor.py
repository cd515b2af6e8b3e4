"""The ECG-blind loss floor of the alignment items (`ecgray.eval.metrics.blind_loss_floor`), timed: each
distinct (question, answer, ECG count) tokenised once and counted as often as it occurs, against every item
tokenised one by one (the path before that change, rebuilt here from the same tokenisation), on a demo run's
prepared data. Prints one JSON object: items, distinct rows, both floors (equal up to summation order) and
seconds.

    .venv/bin/python bench/loss_floor.py --run runs/demo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/demo", help="a demo run directory (config.yaml, data/, encoder/)")
    args = p.parse_args()
    import torch

    from ecgray.config import load_config
    from ecgray.data.shards import read_qa
    from ecgray.eval import metrics
    from ecgray.models.ecg_lm import build_model
    from ecgray.train.align import align_items

    run = Path(args.run).resolve()
    cfg = load_config(str(run / "config.yaml"), [f"data.prepared_dir={run / 'data' / 'prepared'}"])
    qa = read_qa(cfg.data.prepared_dir, cfg.data.source, cfg.data.variant)
    items, _ = align_items(cfg.data.prepared_dir, qa, cfg)
    stats = {"feature_mean": torch.zeros(cfg.encoder.d_enc), "feature_std": torch.ones(cfg.encoder.d_enc)}
    lm = build_model(cfg, feature_stats=stats)  # the tokenisation is all the floor reads

    t = time.perf_counter()
    floor = metrics.blind_loss_floor(items, lm)
    seconds = time.perf_counter() - t

    t = time.perf_counter()  # every item tokenised on its own row
    questions = [i["question"] for i in items]
    n_ecg = [len(i["ecg_id"]) if isinstance(i["ecg_id"], list | tuple) else 1 for i in items]
    prompt = lm.prompt_rows(questions, None, n_ecg=n_ecg)
    keys = [(tuple(b), tuple(a), n) for b, a, n in zip(prompt.before, prompt.after, n_ecg, strict=True)]
    targets = lm.prompt_rows(questions, [i["answer"] for i in items], n_ecg=n_ecg).targets
    per_item = metrics.blind_nll_floor(keys, targets, teacher_forced=not lm.cfg.paper_compat)
    per_item_seconds = time.perf_counter() - t

    distinct = len({(i["question"], tuple(i["answer"]), n) for i, n in zip(items, n_ecg, strict=True)})
    print(json.dumps({
        "run": str(run), "items": len(items), "distinct_rows": distinct,
        "floor": floor, "floor_per_item": per_item, "seconds": round(seconds, 2),
        "seconds_per_item_path": round(per_item_seconds, 2), "speedup": round(per_item_seconds / seconds, 1),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
