"""`ecgray episodes`: print N-way K-shot episodes of a prepared-shards dir as JSON lines.

    ecgray episodes --data data/prepared --question-type single-verify --n-way 5 --k-shot 5 \\
        --n-query 5 --split meta-test --count 20 --seed 0 --split-mode class

The episode flags are shorthands for `--set episodes.<field>=...` (validated the same way); the
typed config (`--config`, `--set`) gives everything else, e.g. data.source and data.variant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ecgray.cli import add_config_arguments, config_from_args
from ecgray.config import QUESTION_TYPES

# flag -> EpisodeConfig field
_EPISODE_FLAGS = {
    "question_type": "question_type",
    "n_way": "n_way",
    "k_shot": "k_shot",
    "n_query": "n_query",
    "split_mode": "split_mode",
    "protocol": "protocol",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", help="prepared-shards dir holding qa/*.parquet (default: data.prepared_dir)"
    )
    parser.add_argument("--question-type", choices=[*QUESTION_TYPES, "mixed"], help="episodes.question_type")
    parser.add_argument("--n-way", type=int, help="episodes.n_way (classes per episode)")
    parser.add_argument("--k-shot", type=int, help="episodes.k_shot (support samples per class)")
    parser.add_argument("--n-query", type=int, help="episodes.n_query (query samples per class)")
    parser.add_argument("--split-mode", choices=["class", "patient", "template"], help="episodes.split_mode")
    parser.add_argument("--protocol", choices=["paper", "grounded"], help="episodes.protocol")
    parser.add_argument("--split", choices=["meta-train", "meta-val", "meta-test"], default="meta-train")
    parser.add_argument("--count", type=int, default=10, help="episodes to print (default 10)")
    parser.add_argument("--seed", type=int, help="episode seed (default: the config's seed)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    for flag, fld in _EPISODE_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            args.overrides = [*args.overrides, f"episodes.{fld}={value}"]
    cfg = config_from_args(args)
    data = Path(args.data or cfg.data.prepared_dir)
    if not (data / "qa").is_dir():
        print(f"ecgray episodes: {data}: no qa/ folder (expected `ecgray prepare` output)", file=sys.stderr)
        return 2
    if args.count < 0:
        print(f"ecgray episodes: --count must be >= 0, got {args.count}", file=sys.stderr)
        return 2
    seed = cfg.seed if args.seed is None else args.seed

    from ecgray.data.episodes import EpisodeError, EpisodeSampler
    from ecgray.data.shards import read_qa

    samples = read_qa(
        data,
        source=cfg.data.source,
        variant=cfg.data.variant,
        question_types=cfg.episodes.types(),
    )
    try:
        sampler = EpisodeSampler(samples, cfg.episodes, args.split, seed)
        for i in range(args.count):
            print(json.dumps(sampler.episode(i)))
    except EpisodeError as err:
        print(f"ecgray episodes: {err}", file=sys.stderr)
        return 2
    return 0
