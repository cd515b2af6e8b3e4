"""`ecgray tune`: Ray Tune over meta-training hyperparameters, ASHA on the meta-val accuracy.

Each trial is a whole meta-training run: a Tune function trainable that builds `meta_train.build_trainer`
with the trial's overrides and fits it (the Ray 2.60, Train V2 idiom for Train inside Tune). The workers
report every step but measure `train.tune_metric` only every `meta.eval_every` steps; the trainer's report
callback forwards to Tune the reports that carry it, so every result Tune and ASHA see has the metric
(time_attr `step`).

Resources: a trial's Train workers hold num_workers x cpus_per_worker CPUs (and a GPU each when use_gpu)
in their own placement group; the trial function only waits on its run, so its own bundle holds no CPU
(a little memory: Tune needs a non-empty bundle), and the Train controller, the episode source and the
report queue are 0-CPU actors. At most `train.tune_max_concurrent` trials run at once, 0 = as many as the
cluster's CPUs / GPUs fit; asking for more than fit is an error, as their workers would wait for CPUs that
never free. When Tune ends a trial, its workers' placement group is removed (`release_workers`), and the
encoder features every trial reads are computed on the driver before the first trial starts.

`train.tune_space` maps dotted keys to a grid (a list) or a sampled distribution ({loguniform: [a, b]},
{uniform: [a, b]}, {randint: [a, b]}, {choice: [...]}), e.g. meta.inner_lr, meta.inner_steps,
meta.first_order, meta.meta_lr, model.n_prefix, model.mapper. Results go to
<storage_path>/<name>_sweep/sweep.csv, sweep.json and sweep.png (each trial's best metric vs each swept
key); a failed trial makes the command exit 1, naming it, its error and the file with the whole error.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys

from ecgray.config import LOCATION_FIELDS, Config, from_dict, to_dict
from ecgray.logs import say

TRIAL_MEMORY = 64 * 2**20
"""Bytes of Ray's `memory` resource a trial function reserves: its only resource (it holds no CPU)."""
TRIAL_RESOURCES = {"cpu": 0, "memory": TRIAL_MEMORY}
"""The trial function's own bundle (`tune.with_resources`); its Train workers reserve theirs apart."""
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
"""The sampled entries `train.tune_space` takes, each ray.tune's function of the same name."""
FEATURE_INPUTS = ("encoder.", "data.", "seed", "model.mapper")
"""Config keys (prefixes) the frozen encoder's features may depend on (ecgray.features.key_inputs
reads the encoder, its seed, the prepared data and whether the mapper reads tokens): the driver computes
the features of every distinct value of these among the trials before any trial starts."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ecgray.cli import add_config_arguments

    add_config_arguments(parser)


def log_location(args: argparse.Namespace) -> str:
    """The run directory whose logs/ holds the framework output (`ecgray.logs.console`): run_dir."""
    from ecgray.cli import config_from_args

    return config_from_args(args).run_dir


def run(args: argparse.Namespace) -> int:
    """Run the sweep; exit 1 when any trial failed (each named, with its error, on stderr)."""
    from ecgray.cli import config_from_args

    cfg = config_from_args(args)
    table = sweep(cfg)
    say(table.to_string(index=False))
    failed = table[table["error"].notna()]
    for _, row in failed.iterrows():
        params = ", ".join(f"{k}={row[k]}" for k in cfg.train.tune_space)
        say(
            f"ecgray tune: trial {row['trial_id']} ({params}) failed: {row['error']}\n"
            f"  full error: {row['error_file']}",
            err=True,
        )
    if len(failed):
        say(f"ecgray tune: {len(failed)} of {len(table)} trials failed", err=True)
    return 1 if len(failed) else 0


# ------------------------------------------------------------------------------------------- the space


def search_space(cfg: Config) -> dict:
    """`train.tune_space` -> Tune's param space (dotted key -> grid_search or a ray.tune distribution).

    Every grid / choice value, and the ends and an inner point of each range, is applied to the config on
    the driver, so an unknown key or a value the schema refuses fails here, naming the key."""
    from ray import tune

    if not cfg.train.tune_space:
        raise ValueError(
            "train.tune_space is empty: give dotted keys -> a list of values (a grid) or a distribution, "
            "e.g. {meta.inner_lr: {loguniform: [0.001, 0.1]}, meta.first_order: [true, false]}"
        )
    base = to_dict(cfg)
    space = {}
    for key, spec in cfg.train.tune_space.items():
        kind, values, probes = parse_spec(key, spec)
        for value in probes:
            try:
                trial_config(base, {key: value}, "check")
            except ValueError as err:
                lines = str(err).splitlines()  # a ConfigError: "invalid config:", then one line per key
                detail = "; ".join(ln.strip() for ln in lines[1:]) or str(err)
                ranged = kind in ("uniform", "loguniform")
                hint = "; for an integer key use {randint: [low, high]}" if ranged else ""
                raise ValueError(
                    f"train.tune_space.{key}: value {value!r} does not fit: {detail}{hint}"
                ) from None
        if kind == "grid":
            space[key] = tune.grid_search(values)
        elif kind == "choice":
            space[key] = tune.choice(values)
        else:
            space[key] = getattr(tune, kind)(*values)
    return space


def parse_spec(key: str, spec) -> tuple[str, list, list]:
    """One `train.tune_space` entry -> (kind, values, the values to check against the config).

    kind is "grid" for a list, else the distribution's name. Local paths of location keys (data.*_dir,
    train.storage_path, ...) are made absolute here, on the driver, as a trial runs in its own directory."""
    expected = (
        f"train.tune_space.{key}: expected a non-empty list (a grid) or one of {{loguniform: [low, high]}} "
        f"(0 < low < high), {{uniform: [low, high]}} (low < high), {{randint: [low, high]}} (integers, "
        f"low < high, high excluded), {{choice: [values]}}"
    )
    if isinstance(spec, list):
        if not spec:
            raise ValueError(f"{expected}; got an empty list")
        values = _absolute(key, spec)
        return "grid", values, values
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ValueError(f"{expected}; got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list):
        raise ValueError(f"{expected}; got {spec!r}")
    if kind == "choice":
        if not values:
            raise ValueError(f"{expected}; got an empty choice")
        values = _absolute(key, values)
        return kind, values, values
    numbers = len(values) == 2 and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )
    if not numbers:
        raise ValueError(f"{expected}; got {kind}: {values!r} (not two finite numbers)")
    low, high = values
    if low >= high:
        raise ValueError(f"{expected}; got {kind}: {values!r} (low >= high)")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"{expected}; got {kind}: {values!r} (low <= 0)")
    if kind == "randint":
        if not all(isinstance(v, int) for v in values):
            raise ValueError(f"{expected}; got {kind}: {values!r} (not integers)")
        return kind, values, [low, high - 1]
    # an inner point too: a fractional value shows a float range over an integer key (use randint there)
    inner = low**0.63 * high**0.37 if kind == "loguniform" else low + 0.37 * (high - low)
    return kind, [float(low), float(high)], [float(low), inner, float(high)]


def _absolute(key: str, values: list) -> list:
    from ecgray.storage import resolve

    return [resolve(v) if key in LOCATION_FIELDS and isinstance(v, str) else v for v in values]


def trial_config(base: dict, params: dict, trial_name: str) -> Config:
    """The base config with a trial's dotted overrides, validated (a bad key names itself)."""
    from ecgray.config import _set_dotted

    tree = json.loads(json.dumps(base))
    for key, value in params.items():
        _set_dotted(tree, key, value)
    tree["train"]["name"] = f"{tree['train']['name']}_{trial_name}"
    tree["train"]["tune_space"] = {}
    return from_dict(tree)


