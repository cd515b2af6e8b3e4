"""Constrained decoding cost: scoring every admissible answer of a query set, the way `score_options` does
it (each prompt once, its KV cache shared by the options) against teacher forcing every option on its full
prompt (the definition; what ecgray did before). Prints JSON with both timings, the speedup and the largest
score difference.

    .venv/bin/python bench/option_scoring.py --data runs/demo/data/prepared --config configs/demo.yaml

Options: a meta-test single-query episode of the prepared data with `eval.options` (default "question":
the template's admissible answers + the support set's answers), as the demo's evaluation scores them.
The mapper is freshly initialised: the cost does not depend on its weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace

import torch

from ecgray.config import load_config
from ecgray.data.episodes import EpisodeSampler
from ecgray.data.shards import ECGStore, read_qa
from ecgray.eval.meta_test import encode_ecgs, load_template_answers, query_options
from ecgray.models.ecg_lm import build_model


def full_rows(model, prefix, questions, options, chunk: int = 128) -> list[torch.Tensor]:
    """Teacher forcing each option on its whole prompt (the reference)."""
    flat = [(i, o) for i, opts in enumerate(options) for o in opts]
    scores = []
    with torch.no_grad():
        for start in range(0, len(flat), chunk):
            part = flat[start : start + chunk]
            rows = model.prompt_rows([questions[i] for i, _ in part], [o for _, o in part])
            scores.append(-model.token_nll(prefix[[i for i, _ in part]], model.collate(rows)).sum(1))
    return list(torch.cat(scores).split([len(o) for o in options]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--data", default="runs/demo/data/prepared", help="a prepared dir (ecgray prepare)")
    parser.add_argument("--question-type", default="single-query")
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto", help="model.dtype of the frozen LLM (auto: fp32 on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(
        args.config,
        [f"data.prepared_dir={args.data}", "encoder.checkpoint=null", f"model.dtype={args.dtype}"],
    )
    cfg = replace(cfg, episodes=replace(cfg.episodes, question_type=args.question_type))
    store = ECGStore.open(args.data)
    samples = read_qa(args.data, cfg.data.source, cfg.data.variant, [args.question_type])
    episodes = EpisodeSampler(samples, cfg.episodes, "meta-test", seed=cfg.eval.seed).episodes(args.episodes)
    model = build_model(cfg, "cpu").eval()
    answers = load_template_answers(replace(cfg, data=replace(cfg.data, ecgqa_dir=None)))
    timings = {"shared_prompt_cache": 0.0, "full_rows": 0.0}
    n_options, max_diff = 0, 0.0
    for episode in episodes:
        query = episode["query"]
        pooled, tokens = encode_ecgs(model, store, [int(i["ecg_id"]) for i in query], None, None)
        with torch.no_grad():
            prefix = model.fuse(pooled, tokens)
        questions = [i["question"] for i in query]
        options = query_options(episode, answers, cfg.eval.options)
        n_options += sum(len(o) for o in options)
        results = {}
        for name, fn in (
            ("shared_prompt_cache", model.score_options),
            ("full_rows", lambda *a: full_rows(model, *a)),
        ):
            t0 = time.perf_counter()
            results[name] = fn(prefix, questions, options)
            timings[name] += time.perf_counter() - t0
        for a, b in zip(results["shared_prompt_cache"], results["full_rows"], strict=True):
            max_diff = max(max_diff, float((a - b).abs().max()))
    print(json.dumps({
        "bench": "option_scoring", "llm": cfg.model.llm, "dtype": args.dtype, "question_type": args.question_type,
        "episodes": len(episodes), "queries_per_episode": len(episodes[0]["query"]),
        "options_per_episode": n_options / len(episodes),
        "seconds_per_query_set": {k: round(v / len(episodes), 2) for k, v in timings.items()},
        "speedup": round(timings["full_rows"] / timings["shared_prompt_cache"], 2),
        "max_abs_score_diff": max_diff, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
