"""Episodes per second assembled by EpisodeSampler, printed as JSON with the conditions.

    .venv/bin/python bench/episode_rate.py                       # the real shard, replicated
    .venv/bin/python bench/episode_rate.py --data data/prepared  # a prepared-shards dir

Without --data, the real ECG-QA shard `../shared/data/ecgqa/ptbxl/template/train/120000.json`
(10,000 single-verify samples, templates 26-28) is replicated `--replicas` times; replica r shifts
template, question and sample ids by r * 100 / 10,000 / 1,000,000 and excludes the shifted 26 and 28
too, so every replica gives the same 3 classes as the original (replicas 20 -> 200,000 samples,
60 classes, about half of full PTB-XL ECG-QA).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

from ecgray.config import EpisodeConfig
from ecgray.data.episodes import EpisodeSampler

REAL_SHARD = Path(__file__).resolve().parents[2] / "shared/data/ecgqa/ptbxl/template/train/120000.json"


def replicated(path: Path, replicas: int) -> tuple[list[dict], list[int]]:
    base = json.loads(path.read_text())
    samples, excluded = [], list(EpisodeConfig().excluded_templates)
    for r in range(replicas):
        if r:
            excluded += [26 + 100 * r, 28 + 100 * r]
        for s in base:
            samples.append(
                {
                    **s,
                    "template_id": s["template_id"] + 100 * r,
                    "question_id": s["question_id"] + 10_000 * r,
                    "sample_id": s["sample_id"] + 1_000_000 * r,
                }
            )
    return samples, excluded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="prepared-shards dir (qa/); default: the real shard replicated")
    parser.add_argument("--replicas", type=int, default=20)
    parser.add_argument("--question-type", default="single-verify")
    parser.add_argument("--n-way", type=int, default=5)
    parser.add_argument("--k-shot", type=int, default=5)
    parser.add_argument("--n-query", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cfg = EpisodeConfig(
        question_type=args.question_type, n_way=args.n_way, k_shot=args.k_shot, n_query=args.n_query
    )
    t0 = time.perf_counter()
    if args.data:
        from ecgray.data.shards import read_qa

        qt = None if args.question_type == "mixed" else [args.question_type]
        samples = read_qa(args.data, question_types=qt)
        source = args.data
    else:
        samples, excluded = replicated(REAL_SHARD, args.replicas)
        cfg = dataclasses.replace(cfg, excluded_templates=excluded)
        source = f"{REAL_SHARD.name} x {args.replicas}"
    t_read = time.perf_counter() - t0

    t0 = time.perf_counter()
    sampler = EpisodeSampler(samples, cfg, "meta-train", seed=args.seed)
    t_init = time.perf_counter() - t0

    t0 = time.perf_counter()
    episodes = sampler.episodes(args.episodes)
    t_sample = time.perf_counter() - t0

    t0 = time.perf_counter()
    n_bytes = sum(len(json.dumps(ep)) for ep in episodes)
    t_json = time.perf_counter() - t0

    print(
        json.dumps(
            {
                "episodes_per_s": round(args.episodes / t_sample, 1),
                "episodes_per_s_with_json": round(args.episodes / (t_sample + t_json), 1),
                "sampler_init_s": round(t_init, 3),
                "read_s": round(t_read, 3),
                "json_bytes_per_episode": n_bytes // max(args.episodes, 1),
                "conditions": {
                    "data": source,
                    "samples": len(samples),
                    "meta_train_classes": len(sampler.pools[cfg.question_type])
                    if cfg.question_type != "mixed"
                    else {qt: len(p) for qt, p in sampler.pools.items()},
                    "question_type": cfg.question_type,
                    "n_way": cfg.n_way,
                    "k_shot": cfg.k_shot,
                    "n_query": cfg.n_query,
                    "episodes": args.episodes,
                    "single process": True,
                    "python": platform.python_version(),
                    "cpu": platform.processor() or platform.machine(),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
