"""Ray Tune sweeps: trial configs, the results files, and a real 2-trial sweep of meta-training runs."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ecgray.config import ConfigError, load_config, to_dict
from ecgray.train.toy import toy_overrides, write_toy_prepared
from ecgray.train.tune import sweep, trial_config, write_results


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
    with pytest.raises(ValueError, match="train.tune_space.meta.inner_lr: expected a non-empty list"):
        sweep(load_config(None, ["train.tune_space={meta.inner_lr: []}"]))


def test_results_table_files(tmp_path):
    rows = [
        {"meta.inner_lr": 0.01, "meta.inner_steps": 5, "step": 4, "meta_val_accuracy": 0.4},
        {"meta.inner_lr": 0.05, "meta.inner_steps": 10, "step": 2, "meta_val_accuracy": 0.6},
    ]
    table = write_results(rows, ["meta.inner_lr", "meta.inner_steps"], "meta_val_accuracy", tmp_path)
    assert list(table["meta_val_accuracy"]) == [0.4, 0.6]
    assert pd.read_csv(tmp_path / "sweep.csv")["meta.inner_lr"].tolist() == [0.01, 0.05]
    assert json.loads((tmp_path / "sweep.json").read_text()) == rows
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_two_trial_sweep(tmp_path, ray_session):
    prepared = write_toy_prepared(tmp_path / "prepared")
    cfg = load_config(
        None,
        toy_overrides(prepared)
        + [
            "meta.outer_steps=2", "meta.eval_every=1", "meta.checkpoint_every=2", f"train.storage_path={tmp_path}",
            "train.name=sw", "train.tune_space={meta.inner_lr: [0.01, 0.1]}",
        ],
    )  # fmt: skip
    table = sweep(cfg)
    assert sorted(table["meta.inner_lr"]) == [0.01, 0.1]
    assert table["error"].isna().all()
    assert table["meta_val_accuracy"].between(0, 1).all() and (table["step"] >= 1).all()
    # a trial ASHA did not stop ran to the end
    assert table["step"].max() == 2
    out = tmp_path / "sw_sweep"
    assert len(pd.read_csv(out / "sweep.csv")) == 2 and (out / "sweep.png").is_file()
