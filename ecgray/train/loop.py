"""The pieces of a meta-training run that do not depend on Ray: build the model, turn episodes into task
sets, assign episodes to workers, and meta-test (method.md section 3). `meta_train.py` wraps them in Ray
Train + DeepSpeed; bench/ uses them directly. Imports torch and ecgray only.

Episode assignment: outer step s uses the global episodes s*G .. s*G+G-1 (G = meta.tasks_per_step);
worker r of W takes the contiguous slots r*G/W .. (r+1)*G/W-1 of each step. The averaged meta-gradient is
then exactly the G-task mean a single worker would compute, whatever W is.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ecgray.config import Config
from ecgray.meta import run_meta_step
from ecgray.models.ecg_lm import ECGLanguageModel, TaskSet


def resolve_device(cfg: Config) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def local_tasks(tasks_per_step: int, world: int) -> int:
    """Tasks each of `world` workers runs per outer step."""
    if tasks_per_step % world:
        raise ValueError(
            f"meta.tasks_per_step={tasks_per_step} is not a multiple of train.num_workers={world}: every "
            "worker must run the same number of tasks per step"
        )
    return tasks_per_step // world


def worker_of(index: int, tasks_per_step: int, world: int) -> tuple[int, int]:
    """Global episode index -> (outer step, worker rank) under the module docstring's assignment."""
    step, slot = divmod(index, tasks_per_step)
    return step, slot // local_tasks(tasks_per_step, world)


class FeatureCache:
    """Frozen-encoder outputs per ecg_id, computed once per worker (the encoder never changes)."""

    def __init__(self, lm: ECGLanguageModel, store, max_items: int = 100_000):
        self.lm, self.store, self.max_items = lm, store, max_items
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def features(self, ecg_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> tokens (B, N, D_enc), pooled (B, D_enc)."""
        missing = sorted({i for i in ecg_ids if i not in self._cache})
        if missing:
            device = self.lm.embed.weight.device
            signals = torch.from_numpy(self.store.signals(missing)).to(device)  # (B, 12, T)
            mask = torch.from_numpy(self.store.lead_mask(missing)).to(device)  # (B, 12)
            tokens, pooled = self.lm.encode(signals, mask)
            if len(self._cache) + len(missing) > self.max_items:
                self._cache.clear()
            for j, i in enumerate(missing):
                self._cache[i] = (tokens[j], pooled[j])
        tokens = torch.stack([self._cache[i][0] for i in ecg_ids])
        pooled = torch.stack([self._cache[i][1] for i in ecg_ids])
        return tokens, pooled


def item_features(cache: FeatureCache, items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Episode items -> tokens, pooled: (B, N, D_enc), (B, D_enc) for single-ECG items; (B, 2, N, D_enc),
    (B, 2, D_enc) for comparison items (first, second ECG). One kind per call (an episode has one type)."""
    from ecgray.data.episodes import item_ecg_ids

    ids = [item_ecg_ids(it) for it in items]
    counts = sorted({len(x) for x in ids})
    if len(counts) > 1:
        raise ValueError(f"item_features: items of {counts} ECGs together; one question type per set")
    if counts != [2]:
        return cache.features([x[0] for x in ids])
    tokens, pooled = cache.features([i for x in ids for i in x])
    return tokens.unflatten(0, (-1, 2)), pooled.unflatten(0, (-1, 2))


def task_sets(lm: ECGLanguageModel, cache: FeatureCache, episodes: list[dict]) -> tuple[TaskSet, TaskSet]:
    """M episodes -> (support TaskSet, query TaskSet), each collated once for all inner steps."""
    support, query = [], []
    for episode in episodes:
        for part, out in (("support", support), ("query", query)):
            items = episode[part]
            tokens, pooled = item_features(cache, items)
            out.append(
                lm.task_data(pooled, tokens, [it["question"] for it in items], [it["answer"] for it in items])
            )
    return lm.task_set(support), lm.task_set(query)


def meta_gradient(lm: ECGLanguageModel, cache: FeatureCache, theta: dict, episodes: list[dict], cfg: Config):
    """The MetaStep of this worker's episodes (ecgray.meta does the algorithm). theta may be detached
    (`engine.gather_theta` gives plain copies); the caller's tensors are never modified."""
    support, query = task_sets(lm, cache, episodes)
    meta_cfg = dataclasses.replace(cfg.meta, tasks_per_step=len(episodes))
    if meta_cfg.engine == "reference" or not meta_cfg.first_order:
        # these engines differentiate the query losses w.r.t. theta itself (FOMAML only w.r.t. its own
        # detached copies): give them leaves that require grad. detach() makes new tensor objects over the
        # same storage (nothing is copied, nothing written), so the caller's tensors keep requires_grad.
        theta = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in theta.items()}
    return run_meta_step(lm.loss_fn(), theta, support, query, meta_cfg)


def meta_test_sums(
    lm: ECGLanguageModel, theta: dict, episodes: list[dict], store, cfg: Config
) -> list[float]:
    """`ecgray.eval.meta_test` on these episodes -> [episodes, sum of exact match at step 0, at the last
    inner step, sum of token accuracy at the last step]: sums, so workers can add theirs up."""
    from ecgray.eval.meta_test import meta_test

    records = meta_test(lm, theta, episodes, store, cfg)["episodes"]
    return [
        float(len(records)),
        sum(r["exact_match"][0] for r in records),
        sum(r["exact_match"][-1] for r in records),
        sum(r["token_acc"][-1] for r in records),
    ]


def eval_indices(n_episodes: int, rank: int, world: int) -> list[int]:
    """This worker's meta-test episodes: every worker gets ceil(n / world) of them (the same number, so
    ZeRO-3's collective parameter gathers stay in lockstep); the total is rounded up to a multiple."""
    per = math.ceil(n_episodes / world)
    return [rank * per + j for j in range(per)]
