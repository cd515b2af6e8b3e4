"""Can the inner loop fit a support set? Adapts a mapper (a checkpoint's, or a fresh one) on meta-val
episodes' support sets with plain SGD and prints, per inner step, the support loss and the exact match on the
support set itself and on the query set (JSON).

    .venv/bin/python bench/support_fit.py --run runs/demo --steps 16 --inner-lr 0.01 0.05
    .venv/bin/python bench/support_fit.py --run runs/demo --fresh --set model.prompt_layout=prefix_first

Inside an episode every class has its own question and one answer, so a model that fits the support set
answers the query set by its question: support exact match is what few-shot adaptation can reach at best.
`--run` is a demo run directory (its config.yaml, checkpoint/ and prepared data); --set overrides the config.
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
from ecgray.eval.baselines import fresh_mapper_params
from ecgray.eval.meta_test import answer_query, load_template_answers, options_mode, query_options
from ecgray.meta.maml import adapt
from ecgray.models.checkpoint import load_checkpoint
from ecgray.models.ecg_lm import build_model
from ecgray.train.loop import FeatureCache, task_sets


def exact_match(model, params, task, items, options) -> float:
    prefix = model.fuse(task.pooled, task.tokens, params)
    score = answer_query(model, prefix, [i["question"] for i in items], [i["answer"] for i in items], options)
    return sum(score.correct) / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="a demo run directory")
    parser.add_argument("--question-type", default="single-verify")
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--every", type=int, default=4, help="score exact match every this many steps")
    parser.add_argument("--inner-lr", type=float, nargs="+", default=[0.05])
    parser.add_argument(
        "--fresh", action="store_true", help="a freshly initialised mapper, not the checkpoint"
    )
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, dotted.key=value")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    cfg = load_config(run / "config.yaml", args.set)
    cfg = replace(cfg, episodes=replace(cfg.episodes, question_type=args.question_type))
    state = None if args.fresh else load_checkpoint(run / "checkpoint")[0]
    model = build_model(cfg, "cpu", mapper_state=state).eval()
    start = fresh_mapper_params(model, cfg.eval.seed) if args.fresh else model.mapper_params()
    store = ECGStore.open(cfg.data.prepared_dir)
    samples = read_qa(cfg.data.prepared_dir, cfg.data.source, cfg.data.variant, [args.question_type])
    episodes = EpisodeSampler(samples, cfg.episodes, "meta-val", seed=cfg.eval.seed).episodes(args.episodes)
    answers = load_template_answers(cfg)
    cache, loss = FeatureCache(model, store), model.loss_fn()
    out = []
    for lr in args.inner_lr:
        for index, episode in enumerate(episodes):
            support, query = task_sets(model, cache, [episode])
            s_task, q_task = support.tasks[0], query.tasks[0]
            q_options = query_options(episode, answers, options_mode(cfg))
            s_options = query_options({**episode, "query": episode["support"]}, answers, options_mode(cfg))
            row = {"inner_lr": lr, "episode": index, "steps": [], "support_em": [], "query_em": []}

            def score(step, fast, row=row, s_task=s_task, q_task=q_task, s_opt=s_options, q_opt=q_options,
                      ep=episode):  # fmt: skip
                if step % args.every == 0:
                    with torch.no_grad():
                        row["steps"].append(step)
                        row["support_em"].append(exact_match(model, fast, s_task, ep["support"], s_opt))
                        row["query_em"].append(exact_match(model, fast, q_task, ep["query"], q_opt))

            t0 = time.perf_counter()
            init = {k: v.detach().clone() for k, v in start.items()}
            score(0, init)
            result = adapt(loss, init, support, args.steps, lr, True, on_step=score)
            row["support_loss"] = [round(float(x), 3) for x in result.support_losses[:, 0]]
            row["seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(row), flush=True)
            out.append(row)
    print(json.dumps({
        "bench": "support_fit", "run": str(run), "mapper": "fresh" if args.fresh else "checkpoint",
        "question_type": args.question_type, "layout": cfg.model.prompt_layout, "dtype": cfg.model.dtype,
        "steps": args.steps, "final_support_em": {str(lr): [r["support_em"][-1] for r in out if r["inner_lr"] == lr]
                                                 for lr in args.inner_lr},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
