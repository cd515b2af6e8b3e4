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
from ecgray.meta import adapt, run_meta_step
from ecgray.models.ecg_lm import ECGLanguageModel, TaskSet, answer_text


def resolve_device(cfg: Config) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def check_data_fits_encoder(cfg: Config) -> None:
    if cfg.encoder.fs != cfg.data.fs:
        raise ValueError(
            f"encoder.fs={cfg.encoder.fs} Hz but data.fs={cfg.data.fs} Hz: the encoder was built for another "
            "sampling rate"
        )


def build_lm(cfg: Config, device: torch.device) -> ECGLanguageModel:
    """Frozen encoder + mapper (seeded from cfg.seed, identical on every worker) + frozen LLM."""
    from ecgray.models.encoder import load_encoder
    from ecgray.models.fusion import build_mapper
    from ecgray.models.llm import llm_hidden_size, load_llm

    check_data_fits_encoder(cfg)
    encoder = load_encoder(cfg.encoder, device=device, seed=cfg.seed)
    llm, tokenizer = load_llm(cfg.model.llm, cfg.model.dtype, device, seed=cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        mapper = build_mapper(cfg.model, encoder.d_enc, llm_hidden_size(llm)).to(device)
    return ECGLanguageModel(encoder, mapper, llm, tokenizer, cfg.model)


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


def task_sets(lm: ECGLanguageModel, cache: FeatureCache, episodes: list[dict]) -> tuple[TaskSet, TaskSet]:
    """M episodes -> (support TaskSet, query TaskSet), each collated once for all inner steps."""
    support, query = [], []
    for episode in episodes:
        for part, out in (("support", support), ("query", query)):
            items = episode[part]
            tokens, pooled = cache.features([it["ecg_id"] for it in items])
            out.append(lm.task_data(pooled, tokens, [it["question"] for it in items], [it["answer"] for it in items]))
    return lm.task_set(support), lm.task_set(query)


def meta_gradient(lm: ECGLanguageModel, cache: FeatureCache, theta: dict, episodes: list[dict], cfg: Config):
    """The MetaStep of this worker's episodes (ecgray.meta does the algorithm)."""
    support, query = task_sets(lm, cache, episodes)
    meta_cfg = dataclasses.replace(cfg.meta, tasks_per_step=len(episodes))
    return run_meta_step(lm.loss_fn(), theta, support, query, meta_cfg)


def meta_test_episode(lm: ECGLanguageModel, cache: FeatureCache, theta: dict, episode: dict, cfg: Config) -> dict:
    """Adapt a copy of theta on the support set (meta.inner_steps SGD steps), then on the query set: the
    teacher-forced loss and option-scored exact match. Options: yes / no for single-verify, else the distinct
    answers of the episode's classes (one of them is right by construction)."""
    support, query = task_sets(lm, cache, [episode])
    loss_fn = lm.loss_fn()
    lm.train(False)
    try:
        fast = adapt(loss_fn, theta, support, cfg.meta.inner_steps, cfg.meta.inner_lr, first_order=True)
        with torch.no_grad():
            query_loss = float(loss_fn(fast.fast_weights, query))
            items = episode["query"]
            data = query.tasks[0]
            prefix = lm.fuse(data.pooled, data.tokens, fast.fast_weights)  # (B, n_prefix, D_llm)
            options = sorted({answer_text(it["answer"]) for it in episode["support"] + items})
            if all(it["question_type"] == "single-verify" for it in items):
                options = ["no", "yes"]
            scores = lm.score_options(prefix, [it["question"] for it in items], [options] * len(items))
            predicted = [options[int(s.argmax())] for s in scores]
            correct = sum(p == answer_text(it["answer"]) for p, it in zip(predicted, items, strict=True))
    finally:
        lm.train(True)
    return {"query_loss": query_loss, "correct": correct, "count": len(items)}


def eval_indices(n_episodes: int, rank: int, world: int) -> list[int]:
    """This worker's meta-test episodes: every worker gets ceil(n / world) of them (the same number, so
    ZeRO-3's collective parameter gathers stay in lockstep); the total is rounded up to a multiple."""
    per = math.ceil(n_episodes / world)
    return [rank * per + j for j in range(per)]

