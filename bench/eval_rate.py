"""Seconds per meta-test episode (adapt + answer the query set after every inner step), printed as JSON
with the conditions.

    .venv/bin/python bench/eval_rate.py                                  # tiny-llama, 5-way 5-shot
    .venv/bin/python bench/eval_rate.py --llm smollm2-135m --episodes 1 --inner-steps 2

The episodes are single-verify (template 27 wording, yes/no, constrained over the template's 2 answers)
over random ECGs and a random-init encoder: the cost does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import numpy as np
import torch

from ecgray.config import Config, EncoderConfig, EpisodeConfig, EvalConfig, MetaConfig, ModelConfig
from ecgray.data.episodes import EpisodeSampler
from ecgray.data.shards import ECGStore
from ecgray.eval.meta_test import meta_test
from ecgray.models.ecg_lm import build_model

ATTRS = [
    "baseline drift", "static noise", "burst noise", "electrodes problems", "extra beats",
    "pacemaker", "sinus rhythm", "atrial fibrillation", "left axis deviation", "low voltage",
]  # fmt: skip


def qa_rows(group: int) -> list[dict]:
    rows, sid = [], 0
    for qid, attr in enumerate(ATTRS):
        for answer in ("yes", "no"):
            for _ in range(group):
                rows.append(
                    {"sample_id": sid, "template_id": 27, "question_id": qid, "question_type": "single-verify",
                     "question": f"Does this ECG show symptoms of {attr}?", "answer": [answer],
                     "ecg_id": [sid + 1], "attribute": [attr], "split": "train"}
                )  # fmt: skip
                sid += 1
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llm", default="tiny-llama")
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--n-way", type=int, default=5)
    p.add_argument("--k-shot", type=int, default=5)
    p.add_argument("--n-query", type=int, default=5)
    p.add_argument("--inner-steps", type=int, default=15)
    p.add_argument("--decoding", choices=["constrained", "greedy"], default="constrained")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = Config(
        episodes=EpisodeConfig(
            n_way=args.n_way,
            k_shot=args.k_shot,
            n_query=args.n_query,
            meta_train_fraction=0.5,
            min_group_size=args.k_shot + args.n_query,
            min_class_size={
                t: args.k_shot + args.n_query for t in ("single-verify", "single-choose", "single-query")
            },
        ),  # fmt: skip
        encoder=EncoderConfig(d_enc=768, n_layers=4),
        model=ModelConfig(llm=args.llm, decoding=args.decoding),
        meta=MetaConfig(inner_steps=args.inner_steps),
        eval=EvalConfig(episodes=args.episodes),
    )
    rows = qa_rows(args.k_shot + args.n_query)
    n = len(rows)
    rng = np.random.default_rng(0)
    store = ECGStore(
        np.arange(1, n + 1), rng.normal(0, 0.3, (n, 12, 2500)).astype(np.float32), np.ones((n, 12), bool),
        np.arange(n), ["ptbxl"] * n, ["train"] * n, fs=500,
    )  # fmt: skip
    episodes = EpisodeSampler(rows, cfg.episodes, "meta-test", seed=0).episodes(args.episodes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-init encoder
        model = build_model(cfg, args.device)
    params = model.mapper_params()
    meta_test(model, params, episodes[:1], store, cfg)  # warm-up
    start = time.perf_counter()
    result = meta_test(model, params, episodes, store, cfg)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "seconds_per_episode": round(seconds / args.episodes, 4),
                "episodes": args.episodes,
                "llm": args.llm,
                "n_way": args.n_way,
                "k_shot": args.k_shot,
                "n_query": args.n_query,
                "inner_steps": args.inner_steps,
                "decoding": args.decoding,
                "device": args.device,
                "threads": args.threads,
                "exact_match_last_step": result["summary"]["single-verify"]["exact_match"][-1]["mean"],
                "torch": torch.__version__,
                "cpu": platform.processor() or platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
