"""Meta-training on Ray Train + DeepSpeed: episode assignment, 1 vs 2 workers at ZeRO 0/2, kill + resume
(ZeRO-3, the frozen LLM partitioned: tests/test_zero3.py)."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from tolerances import rounding_tolerance

from ecgray.config import ConfigError, load_config
from ecgray.train.loop import episode_indices, eval_indices, local_tasks
from ecgray.train.toy import toy_overrides, write_toy_prepared


def test_every_episode_goes_to_exactly_one_worker_and_step():
    g, world = 4, 2
    seen = {(step, rank): episode_indices(step, g, rank, world) for step in range(5) for rank in range(world)}
    # step s, worker r: the contiguous slots r*G/W .. (r+1)*G/W-1 of step s
    assert seen[(0, 0)] == [0, 1] and seen[(0, 1)] == [2, 3] and seen[(4, 1)] == [18, 19]
    assert sorted(i for v in seen.values() for i in v) == list(range(20))
    assert episode_indices(3, 4, 0, 1) == [12, 13, 14, 15]  # one worker: the whole step
    assert local_tasks(4, 2) == 2
    with pytest.raises(ValueError, match="tasks_per_step=3 is not a multiple of train.num_workers=2"):
        episode_indices(0, 3, 0, 2)


def test_eval_episodes_split_evenly():
    assert eval_indices(5, 0, 2) == [0, 1, 2] and eval_indices(5, 1, 2) == [3, 4, 5]


def test_train_config_validates():
    with pytest.raises(ConfigError, match="train.zero_stage"):
        load_config(None, ["train.zero_stage=4"])
    with pytest.raises(ConfigError, match="train.bogus: unknown key"):
        load_config(None, ["train.bogus=1"])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.mark.slow
def test_two_tasks_in_one_pass_average_like_two_workers(toy):
    """The premise of the exact 1-vs-N-worker comparison: the meta-gradient of 2 tasks in lockstep is the
    mean of each task's own meta-gradient."""
    from ecgray.data.episodes import EpisodeSampler
    from ecgray.data.shards import ECGStore, read_qa
    from ecgray.models.ecg_lm import build_model
    from ecgray.train.loop import FeatureCache, meta_gradient

    cfg = load_config(None, toy_overrides(toy))
    lm = build_model(cfg, "cpu")
    store = ECGStore.open(toy)
    cache = FeatureCache(lm, store)
    episodes = EpisodeSampler(read_qa(toy), cfg.episodes, "meta-train", seed=0).episodes(2)
    theta = {k: v.detach().clone() for k, v in lm.mapper_params().items()}
    both = meta_gradient(lm, cache, theta, episodes, cfg)
    each = [meta_gradient(lm, cache, theta, [ep], cfg) for ep in episodes]
    assert both.meta_loss == pytest.approx((each[0].meta_loss + each[1].meta_loss) / 2, rel=1e-5)
    tol = rounding_tolerance(both.grads.values(), reduction=len(lm.tokenizer))
    for k, g in both.grads.items():
        torch.testing.assert_close(g, (each[0].grads[k] + each[1].grads[k]) / 2, **tol)
    assert max(float(g.abs().max()) for g in both.grads.values()) > 0


# ------------------------------------------------------------------------------------------- on Ray

STEPS = 6


def run_cfg(toy, tmp, name, *extra):
    return load_config(
        None,
        toy_overrides(toy)
        + [
            "meta.tasks_per_step=2", f"meta.outer_steps={STEPS}", "meta.eval_every=3", "meta.checkpoint_every=2",
            # a per-step meta learning rate: ZeRO's optimizers and a resumed run must follow it too
            "meta.lr_schedule=cosine",
            f"train.storage_path={tmp}", f"train.name={name}", *extra,
        ],
    )  # fmt: skip


def fit(cfg):
    from ecgray.train.meta_train import build_trainer

    return build_trainer(cfg).fit()


single_worker_path: list[str] = []  # the single-worker run's checkpoint directory


def final(result):
    from ecgray.models.checkpoint import load_checkpoint

    assert result.error is None, result.error
    state, _ = load_checkpoint(result.checkpoint.path)
    train_state = json.loads((Path(result.checkpoint.path) / "train_state.json").read_text())
    return result.metrics, state, train_state


@pytest.fixture(scope="module")
def single_worker(toy, tmp_path_factory, ray_session):
    result = fit(run_cfg(toy, tmp_path_factory.mktemp("runs"), "one", "train.num_workers=1"))
    single_worker_path.append(result.checkpoint.path)
    return final(result)


def assert_same_run(a, b):
    (ma, sa, _), (mb, sb, _) = a, b
    assert ma["step"] == mb["step"] == STEPS
    assert ma["meta_loss"] == pytest.approx(mb["meta_loss"], rel=1e-5)
    assert ma["meta_val_token_acc"] == pytest.approx(mb["meta_val_token_acc"], abs=1e-6)
    for k in sa:
        # Adam divides by sqrt(v): near-zero gradient entries amplify float-order noise; lr * steps = 0.06
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_single_worker_run_reports_and_checkpoints(single_worker):
    metrics, state, train_state = single_worker
    assert metrics["step"] == STEPS and train_state["step"] == STEPS and train_state["restarts"] == []
    assert metrics["meta_val_episodes"] == 2 and 0.0 <= metrics["meta_val_accuracy"] <= 1.0
    assert metrics["meta_loss"] > 0 and metrics["episodes_per_s"] > 0
    # the ECG-blind floors beside the losses: in the toy's paper-protocol episodes every question has one
    # answer, so a model reading the question alone can reach 0, and the floor is exactly 0
    assert metrics["meta_loss_floor"] == 0.0 and metrics["support_loss_floor"] == 0.0
    # the checkpoint stores the split it was trained on: the toy's 10 classes, 6 / 2 / 2
    splits = json.loads((Path(single_worker_path[0]) / "splits.json").read_text())["single-verify"]
    assert [len(splits[side]) for side in ("meta-train", "meta-val", "meta-test")] == [6, 2, 2]
    toy_lr = load_config(None, toy_overrides("x")).meta.meta_lr
    assert metrics["meta_lr"] == pytest.approx(toy_lr * 0.5 * (1 + math.cos(math.pi * (STEPS - 1) / STEPS)))
    # the meta-parameters moved away from their (seeded) init
    from ecgray.models.ecg_lm import build_model

    cfg = load_config(None, toy_overrides("x"))
    init = build_model(cfg, "cpu").mapper.state_dict()
    assert max(float((state[k] - init[k]).abs().max()) for k in init) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2])
