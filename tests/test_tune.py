"""Ray Tune sweeps: the space, the concurrency arithmetic, the reports Tune sees, the results table, a real
sweep of meta-training runs, and the README's sweep command on 2 CPUs (a failing trial exits non-zero)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from ecgray.config import ConfigError, load_config, to_dict
from ecgray.train.toy import toy_overrides, write_toy_prepared
from ecgray.train.tune import (
    TRIAL_MEMORY,
    TRIAL_RESOURCES,
    error_line,
    feature_configs,
    metric_reports,
    search_space,
    sweep,
    trial_config,
    trial_row,
    trials_at_once,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]


def space_cfg(space: str, *more: str):
    return load_config(None, [f"train.tune_space={space}", *more])


def test_trial_config_applies_overrides_and_names_the_run():
    base = to_dict(load_config(None, ["train.tune_space={meta.inner_lr: [0.1]}"]))
    cfg = trial_config(base, {"meta.inner_lr": 0.1, "model.mapper": "mlp", "meta.first_order": False}, "t0")
    assert cfg.meta.inner_lr == 0.1 and cfg.model.mapper == "mlp" and cfg.meta.first_order is False
    assert cfg.train.name == "meta_train_t0" and cfg.train.tune_space == {}
    with pytest.raises(ConfigError, match="meta.inner_lrr: unknown key"):
        trial_config(base, {"meta.inner_lrr": 0.1}, "t1")


def test_sweep_rejects_an_empty_or_bad_space():
    with pytest.raises(ValueError, match="train.tune_space is empty"):
        sweep(load_config())
    with pytest.raises(
        ValueError, match="train.tune_space.meta.inner_lr: expected a non-empty list .* empty list"
    ):
        sweep(space_cfg("{meta.inner_lr: []}"))


def test_search_space_maps_grids_and_distributions_to_ray_tune(tmp_path, monkeypatch):
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Uniform

    monkeypatch.chdir(tmp_path)
    cfg = space_cfg(
        "{meta.first_order: [true, false], meta.inner_lr: {loguniform: [0.001, 0.1]}, meta.meta_lr: {uniform: "
        "[0.0001, 0.001]}, meta.inner_steps: {randint: [2, 6]}, model.mapper: {choice: [mlp, attention]}, "
        "data.prepared_dir: [data/a, /abs/b]}"
    )
    space = search_space(cfg)
    assert space["meta.first_order"] == {"grid_search": [True, False]}
    lr, meta_lr, steps, mapper = (
        space[k] for k in ("meta.inner_lr", "meta.meta_lr", "meta.inner_steps", "model.mapper")
    )
    assert (
        isinstance(lr, Float)
        and isinstance(lr.get_sampler(), LogUniform)
        and (lr.lower, lr.upper) == (0.001, 0.1)
    )
    assert isinstance(meta_lr, Float) and isinstance(meta_lr.get_sampler(), Uniform)
    assert (meta_lr.lower, meta_lr.upper) == (0.0001, 0.001)
    assert isinstance(steps, Integer) and (steps.lower, steps.upper) == (2, 6)  # 6 excluded, as ray.tune's
    assert isinstance(mapper, Categorical) and mapper.categories == ["mlp", "attention"]
    draws = [steps.sample() for _ in range(200)]
    assert set(draws) == {2, 3, 4, 5}
    assert all(0.001 <= lr.sample() <= 0.1 for _ in range(200))
    # a location swept as a grid is made absolute on the driver: each trial runs in its own directory
    assert space["data.prepared_dir"] == {"grid_search": [str(tmp_path / "data/a"), "/abs/b"]}


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("{loguniform: [0, 0.1]}", r"loguniform: \[0, 0.1\] \(low <= 0\)"),
        ("{uniform: [0.1, 0.1]}", r"uniform: \[0.1, 0.1\] \(low >= high\)"),
        ("{uniform: [0.1, 0.2, 0.3]}", "not two finite numbers"),
        ("{uniform: [0.1, .inf]}", "not two finite numbers"),
        ("{randint: [1.5, 4]}", r"randint: \[1.5, 4\] \(not integers\)"),
        ("{choice: []}", "got an empty choice"),
        ("{beta: [1, 2]}", r"got \{'beta': \[1, 2\]\}"),
        ("{uniform: [1, 2], choice: [1]}", "got {'uniform'"),
    ],
)
def test_a_bad_spec_names_the_key_and_the_expectation(spec, says):
    with pytest.raises(ValueError) as err:
        search_space(space_cfg(f"{{meta.inner_lr: {spec}}}"))
    message = str(err.value)
    assert message.startswith("train.tune_space.meta.inner_lr: expected a non-empty list (a grid) or one of")
    assert re.search(says, message), message


def test_values_the_schema_refuses_fail_on_the_driver():
    # a float range over an integer key: its inner probe is fractional
    with pytest.raises(
        ValueError, match=r"train.tune_space.meta.inner_steps: value 3.\d+ does not fit.*integer"
    ):
        search_space(space_cfg("{meta.inner_steps: {uniform: [2, 6]}}"))
    with pytest.raises(ValueError, match="train.tune_space.model.mapper: value 'mlpp' does not fit"):
        search_space(space_cfg("{model.mapper: [mlp, mlpp]}"))
    with pytest.raises(
        ValueError, match="train.tune_space.meta.inner_lrr: value 0.1 does not fit.*unknown key"
    ):
        search_space(space_cfg("{meta.inner_lrr: [0.1]}"))


def test_trials_at_once_counts_every_trials_workers_and_a_trial_function_without_cpu():
    mem = {"memory": 100 * TRIAL_MEMORY}

    def fits(*overrides, **cluster):
        return trials_at_once(load_config(None, list(overrides)), {**mem, **cluster})

    # 2 CPUs: one worker of 1 CPU per trial -> 2 at once (the trial function holds no CPU)
    assert fits(CPU=2.0) == 2
    assert fits("train.num_workers=2", CPU=2.0) == 1
    assert fits("train.num_workers=2", "train.cpus_per_worker=2", CPU=9.0) == 2
    assert fits("train.use_gpu=true", "train.num_workers=2", CPU=16.0, GPU=4.0) == 2
    assert fits("train.use_gpu=true", "train.cpus_per_worker=8", CPU=16.0, GPU=4.0) == 2  # CPUs bind first
    assert fits("train.tune_max_concurrent=1", CPU=8.0) == 1
    with pytest.raises(
        ValueError,
        match=r"train.tune_max_concurrent=3: one trial holds 1 worker\(s\) x 1 CPU.*2 CPU, room for 2",
    ):
        fits("train.tune_max_concurrent=3", CPU=2.0)
    with pytest.raises(ValueError, match="train.tune_max_concurrent must be >= 0"):
        fits("train.tune_max_concurrent=-1", CPU=2.0)
    with pytest.raises(
        RuntimeError, match=r"one trial holds 2 worker\(s\) x 2 CPU .*the cluster has 2 CPU: no trial fits"
    ):
        fits("train.num_workers=2", "train.cpus_per_worker=2", CPU=2.0)
    with pytest.raises(RuntimeError, match=r"x 1 CPU \+ 1 GPU .*the cluster has 8 CPU, 0 GPU"):
        fits("train.use_gpu=true", CPU=8.0)


def test_the_trial_function_holds_no_cpu():
    from ray import tune

    from ecgray.train.tune import _trial

    request = tune.with_resources(_trial, TRIAL_RESOURCES)._resources
    assert request.required_resources == {"memory": TRIAL_MEMORY}


def test_reports_reach_tune_only_with_the_metric(monkeypatch):
    """The workers report every step and evaluate every meta.eval_every steps; Tune checks the metric in
    every result, so only the evaluated reports are forwarded (with the latest checkpoint's path)."""
    import ray.tune.integration.ray_train as rt

    queue = []
    monkeypatch.setattr(rt, "_in_tune_session", lambda: True)
    monkeypatch.setattr(rt, "get_session", lambda: SimpleNamespace(_get_or_create_inter_actor_queue=lambda: SimpleNamespace(put=queue.append)))  # fmt: skip
    callback = metric_reports("meta_val_accuracy")
    checkpoint = SimpleNamespace(path="/runs/t/checkpoint_000000")
    for step, ckpt in ((1, None), (2, None), (3, checkpoint), (4, None)):
        metrics = {"step": step, "meta_loss": 1.0 / step}
        if step % 2 == 0:
            metrics["meta_val_accuracy"] = step / 10
        callback.after_report(None, [metrics, dict(metrics)], ckpt)
    assert queue == [
        {"step": 2, "meta_loss": 0.5, "meta_val_accuracy": 0.2},
        {
            "step": 4,
            "meta_loss": 0.25,
            "meta_val_accuracy": 0.4,
            "checkpoint_path": "/runs/t/checkpoint_000000",
        },
    ]


def fake_result(tmp_path, frame, error=None, params=None):
    trial_dir = tmp_path / "trial"
    trial_dir.mkdir(exist_ok=True)
    return SimpleNamespace(
        config={"base": {}, "params": params or {"meta.inner_lr": 0.01}},
        metrics={"trial_id": "ab_00001", "step": 6},
        metrics_dataframe=frame,
        error=error,
        path=str(trial_dir),
    )


def test_a_trials_row_is_its_best_result_and_the_step_reaching_it(tmp_path):
    frame = pd.DataFrame({
        "step": [2, 4, 6, 8], "meta_loss": [0.9, 0.7, 0.6, 0.65],
        "meta_val_accuracy": [0.5, 0.75, 0.75, 0.6],
    })  # fmt: skip
    row = trial_row(fake_result(tmp_path, frame), "meta_val_accuracy")
    assert row == {
        "meta.inner_lr": 0.01, "trial_id": "ab_00001", "step": 4, "meta_val_accuracy": 0.75, "meta_loss": 0.7,
        "last_step": 8, "error": None, "error_file": None,
    }  # fmt: skip


def test_a_failed_trials_row_names_its_error_and_the_file(tmp_path):
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    cause = ValueError("AttentionMapper: d_llm=32 is not divisible by n_heads=3\nmore detail")
    worker = WorkerGroupError("[Rank 0 Error Snippet]: ...", {1: RuntimeError("gloo"), 0: cause})
    error = RayTaskError("_trial", "Traceback (most recent call last):\n ...", worker)
    result = fake_result(tmp_path, None, error=error)
    row = trial_row(result, "meta_val_accuracy")
    assert row["error"] == "ValueError: AttentionMapper: d_llm=32 is not divisible by n_heads=3"
    assert row["error_file"] == result.path and row["step"] is None  # no error.txt written (yet)
    (Path(result.path) / "error.txt").write_text("the whole traceback")
    assert trial_row(result, "meta_val_accuracy")["error_file"] == f"{result.path}/error.txt"
    # a trial that ended without the metric is not taken as a success
    silent = trial_row(fake_result(tmp_path, pd.DataFrame({"step": [1]})), "meta_val_accuracy")
    assert silent["error"] == "the trial ended without reporting meta_val_accuracy"
    assert error_line(KeyError("x")) == "KeyError: 'x'"


def test_features_are_computed_per_distinct_encoder_and_data_of_the_trials():
    cfg = space_cfg("{meta.inner_lr: [0.01, 0.05], seed: [0, 1], encoder.d_enc: [16, 32], meta.meta_lr: {uniform: [0.001, 0.01]}}")  # fmt: skip
    configs = feature_configs(cfg)
    assert sorted((c.seed, c.encoder.d_enc) for c in configs) == [(0, 16), (0, 32), (1, 16), (1, 32)]
    assert feature_configs(space_cfg("{meta.inner_lr: [0.01, 0.05]}"))[0].encoder == cfg.encoder
    with pytest.raises(
        ValueError, match=r"train.tune_space.seed: randint over a key the encoder features depend on"
    ):
        feature_configs(space_cfg("{seed: {randint: [0, 5]}}"))


def test_results_table_files(tmp_path):
    rows = [
        {"meta.inner_lr": 0.01, "meta.inner_steps": 5, "step": 4, "meta_val_accuracy": 0.4},
        {"meta.inner_lr": 0.05, "meta.inner_steps": 10, "step": 2, "meta_val_accuracy": 0.6},
    ]
    table = write_results(
        rows, ["meta.inner_lr", "meta.inner_steps"], "meta_val_accuracy", tmp_path, {"meta.inner_lr"}
    )
    assert list(table["meta_val_accuracy"]) == [0.4, 0.6]
    assert pd.read_csv(tmp_path / "sweep.csv")["meta.inner_lr"].tolist() == [0.01, 0.05]
    assert json.loads((tmp_path / "sweep.json").read_text()) == rows
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- on Ray


@pytest.mark.slow
def test_a_sampled_sweep_in_process(tmp_path, ray_session):
    prepared = write_toy_prepared(tmp_path / "prepared")
    cfg = load_config(
        None,
        toy_overrides(prepared)
        + [
            "meta.outer_steps=2", "meta.eval_every=1", "meta.checkpoint_every=2", f"train.storage_path={tmp_path}",
            "train.name=sw", "train.tune_space={meta.inner_lr: {loguniform: [0.01, 0.1]}}", "train.tune_samples=2",
        ],
    )  # fmt: skip
    table = sweep(cfg)
    assert len(table) == 2 and table["meta.inner_lr"].between(0.01, 0.1).all()
    assert table["meta.inner_lr"].nunique() == 2  # two draws
    assert table["error"].isna().all()
    assert table["meta_val_accuracy"].between(0, 1).all() and table["step"].between(1, 2).all()
    assert table["last_step"].max() == 2  # a trial ASHA did not stop ran to the end
    out = tmp_path / "sw_sweep"
    assert len(pd.read_csv(out / "sweep.csv")) == 2 and (out / "sweep.png").is_file()


@pytest.fixture(scope="module")
def readme_world(tmp_path_factory) -> Path:
    """A working directory as the README has it: configs/sweep_smoke.yaml, and data/prepared written by
    `ecgray synth` + `ecgray prepare` (a small world: 200 patients, ~25 s), both run as commands."""
    root = tmp_path_factory.mktemp("readme_sweep")
    (root / "configs").mkdir()
    shutil.copy(REPO / "configs" / "sweep_smoke.yaml", root / "configs")
    ecgray = [sys.executable, "-m", "ecgray.cli"]
    env = sweep_env()
    for cmd in (
        ["synth", "--out", "data/synth", "--patients", "200", "--quiet"],
        ["prepare", "--ptbxl", "data/synth/ptbxl", "--ecgqa", "data/synth/ecgqa", "--out", "data/prepared", "--no-progress"],
    ):  # fmt: skip
        out = subprocess.run(ecgray + cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"ecgray {cmd[0]}: {out.stderr[-3000:]}"
    return root


def sweep_env() -> dict:
    """The environment of a fresh shell: no Ray cluster to join (the command starts its own), 2 CPUs."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_OVERRIDE_RESOURCES"] = json.dumps({"CPU": 2, "GPU": 0})  # the same 2 CPUs on any machine
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def run_readme_sweep(world: Path, *overrides: str, timeout: int = 1800):
    """Runs the README's sweep command; `timeout` only guards against a hang (the sweep takes minutes)."""
    cmd = [sys.executable, "-m", "jobs.sweep", "--config", "configs/sweep_smoke.yaml"]
    cmd += ["--set", *overrides] if overrides else []
    start = time.monotonic()
    out = subprocess.run(cmd, cwd=world, env=sweep_env(), capture_output=True, text=True, timeout=timeout)
    return out, time.monotonic() - start


@pytest.mark.slow
def test_the_readme_sweep_command_finishes_on_2_cpus(readme_world):
    smoke = load_config(REPO / "configs" / "sweep_smoke.yaml")
    assert (
        smoke.data.prepared_dir == "data/prepared" and smoke.meta.eval_every > 1
    )  # relative; evaluates every 2
    out, seconds = run_readme_sweep(readme_world)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "2 trial(s) at once on 2 CPUs" in out.stdout  # the trial functions hold no CPU
    table = pd.read_csv(readme_world / "runs" / "sweep_smoke_sweep" / "sweep.csv")
    assert len(table) == 4 and table["error"].isna().all()
    assert sorted(zip(table["meta.inner_lr"], table["meta.first_order"], strict=True)) == [
        (0.01, False), (0.01, True), (0.05, False), (0.05, True),
    ]  # fmt: skip
    assert table["meta.meta_lr"].between(1e-4, 1e-2).all() and table["meta.meta_lr"].nunique() == 4  # drawn
    assert table["meta_val_accuracy"].between(0, 1).all()
    assert (table["step"] % smoke.meta.eval_every == 0).all()  # the best is an evaluated step
    assert table["last_step"].max() == smoke.meta.outer_steps
    print(f"README sweep: {seconds:.0f} s")


@pytest.mark.slow
def test_a_failing_trial_exits_non_zero_naming_it(readme_world):
    # --set merges into the YAML's tune_space: its keys are pinned to one value each, n_heads swept. n_heads=3
    # does not divide tiny-llama's width: the mapper fails where it is built, in the trial's worker.
    space = "{meta.inner_lr: [0.05], meta.first_order: [true], meta.meta_lr: [0.001], model.n_heads: [2, 3]}"
    out, _ = run_readme_sweep(
        readme_world, f"train.tune_space={space}", "meta.outer_steps=2", "train.max_failures=0",
        "train.name=sweep_fail",
    )  # fmt: skip
    assert out.returncode == 1, out.stdout[-4000:] + out.stderr[-4000:]
    table = pd.read_csv(readme_world / "runs" / "sweep_fail_sweep" / "sweep.csv")
    assert len(table) == 2
    assert table[table["model.n_heads"] == 2]["error"].isna().all()  # the other trial ran, and is written
    failed = table[table["model.n_heads"] == 3].iloc[0]
    assert failed["error"] == "ValueError: AttentionMapper: d_llm=32 is not divisible by n_heads=3"
    assert Path(failed["error_file"]).name == "error.txt" and Path(failed["error_file"]).is_file()
    assert "d_llm=32 is not divisible by n_heads=3" in Path(failed["error_file"]).read_text()
    params = "meta.inner_lr=0.05, meta.first_order=True, meta.meta_lr=0.001, model.n_heads=3"
    assert (
        f"ecgray tune: trial {failed['trial_id']} ({params}) failed: {failed['error']}\n"
        f"  full error: {failed['error_file']}"
    ) in out.stderr
    assert "ecgray tune: 1 of 2 trials failed" in out.stderr


@pytest.mark.slow
def test_an_ended_trials_worker_placement_group_is_removed(ray_session):
    """What keeps a sweep from deadlocking when Tune ends trials: the Train controller records its worker
    group's placement group; when the trial ends, the sweep removes it if the controller could not."""
    from ray.experimental.internal_kv import _internal_kv_get
    from ray.util.placement_group import placement_group, placement_group_table

    from ecgray.train.tune import KV_NAMESPACE, release_workers, worker_group_log

    pg = placement_group([{"CPU": 1}])
    ray_session.get(pg.ready(), timeout=60)
    handle = SimpleNamespace(placement_group=pg)
    group = SimpleNamespace(get_worker_group_state=lambda: SimpleNamespace(placement_group_handle=handle))
    worker_group_log("t_00007").after_worker_group_start(group)
    assert _internal_kv_get("t_00007", namespace=KV_NAMESPACE) == pg.id.hex().encode()
    callback = release_workers()
    callback.on_trial_complete(0, [], SimpleNamespace(trial_id="t_00007"))
    deadline = time.monotonic() + 30
    while placement_group_table(pg)["state"] != "REMOVED" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert placement_group_table(pg)["state"] == "REMOVED"
    assert _internal_kv_get("t_00007", namespace=KV_NAMESPACE) is None
    callback.on_trial_error(0, [], SimpleNamespace(trial_id="t_00008"))  # a run that started no workers
