"""The pieces of a meta-training run that do not depend on Ray: build the model, turn episodes into task
sets, assign episodes to workers, and meta-test (method.md section 3). `meta_train.py` wraps them in Ray
Train + DeepSpeed; bench/ uses them directly. Imports torch and ecgray only.

Episode assignment: outer step s uses the global episodes s*G .. s*G+G-1 (G = meta.tasks_per_step);
worker r of W takes the contiguous slots r*G/W .. (r+1)*G/W-1 of each step and draws them itself
(`EpisodeSampler.episode(index)` is a pure function of the seed and the index: no list of every episode
is built anywhere). The averaged meta-gradient is then exactly the G-task mean a single worker would
compute, whatever W is, and a resumed run continues with the same episodes.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ecgray.config import Config
from ecgray.meta import run_meta_step
from ecgray.models.ecg_lm import ECGLanguageModel, TaskSet
from ecgray.models.fusion import centre_on_support


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


def episode_indices(step: int, tasks_per_step: int, rank: int, world: int) -> list[int]:
    """The global episode indices worker `rank` of `world` runs at outer step `step` (module docstring)."""
    per = local_tasks(tasks_per_step, world)
    return [step * tasks_per_step + rank * per + j for j in range(per)]


class FeatureCache:
    """Frozen-encoder outputs per ecg_id for the meta-gradient: read from the store's precomputed features
    (`ecgray features`, attached as `store.features`) or, without them, the frozen encoder run on the
    store's signals; the last `max_items` ECGs' outputs are kept (least recently used dropped first)."""

    def __init__(self, lm: ECGLanguageModel, store, max_items: int = 20_000):
        from collections import OrderedDict

        self.lm, self.store, self.max_items = lm, store, max_items
        self._cache: OrderedDict[int, tuple[torch.Tensor | None, torch.Tensor]] = OrderedDict()

    def _compute(self, ecg_ids: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
        from ecgray.eval.meta_test import encode_ecgs  # features when attached, else the encoder; all leads

        pooled, tokens = encode_ecgs(self.lm, self.store, ecg_ids, None)
        return tokens, pooled

    def features(self, ecg_ids: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """-> tokens (B, N, D_enc) (None when only pooled vectors are stored), pooled (B, D_enc)."""
        ecg_ids = [int(i) for i in ecg_ids]
        missing = sorted(set(ecg_ids) - set(self._cache))
        if missing:
            tokens, pooled = self._compute(missing)
            for j, i in enumerate(missing):
                self._cache[i] = (None if tokens is None else tokens[j], pooled[j])
        rows = [self._cache[i] for i in ecg_ids]  # before evicting: this call's ECGs all stay readable
        for i in ecg_ids:
            self._cache.move_to_end(i)
        while len(self._cache) > max(self.max_items, len(set(ecg_ids))):
            self._cache.popitem(last=False)
        tokens = None if rows[0][0] is None else torch.stack([r[0] for r in rows])
        return tokens, torch.stack([r[1] for r in rows])


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
    return (None if tokens is None else tokens.unflatten(0, (-1, 2))), pooled.unflatten(0, (-1, 2))


def task_sets(
    lm: ECGLanguageModel, cache: FeatureCache, episodes: list[dict], centre: bool = False
) -> tuple[TaskSet, TaskSet]:
    """M episodes -> (support TaskSet, query TaskSet), each collated once for all inner steps; centre:
    meta.support_centring (`ecgray.models.fusion.centre_on_support`)."""
    support, query = [], []
    for episode in episodes:
        parts = {part: item_features(cache, episode[part]) for part in ("support", "query")}
        if centre:
            (st, sp), (qt, qp) = parts["support"], parts["query"]
            sp, qp = centre_on_support(lm.mapper, sp, qp)
            parts = {"support": (st, sp), "query": (qt, qp)}
        for part, out in (("support", support), ("query", query)):
            items = episode[part]
            tokens, pooled = parts[part]
            out.append(
                lm.task_data(pooled, tokens, [it["question"] for it in items], [it["answer"] for it in items])
            )
    return lm.task_set(support), lm.task_set(query)


def meta_gradient(lm: ECGLanguageModel, cache: FeatureCache, theta: dict, episodes: list[dict], cfg: Config):
    """The MetaStep of this worker's episodes (ecgray.meta does the algorithm). theta may be detached
    (`engine.gather_theta` gives plain copies); the caller's tensors are never modified."""
    support, query = task_sets(lm, cache, episodes, cfg.meta.support_centring)
    meta_cfg = dataclasses.replace(cfg.meta, tasks_per_step=len(episodes))
    if meta_cfg.engine == "reference" or not meta_cfg.first_order:
        # these engines differentiate the query losses w.r.t. theta itself (FOMAML only w.r.t. its own
        # detached copies): give them leaves that require grad. detach() makes new tensor objects over the
        # same storage (nothing is copied, nothing written), so the caller's tensors keep requires_grad.
        theta = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in theta.items()}
    # the query sets then the support sets as one set: FOMAML takes the query loss after inner step k and
    # the support loss of step k + 1 at the same fast weights, in one pass (ecgray.meta.meta_step)
    merged = meta_cfg.engine != "reference" and meta_cfg.first_order
    both = lm.task_set(query.tasks + support.tasks) if merged else None
    return run_meta_step(lm.loss_fn(), theta, support, query, meta_cfg, both)


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
    """This worker's meta-test episodes: every worker gets ceil(n / world) of them (the same number, so the
    all-reduce of the sums waits for no one for long, and at ZeRO-3 every worker runs the same number of
    lockstep passes); the total is rounded up to a multiple."""
    per = math.ceil(n_episodes / world)
    return [rank * per + j for j in range(per)]
