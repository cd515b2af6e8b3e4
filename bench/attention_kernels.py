"""What `model.attention` buys on CPU: the same work with the frozen LLM's attention as torch's
scaled_dot_product_attention (its CPU flash kernel) and as eager (matmul + softmax). Prints JSON: seconds
for (1) the meta-test inner loop on meta-val support sets in lockstep (adaptation only, as
`eval.episodes_per_pass` runs it), (2) one meta-training step (`meta_gradient` on `meta.tasks_per_step`
episodes), and the largest support-loss difference between the kernels (the same computation up to
floating point).

    .venv/bin/python bench/attention_kernels.py --run runs/demo --question-type single-choose --episodes 10

`--run` is a demo run directory (its config.yaml, checkpoint/ and prepared data).
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
from ecgray.models.ecg_lm import build_model
from ecgray.train.loop import FeatureCache, meta_gradient, task_sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="a demo run directory")
    parser.add_argument("--question-type", default="single-choose")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    base = load_config(run / "config.yaml")
    base = replace(base, episodes=replace(base.episodes, question_type=args.question_type))
    state = load_checkpoint(run / "checkpoint")[0]
    samples = read_qa(base.data.prepared_dir, base.data.source, base.data.variant, [args.question_type])
    test = EpisodeSampler(samples, base.episodes, "meta-val", seed=base.eval.seed).episodes(args.episodes)
    train = EpisodeSampler(samples, base.episodes, "meta-train", seed=base.seed).episodes(
        base.meta.tasks_per_step
    )
    store = ECGStore.open(base.data.prepared_dir)
    out = {"bench": "attention_kernels", "run": str(run), "question_type": args.question_type,
           "episodes": args.episodes, "inner_steps": base.meta.inner_steps, "tasks_per_step": base.meta.tasks_per_step,
           "dtype": base.model.dtype, "threads": args.threads}  # fmt: skip
    losses = {}
    for kind in ("sdpa", "eager"):
        cfg = replace(base, model=replace(base.model, attention=kind))
        model = build_model(cfg, "cpu", mapper_state=state)
        cache = FeatureCache(model, store)
        support, _ = task_sets(model.eval(), cache, test)
        params = [model.mapper_params() for _ in test]
        t0 = time.perf_counter()
        result = adapt(model.loss_fn(), params, support, cfg.meta.inner_steps, cfg.meta.inner_lr)
        out[f"meta_test_adaptation_seconds_{kind}"] = round(time.perf_counter() - t0, 1)
        losses[kind] = result.support_losses
        theta = {k: v.detach() for k, v in model.mapper_params().items()}
        meta_gradient(model.train(), cache, theta, train, cfg)  # warm-up (feature cache, allocator)
        t0 = time.perf_counter()
        meta_gradient(model, cache, theta, train, cfg)
        out[f"meta_train_step_seconds_{kind}"] = round(time.perf_counter() - t0, 1)
    for what in ("meta_test_adaptation", "meta_train_step"):
        out[f"speedup_{what}"] = round(out[f"{what}_seconds_sdpa"] / out[f"{what}_seconds_eager"], 2)
    out["max_abs_support_loss_difference"] = float((losses["sdpa"] - losses["eager"]).abs().max())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
