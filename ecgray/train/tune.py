"""`ecgray tune`: Ray Tune over meta-training hyperparameters, ASHA on the meta-test accuracy.

Each trial is a whole meta-training run: a Tune function trainable that builds `meta_train.build_trainer`
with the trial's overrides and fits it, the Ray 2.60 (Train V2) idiom for Train inside Tune: the
trainer's `TuneReportCallback` forwards every worker report to Tune, so ASHA sees the periodic meta-test
and stops weak trials. The trial function itself holds no resources; at most
(cluster CPUs or GPUs) // (resources of one trial's workers) trials run at once.

`train.tune_space` maps dotted keys to the values swept as a grid (e.g. meta.inner_lr, meta.inner_steps,
meta.first_order, meta.meta_lr, model.n_prefix, model.mapper). Results go to
<storage_path>/<name>/sweep.csv, sweep.json and sweep.png (accuracy vs each swept value).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ecgray.config import Config, from_dict, to_dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ecgray.cli import add_config_arguments

    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ecgray.cli import config_from_args

    cfg = config_from_args(args)
    table = sweep(cfg)
    print(table.to_string(index=False))
    return 0


def trial_config(base: dict, params: dict, trial_name: str) -> Config:
    """The base config with a trial's dotted overrides, validated (a bad key names itself)."""
    from ecgray.config import _set_dotted

    tree = json.loads(json.dumps(base))
    for key, value in params.items():
        _set_dotted(tree, key, value)
    tree["train"]["name"] = f"{tree['train']['name']}_{trial_name}"
    tree["train"]["tune_space"] = {}
    return from_dict(tree)


def _trial(config: dict) -> None:
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ecgray.train.meta_train import build_trainer

    ctx = ray.tune.get_context()
    cfg = trial_config(config["base"], config["params"], ctx.get_trial_id())
    result = build_trainer(cfg, callbacks=[TuneReportCallback()]).fit()
    if result.error is not None:
        raise result.error


def max_concurrent(cfg: Config) -> int:
    """Trials that fit the cluster at once (each trial's workers reserve their CPUs / GPUs)."""
    import ray

    res = ray.cluster_resources()
    key, per = ("GPU", 1) if cfg.train.use_gpu else ("CPU", cfg.train.cpus_per_worker)
    fits = int(res.get(key, 0) // (per * cfg.train.num_workers))
    if fits < 1:
        raise RuntimeError(
            f"one trial needs {cfg.train.num_workers} x {per} {key} but the cluster has {res.get(key, 0)}"
        )
    return fits


def sweep(cfg: Config):
    """Run the sweep -> pandas table (one row per trial: swept values, metrics); also written to disk."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from ecgray.train.meta_train import check_config

    if not cfg.train.tune_space:
        raise ValueError("train.tune_space is empty: give dotted keys -> lists of values to sweep")
    for key, values in cfg.train.tune_space.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"train.tune_space.{key}: expected a non-empty list of values, got {values!r}")
        trial_config(to_dict(cfg), {key: values[0]}, "check")  # unknown keys / bad values fail here
    check_config(cfg)
    if not ray.is_initialized():
        ray.init()
    scheduler = ASHAScheduler(
        time_attr="step",
        max_t=cfg.meta.outer_steps,
        grace_period=min(cfg.meta.outer_steps, cfg.train.tune_grace_period * cfg.meta.eval_every),
        reduction_factor=cfg.train.tune_reduction_factor,
    )
    space = {
        "base": to_dict(cfg),
        "params": {k: tune.grid_search(v) for k, v in cfg.train.tune_space.items()},
    }
    storage = (
        str(Path(cfg.train.storage_path).resolve())
        if "://" not in cfg.train.storage_path
        else cfg.train.storage_path
    )
    tuner = tune.Tuner(
        _trial,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=cfg.train.tune_metric,
            mode="max",
            scheduler=scheduler,
            num_samples=cfg.train.tune_samples,
            max_concurrent_trials=max_concurrent(cfg),
        ),
        run_config=tune.RunConfig(name=f"{cfg.train.name}_sweep", storage_path=storage),
    )
    grid = tuner.fit()
    rows = []
    for result in grid:
        params = (result.config or {}).get("params", {})
        metrics = result.metrics or {}
        rows.append({
            **params,
            "step": metrics.get("step"),
            "meta_loss": metrics.get("meta_loss"),
            cfg.train.tune_metric: metrics.get(cfg.train.tune_metric),
            "error": None if result.error is None else str(result.error).splitlines()[0],
        })  # fmt: skip
    return write_results(
        rows, list(cfg.train.tune_space), cfg.train.tune_metric, Path(storage) / f"{cfg.train.name}_sweep"
    )


def write_results(rows: list[dict], keys: list[str], metric: str, out_dir: Path):
    """sweep.csv, sweep.json and sweep.png (metric vs each swept value) -> the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    out_dir.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    table.to_csv(out_dir / "sweep.csv", index=False)
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=2, default=str))
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        ax.scatter([str(v) for v in table[key]], table[metric])
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
    fig.tight_layout()
    fig.savefig(out_dir / "sweep.png", dpi=100)
    plt.close(fig)
    print(f"sweep results: {out_dir}/sweep.csv, sweep.json, sweep.png")
    return table


if __name__ == "__main__":
    import sys

    from ecgray.cli import main

    sys.exit(main(["tune", *sys.argv[1:]]))
