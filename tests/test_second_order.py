"""Second-order MAML and the reference engine in the training pipeline: `loop.meta_gradient` takes theta the
way `meta_train` hands it over (`engine.gather_theta`: detached fp32 copies) under every engine."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from tolerances import rounding_tolerance

from ecgray.config import load_config
from ecgray.meta import run_meta_step
from ecgray.train.toy import toy_overrides, write_toy_prepared


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from ecgray.data.episodes import EpisodeSampler
    from ecgray.data.shards import ECGStore, read_qa
    from ecgray.models.ecg_lm import build_model
    from ecgray.train.loop import FeatureCache

    toy = write_toy_prepared(tmp_path_factory.mktemp("prepared"))
    cfg = load_config(None, toy_overrides(toy))
    lm = build_model(cfg, "cpu")
    episodes = EpisodeSampler(read_qa(toy), cfg.episodes, "meta-train", seed=0).episodes(2)
    return cfg, lm, FeatureCache(lm, ECGStore.open(toy)), episodes


def gathered(lm) -> dict[str, torch.Tensor]:
    """theta as `engine.gather_theta` gives it: detached fp32 copies."""
    return {k: v.detach().float().clone() for k, v in lm.mapper_params().items()}


def test_second_order_meta_gradient_on_detached_theta(pipeline):
    from ecgray.train.loop import meta_gradient, task_sets

    cfg, lm, cache, episodes = pipeline
    cfg = dataclasses.replace(cfg, meta=dataclasses.replace(cfg.meta, first_order=False))
    theta = gathered(lm)
    before = {k: v.clone() for k, v in theta.items()}
    result = meta_gradient(lm, cache, theta, episodes, cfg)
    # the caller's tensors are untouched: still detached, same values
    assert all(not v.requires_grad for v in theta.values())
    assert all(torch.equal(theta[k], before[k]) for k in theta)
    # exactly what the algorithm gives on leaves that require grad
    leaves = {k: v.clone().requires_grad_() for k, v in before.items()}
    support, query = task_sets(lm, cache, episodes)
    meta_cfg = dataclasses.replace(cfg.meta, tasks_per_step=len(episodes))
    direct = run_meta_step(lm.loss_fn(), leaves, support, query, meta_cfg)
    assert set(result.grads) == set(theta)
    assert all(torch.equal(result.grads[k], direct.grads[k]) for k in theta)
    assert result.meta_loss == direct.meta_loss and math.isfinite(result.meta_loss)
    assert max(float(g.abs().max()) for g in result.grads.values()) > 0
    # (tasks in lockstep == one at a time under second order: tests/test_meta.py)


def test_reference_engine_meta_gradient_on_detached_theta(pipeline):
    from ecgray.train.loop import meta_gradient

    cfg, lm, cache, episodes = pipeline
    reference = dataclasses.replace(cfg, meta=dataclasses.replace(cfg.meta, engine="reference"))
    theta = gathered(lm)
    ref = meta_gradient(lm, cache, theta, episodes[:1], reference)
    fast = meta_gradient(lm, cache, theta, episodes[:1], cfg)  # FOMAML: the same gradient
    assert all(not v.requires_grad for v in theta.values())
    tol = rounding_tolerance(fast.grads.values(), reduction=len(lm.tokenizer))
    for k, g in fast.grads.items():
        torch.testing.assert_close(ref.grads[k], g, **tol)
    assert ref.meta_loss == pytest.approx(fast.meta_loss, rel=1e-6)
    assert max(float(g.abs().max()) for g in ref.grads.values()) > 0