def feature_configs(cfg: Config) -> list[Config]:
    """One trial config per distinct combination of the swept values that feed the features (FEATURE_INPUTS),
    for computing them on the driver; such a key must be a grid or a choice (a sampled value has no
    features to read)."""
    import itertools

    feeding = {k: v for k, v in cfg.train.tune_space.items() if k.startswith(FEATURE_INPUTS)}
    values = {}
    for key, spec in feeding.items():
        kind, vals, _ = parse_spec(key, spec)
        if kind not in ("grid", "choice"):
            raise ValueError(
                f"train.tune_space.{key}: {kind} over a key the encoder features depend on; they are "
                f"computed once per value before the trials, so give a list or {{choice: [...]}}"
            )
        values[key] = vals
    base = to_dict(cfg)
    configs, seen = [], set()
    for combo in itertools.product(*values.values()):
        trial = trial_config(base, dict(zip(values, combo, strict=True)), "features")
        ident = json.dumps([to_dict(trial.encoder), to_dict(trial.data), trial.seed, trial.model.mapper])
        if ident not in seen:
            seen.add(ident)
            configs.append(trial)
    return configs


# ------------------------------------------------------------------------------------------- resources


def trials_at_once(cfg: Config, cluster: dict[str, float]) -> int:
    """How many trials run at once on a cluster of these resources (`ray.cluster_resources()`).

    One trial holds its workers' num_workers x cpus_per_worker CPUs (x 1 GPU each when use_gpu) and, for
    its trial function, TRIAL_MEMORY bytes of memory and no CPU. `train.tune_max_concurrent` > 0 is taken
    as given when it fits, an error when it does not."""
    t = cfg.train
    need = {"CPU": t.num_workers * t.cpus_per_worker, "GPU": t.num_workers if t.use_gpu else 0}
    need["memory"] = TRIAL_MEMORY
    fits = min(int(cluster.get(k, 0) // v) for k, v in need.items() if v > 0)
    one = (
        f"one trial holds {t.num_workers} worker(s) x {t.cpus_per_worker} CPU"
        + (" + 1 GPU" if t.use_gpu else "")
        + f" (train.num_workers, train.cpus_per_worker{', train.use_gpu' if t.use_gpu else ''})"
    )
    have = ", ".join(f"{cluster.get(k, 0):g} {k}" for k in ("CPU", "GPU") if need[k] > 0)
    if fits < 1:
        raise RuntimeError(f"{one}, but the cluster has {have}: no trial fits")
    if t.tune_max_concurrent < 0:
        raise ValueError(
            f"train.tune_max_concurrent must be >= 0 (0 = from the cluster), got {t.tune_max_concurrent}"
        )
    if t.tune_max_concurrent > fits:
        raise ValueError(
            f"train.tune_max_concurrent={t.tune_max_concurrent}: {one} and the cluster has {have}, room "
            f"for {fits} at once; more would wait for CPUs that never free (0 = as many as fit)"
        )
    return t.tune_max_concurrent or fits


# ------------------------------------------------------------------------------------------- the trial


def metric_reports(metric: str):
    """A TuneReportCallback that forwards to Tune only the reports carrying `metric` (the eval steps),
    each with the path of the run's latest checkpoint so far. Tune checks the metric in every result, and
    the workers report every step but evaluate every meta.eval_every steps."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class MetricReports(TuneReportCallback):
        def __init__(self):
            super().__init__()
            self.latest_checkpoint = None

        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None:
                self.latest_checkpoint = checkpoint
            if metric in metrics[0]:
                super().after_report(run_context, metrics, self.latest_checkpoint)

    return MetricReports()


KV_NAMESPACE = "ecgray_tune"
"""Ray internal key-value namespace: trial id -> the placement group of its Train workers (hex id)."""


def worker_group_log(trial_id: str):
    """A Train controller callback recording the placement group of each worker group the trial's run
    starts (KV_NAMESPACE, under the trial id), so `release_workers` can remove it when Tune ends the trial."""
    from ray.experimental.internal_kv import _internal_kv_put
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class WorkerGroupLog(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group):
            pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
            _internal_kv_put(trial_id, pg.id.hex(), namespace=KV_NAMESPACE)

    return WorkerGroupLog()


def release_workers():
    """A Tune callback that removes an ended trial's Train worker placement group when it is still there.

    Tune ends a trial (ASHA stopping it, or its last step reaching max_t) by ending the trial's actor, and
    with it the Train controller, before the controller removes its workers' placement group; Ray Train's
    own cleaner finds the dead controller through the State API, which fails where several Ray instances
    run on one machine. A group left behind holds its CPUs for good, and the next trials' workers wait for
    them forever ("worker group startup timed out", retried)."""
    from ray import PlacementGroupID, tune
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    class ReleaseWorkers(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            self.release(trial.trial_id)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.release(trial.trial_id)

        def release(self, trial_id: str) -> None:
            pg_hex = _internal_kv_get(trial_id, namespace=KV_NAMESPACE)
            if pg_hex is None:  # its run never started a worker group
                return
            pg = PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex.decode())))
            if placement_group_table(pg).get("state", "REMOVED") != "REMOVED":
                remove_placement_group(pg)
            _internal_kv_del(trial_id, namespace=KV_NAMESPACE)

    return ReleaseWorkers()


def _trial(config: dict) -> None:
    import ray.tune

    from ecgray.train.meta_train import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(config["base"], config["params"], trial_id)
    callbacks = [metric_reports(cfg.train.tune_metric), worker_group_log(trial_id)]
    # Train V2: fit() raises the run's error (e.g. ray.train.WorkerGroupError), which fails the trial
    build_trainer(cfg, callbacks=callbacks).fit()


# ------------------------------------------------------------------------------------------- the sweep


def sweep(cfg: Config):
    """Run the sweep -> pandas table, one row per trial: its swept values, its best `train.tune_metric`
    and the step it reached it at, the last step it ran, and its error (None when it finished or ASHA
    stopped it). Also written to <storage_path>/<name>_sweep."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from ecgray.config import resolve_locations
    from ecgray.features import ensure_features
    from ecgray.storage import join
    from ecgray.train.meta_train import check_config

    cfg = resolve_locations(cfg)  # the CLI has done it; a library caller may not have (trials chdir)
    space = search_space(cfg)
    check_config(cfg)
    for_features = feature_configs(cfg)
    if not ray.is_initialized():
        from ecgray.logs import runtime_env

        ray.init(runtime_env=runtime_env())
    at_once = trials_at_once(cfg, ray.cluster_resources())
    for trial_cfg in for_features:  # before any trial holds the CPUs that computing them needs
        ensure_features(trial_cfg)
    scheduler = ASHAScheduler(
        time_attr="step",
        max_t=cfg.meta.outer_steps,
        grace_period=min(cfg.meta.outer_steps, cfg.train.tune_grace_period * cfg.meta.eval_every),
        reduction_factor=cfg.train.tune_reduction_factor,
    )
    base = to_dict(cfg)
    base["train"]["tune_space"] = {}  # the trials' own configs sweep nothing
    storage, name, metric = cfg.train.storage_path, f"{cfg.train.name}_sweep", cfg.train.tune_metric
    say(f"ecgray tune: {at_once} trial(s) at once on {ray.cluster_resources().get('CPU', 0):g} CPUs")
    tuner = tune.Tuner(
        tune.with_resources(_trial, TRIAL_RESOURCES),
        param_space={"base": base, "params": space},
        tune_config=tune.TuneConfig(
            metric=metric,
            mode="max",
            scheduler=scheduler,
            num_samples=cfg.train.tune_samples,
            # the concurrency limit lives in the search algorithm; seeded so sampled values repeat
            search_alg=BasicVariantGenerator(max_concurrent=at_once, random_state=cfg.seed),
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=[release_workers()]),
    )
    grid = tuner.fit()
    rows = [trial_row(result, metric) for result in grid]
    log_keys = {k for k, v in cfg.train.tune_space.items() if isinstance(v, dict) and "loguniform" in v}
    return write_results(rows, list(cfg.train.tune_space), metric, join(storage, name), log_keys)


def trial_row(result, metric: str) -> dict:
    """One ray.tune.Result -> its row: swept values, the best `metric` over its reports (the first step
    reaching it), meta_loss at that step, the last step reported, and its error and error file."""
    from ecgray.storage import exists, join

    reported = result.metrics or {}
    row = {
        **(result.config or {}).get("params", {}),
        "trial_id": reported.get("trial_id"),
        "step": None, metric: None, "meta_loss": None, "last_step": None, "error": None, "error_file": None,
    }  # fmt: skip
    frame = result.metrics_dataframe
    if frame is not None and metric in frame and frame[metric].notna().any():
        best = frame.loc[frame[metric].idxmax()]
        row.update(
            {"step": int(best["step"]), metric: float(best[metric]), "last_step": int(frame["step"].max())}
        )
        row["meta_loss"] = float(best["meta_loss"]) if "meta_loss" in best else None
    if result.error is not None:
        row["error"] = error_line(result.error)
        error_file = join(result.path, "error.txt") if result.path else None
        row["error_file"] = error_file if error_file and exists(error_file) else result.path
    elif row[metric] is None:
        row["error"] = f"the trial ended without reporting {metric}"
        row["error_file"] = result.path
    return row


def error_line(error: BaseException) -> str:
    """The first line of what failed in a trial: Ray's task wrapper and Train's worker-group error are
    looked through to the first worker's own exception."""
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, RayTaskError) and isinstance(error.cause, BaseException):
            error = error.cause
        elif isinstance(error, WorkerGroupError) and error.worker_failures:
            rank = min(error.worker_failures)
            error = error.worker_failures[rank]
        else:
            break
    if isinstance(error, RayTaskError):  # its message is a traceback: keep the exception's last line
        lines = [ln for ln in str(error).splitlines() if ln.strip()]
        return lines[-1] if lines else type(error).__name__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def write_results(rows: list[dict], keys: list[str], metric: str, out_dir, log_keys: set[str] = frozenset()):
    """sweep.csv, sweep.json and sweep.png (metric vs each swept key; numeric keys on a numeric axis,
    log_keys on a log one) under out_dir (a local path or a URI) -> the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from ecgray.storage import join, write_bytes, write_text

    out_dir = str(out_dir)
    table = pd.DataFrame(rows)
    write_text(join(out_dir, "sweep.csv"), table.to_csv(index=False))
    write_text(join(out_dir, "sweep.json"), json.dumps(rows, indent=2, default=str))
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        column = table[key]
        numeric = pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)
        ax.scatter(column if numeric else [str(v) for v in column], table[metric])
        if key in log_keys:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {metric}")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_bytes(join(out_dir, "sweep.png"), png.getvalue())
    say(f"sweep results: {join(out_dir, 'sweep.csv')}, sweep.json, sweep.png")
    return table


if __name__ == "__main__":
    from ecgray.cli import main

    sys.exit(main(["tune", *sys.argv[1:]]))
