"""What length buckets buy: the inner loop on meta-test support sets collated in length buckets (what
`ECGLanguageModel.task_set` does) vs every row in one batch padded to the longest answer. Prints JSON: seconds
for the same adaptation both ways, the padded token slots per pass, and the largest difference in the
support losses (the two are the same computation up to floating point).

    .venv/bin/python bench/length_buckets.py --run runs/demo --question-type single-query --episodes 10

`--run` is a demo run directory (its config.yaml, checkpoint/ and prepared data); the episodes are adapted
in lockstep, as the meta-test does with `eval.episodes_per_pass`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from ecgray.config import load_config
from ecgray.data.episodes import EpisodeSampler
from ecgray.data.shards import ECGStore, read_qa
from ecgray.meta.maml import adapt
from ecgray.models.checkpoint import load_checkpoint
from ecgray.models.ecg_lm import TaskSet, build_model, stack_rows
from ecgray.train.loop import FeatureCache, task_sets


def slots(task_set: TaskSet) -> int:
    return sum(b.after_ids.numel() for _, b in task_set.batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="a demo run directory")
    parser.add_argument("--question-type", default="single-query")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=None, help="inner steps (default: the run's)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    cfg = load_config(run / "config.yaml")
    cfg = replace(cfg, episodes=replace(cfg.episodes, question_type=args.question_type))
    model = build_model(cfg, "cpu", mapper_state=load_checkpoint(run / "checkpoint")[0]).eval()
    store = ECGStore.open(cfg.data.prepared_dir)
    samples = read_qa(cfg.data.prepared_dir, cfg.data.source, cfg.data.variant, [args.question_type])
    episodes = EpisodeSampler(samples, cfg.episodes, "meta-test", seed=cfg.eval.seed).episodes(args.episodes)
    support, _ = task_sets(model, FeatureCache(model, store), episodes)
    one = TaskSet(support.tasks, [(list(range(sum(len(t.rows) for t in support.tasks))),
                                   model.collate(stack_rows(support.tasks)))])  # fmt: skip
    steps = args.steps or cfg.meta.inner_steps
    loss = model.loss_fn()
    out = {"bench": "length_buckets", "run": str(run), "question_type": args.question_type,
           "episodes": args.episodes, "inner_steps": steps, "dtype": cfg.model.dtype, "threads": args.threads,
           "buckets": len(support.batches), "padded_slots": {"buckets": slots(support), "one_batch": slots(one)}}  # fmt: skip
    losses = {}
    for name, data in (("one_batch", one), ("buckets", support)):
        params = [model.mapper_params() for _ in episodes]
        t0 = time.perf_counter()
        result = adapt(loss, params, data, steps, cfg.meta.inner_lr)
        out[f"seconds_{name}"] = round(time.perf_counter() - t0, 1)
        losses[name] = result.support_losses
    out["speedup"] = round(out["seconds_one_batch"] / out["seconds_buckets"], 2)
    out["max_abs_loss_difference"] = float((losses["buckets"] - losses["one_batch"]).abs().max())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