def test_two_workers_deepspeed_zero_match_one_worker(zero_stage, toy, tmp_path, single_worker, ray_session):
    cfg = run_cfg(toy, tmp_path, f"zero{zero_stage}", "train.num_workers=2", f"train.zero_stage={zero_stage}")
    assert_same_run(final(fit(cfg)), single_worker)


def _train_worker_pids() -> list[int]:
    """PIDs of the Ray Train workers among this test process's own descendants (the in-process Ray)."""
    import psutil

    pids = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith("ray::RayTrainWorker"):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint_ddp(toy, tmp_path, single_worker, ray_session):
    """2 workers, ZeRO-0 (DDP semantics): SIGKILL one worker after the first checkpoint; the run restarts
    from the latest checkpoint (step, mapper and AdamW state) and ends exactly where 1 worker ends."""
    cfg = run_cfg(
        toy, tmp_path, "killed", "train.num_workers=2", "train.zero_stage=0", "train.max_failures=2"
    )
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", fit(cfg)))
    thread.start()
    run_dir = tmp_path / "killed"
    killed_after = None
    deadline = time.time() + 300
    while thread.is_alive() and time.time() < deadline:
        states = [json.loads(p.read_text()) for p in run_dir.glob("checkpoint_*/train_state.json")]
        # two checkpoints on disk: the first is surely registered with Ray Train (the one being written may
        # not be yet, since registration waits for every worker's report)
        if len(states) >= 2:
            killed_after = max(s["step"] for s in states)
            pids = _train_worker_pids()
            assert len(pids) == 2
            os.kill(pids[-1], signal.SIGKILL)
            break
        time.sleep(0.05)
    thread.join(timeout=300)
    assert killed_after is not None and killed_after < STEPS, "the run ended before a worker could be killed"
    metrics, state, train_state = final(out["result"])
    # one restart, at most checkpoint_every steps before the newest checkpoint on disk at kill time
    assert len(train_state["restarts"]) == 1
    assert train_state["restarts"][0] >= killed_after - cfg.meta.checkpoint_every > 0
    assert_same_run((metrics, state, train_state), single_worker)


def test_meta_training_needs_a_meta_val_side(toy):
    from ecgray.train.meta_train import check_config

    cfg = load_config(None, [*toy_overrides(toy), "episodes.meta_val_fraction=0.0"])
    with pytest.raises(ValueError, match="episodes.meta_val_fraction=0: meta-training evaluates on meta-val"):
        check_config(cfg)
    check_config(load_config(None, toy_overrides(toy)))  # the toy's own 0.25 is fine


def test_meta_training_and_meta_test_centre_an_episode_alike(tmp_path):
    """meta.support_centring: meta-training's task sets and meta-test's tasks hold the same centred
    features of an episode, whose support set then averages to the mapper's feature_mean."""
    from tolerances import rounding_tolerance

    from ecgray.data.episodes import EpisodeSampler
    from ecgray.data.shards import ECGStore, read_qa
    from ecgray.eval.meta_test import Adapting, _task, ecg_features
    from ecgray.models.ecg_lm import build_model
    from ecgray.train.loop import FeatureCache, task_sets
    from ecgray.train.toy import toy_overrides, write_toy_prepared

    toy = write_toy_prepared(tmp_path)
    overrides = [
        *toy_overrides(toy),
        "model.mapper=grounded",
        "model.mlp_hidden=16",
        "meta.support_centring=true",
    ]
    cfg = load_config(None, overrides)
    d_enc = cfg.encoder.d_enc
    stats = {"feature_mean": torch.randn(d_enc), "feature_std": torch.rand(d_enc) + 0.5}
    lm = build_model(cfg, feature_stats=stats)
    store = ECGStore.open(toy)
    episode = EpisodeSampler(read_qa(toy), cfg.episodes, "meta-train", seed=0).episodes(1)[0]
    support, query = task_sets(lm, FeatureCache(lm, store), [episode], centre=True)
    plain, _ = task_sets(lm, FeatureCache(lm, store), [episode])
    method = Adapting("meta_test", lambda i: lm.mapper_params(), ecg_features(lm, store))
    task = _task(lm, 0, method, 0, episode, None, centre=True)
    torch.testing.assert_close(task.support.pooled, support.tasks[0].pooled, rtol=0, atol=0)
    torch.testing.assert_close(task.query[0], query.tasks[0].pooled, rtol=0, atol=0)
    centred = support.tasks[0].pooled
    tol = rounding_tolerance([plain.tasks[0].pooled], reduction=centred.shape[0])
    torch.testing.assert_close(centred.mean(0), stats["feature_mean"], **tol)
    assert not torch.allclose(centred, plain.tasks[0].pooled)
