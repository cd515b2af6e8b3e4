"""MAML in pure torch: the inner loop on functional fast weights and the meta-gradient (method.md section 3).

A task's parameters are a dict name -> tensor (the mapper's, see `ECGLanguageModel.mapper_params`). The
loss function is supplied by the caller and never inspected here:

    loss_fn(fast_weights, data) -> loss
        fast_weights: one dict (one task) -> a scalar loss, or
                      a list of M dicts (M tasks in lockstep) -> (M,) losses, one per task, computed in one
                      shared pass (e.g. `ECGLanguageModel.task_losses`: M support sets stacked into one
                      frozen-LLM batch, each task's prefix made with its own fast weights).

Because task m's loss depends only on its own fast weights, one backward of sum_m loss_m gives every task
its own gradient: M inner loops cost one LLM forward + backward per step, not M.

Engines (both return the same `MetaStep`):
- `meta_step`: first_order=True is FOMAML: fast weights are detached after every update, the query gradient
  after each of the inner steps query_from_step..inner_steps is taken at once w.r.t. the fast weights and
  accumulated, so no graph outlives the pass that made it; given the query and support sets as one data
  set, the query pass after step k shares one pass with the support pass of step k + 1 (same weights). first_order=False is full second-order MAML
  (inner gradients with create_graph; the graph of the whole inner loop is kept: memory grows with steps,
  and attention kernels must support double backward).
- `reference_meta_step`: the official loop, one task: fast = theta - lr * detached grad (still attached
  to theta), the 14 query losses kept with their graphs, one backward of their mean at the end. Its gradient
  equals FOMAML's; it exists to measure what the fast engine saves and to check it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Params = dict[str, torch.Tensor]
LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass
class AdaptResult:
    fast_weights: Params | list[Params]
    """Same structure as the `params` given to `adapt`, detached when first_order."""
    support_losses: torch.Tensor
    """(inner_steps, M): support loss of each task before each step (M = 1 for a single task)."""


@dataclass
class MetaStep:
    grads: Params
    """Meta-gradient w.r.t. the meta-parameters, averaged over the M tasks (and the query steps)."""
    meta_loss: float
    """Mean query loss over the query steps and tasks (what the outer step minimises)."""
    support_losses: torch.Tensor
    """(inner_steps, M) support loss before each inner step."""
    query_losses: torch.Tensor
    """(n_query_steps, M) query loss after inner steps query_from_step..inner_steps."""


def _task_list(params: Params | list[Params]) -> tuple[list[Params], bool]:
    if isinstance(params, dict):
        return [params], False
    if not params:
        raise ValueError("adapt: no tasks (params is an empty list)")
    return list(params), True


def _losses(loss_fn: LossFn, fast: list[Params], batched: bool, data: Any) -> torch.Tensor:
    loss = loss_fn(fast if batched else fast[0], data)
    expected = (len(fast),) if batched else ()
    if tuple(loss.shape) != expected:
        raise ValueError(
            f"loss_fn returned shape {tuple(loss.shape)}; expected {expected} for {len(fast)} task(s)"
        )
    return loss.reshape(-1)  # (M,)


def _sgd_step(fast: list[Params], loss: torch.Tensor, inner_lr: float, first_order: bool) -> list[Params]:
    flat = [v for task in fast for v in task.values()]
    # sum over tasks: task m's loss depends only on task m's fast weights
    grads = torch.autograd.grad(loss.sum(), flat, create_graph=not first_order)
    return _update(fast, list(grads), inner_lr, first_order)


def _update(
    fast: list[Params], grads: list[torch.Tensor], inner_lr: float, first_order: bool
) -> list[Params]:
    """fast - inner_lr * grads (grads flat, task by task in each task's key order)."""
    grads = iter(grads)
    new = []
    for task in fast:
        step = {k: v - inner_lr * next(grads) for k, v in task.items()}
        if first_order:
            step = {k: v.detach().requires_grad_() for k, v in step.items()}
        new.append(step)
    return new


def _start(params: list[Params], first_order: bool) -> list[Params]:
    """Each task's own starting fast weights. First order: detached copies. Second order: a view per task
    (no copy), still attached to `params`: when M tasks start from the same meta-parameters, the M views
    are distinct tensors of the graph, so the inner gradient w.r.t. task m's view holds task m's loss only
    (w.r.t. the shared tensor itself it would hold the sum of all M tasks' losses)."""
    if first_order:
        return [{k: v.detach().clone().requires_grad_() for k, v in p.items()} for p in params]
    _check_differentiable(params, "first_order=False")
    return [{k: v.view_as(v) for k, v in p.items()} for p in params]


def _check_differentiable(params: list[Params], engine: str) -> None:
    frozen = sorted({k for p in params for k, v in p.items() if not v.requires_grad})
    if frozen:
        raise ValueError(
            f"{engine} differentiates the query losses w.r.t. the meta-parameters, but {frozen} do not "
            "require grad (detached?): pass tensors with requires_grad=True"
        )


def adapt(
    loss_fn: LossFn,
    params: Params | list[Params],
    support: Any,
    inner_steps: int,
    inner_lr: float,
    first_order: bool = True,
    on_step: Callable[[int, Params | list[Params]], None] | None = None,
) -> AdaptResult:
    """`inner_steps` plain SGD steps of `loss_fn` on `support` from `params` -> fast weights.

    params: one task's dict, or a list of M dicts (lockstep). first_order: no graph through the updates
    (the fast weights come back detached); else they stay differentiable w.r.t. `params`.
    on_step(step, fast_weights) runs after every update (step = 1..inner_steps), e.g. to predict the query
    set after each step at meta-test time."""
    if inner_steps < 0:
        raise ValueError(f"adapt: inner_steps must be >= 0, got {inner_steps}")
    tasks, batched = _task_list(params)
    fast = _start(tasks, first_order)
    support_losses = []
    for step in range(1, inner_steps + 1):
        loss = _losses(loss_fn, fast, batched, support)
        support_losses.append(loss.detach())
        fast = _sgd_step(fast, loss, inner_lr, first_order)
        if on_step is not None:
            on_step(step, fast if batched else fast[0])
    losses = torch.stack(support_losses) if support_losses else torch.zeros(0, len(tasks))
    return AdaptResult(fast if batched else fast[0], losses)


def _check_steps(inner_steps: int, query_from_step: int) -> None:
    if not 1 <= query_from_step <= inner_steps:
        raise ValueError(
            f"meta.query_from_step={query_from_step} must lie in 1..meta.inner_steps={inner_steps}"
        )


def meta_step(
    loss_fn: LossFn,
    params: Params,
    support: Any,
    query: Any,
    n_tasks: int,
    inner_steps: int = 15,
    inner_lr: float = 0.05,
    query_from_step: int = 2,
    first_order: bool = True,
    query_then_support: Any = None,
) -> MetaStep:
    """One outer step's meta-gradient for `n_tasks` tasks whose inner loops run in lockstep.

    loss_fn(list of n_tasks fast-weight dicts, support | query) -> (n_tasks,) losses; `support` / `query`
    hold the n_tasks tasks' data (opaque here). The query loss after each inner step
    query_from_step..inner_steps enters the meta-loss (the paper: 2..15, i.e. 14 losses).
    first_order=False differentiates w.r.t. `params` themselves: they must require grad.

    query_then_support (first order): the same tasks' query sets then their support sets as one data set
    of 2 n_tasks tasks (loss_fn(list of 2 n_tasks dicts, it) -> (2 n_tasks,)). The query loss after step k
    and the support loss of step k + 1 are taken at the same fast weights, so with it they run as one pass
    (one call of loss_fn, one backward) instead of two: each through its own detached copy of the fast
    weights, so the one backward still gives the two gradients apart. Same losses and gradients; half the
    passes, each twice as tall (what a CPU's matrix kernels and a GPU's occupancy want)."""
    _check_steps(inner_steps, query_from_step)
    names = list(params)
    fast = _start([params] * n_tasks, first_order)  # every task gets its own start tensors
    support_losses, query_losses = [], []
    grads = {k: torch.zeros_like(v) for k, v in params.items()}
    kept = []  # second order: query losses with their graphs
    merge = query_then_support is not None and first_order

    def add_query_grads(q_grads) -> None:
        for i, g in enumerate(q_grads):
            grads[names[i % len(names)]] += g

    pending = False  # the query loss at the current fast weights is still to be taken (merged pass)
    for step in range(1, inner_steps + 1):
        if pending:
            q_fast = [{k: v.detach().requires_grad_() for k, v in task.items()} for task in fast]
            both = _losses(loss_fn, q_fast + fast, True, query_then_support)  # (2 n_tasks,)
            q_loss, loss = both[:n_tasks], both[n_tasks:]
            query_losses.append(q_loss.detach())
            flat = [task[k] for task in q_fast + fast for k in names]
            all_grads = torch.autograd.grad(both.sum(), flat)
            cut = n_tasks * len(names)
            add_query_grads(all_grads[:cut])
            support_losses.append(loss.detach())
            fast = _update(fast, list(all_grads[cut:]), inner_lr, first_order)
        else:
            loss = _losses(loss_fn, fast, True, support)
            support_losses.append(loss.detach())
            fast = _sgd_step(fast, loss, inner_lr, first_order)
        if step < query_from_step:
            continue
        if merge and step < inner_steps:
            pending = True  # taken with the next step's support loss
            continue
        pending = False
        q_loss = _losses(loss_fn, fast, True, query)
        query_losses.append(q_loss.detach())
        if first_order:
            # FOMAML: d(query loss)/d(fast weights) now; the graph of this pass is freed right here
            flat = [task[k] for task in fast for k in names]
            add_query_grads(torch.autograd.grad(q_loss.sum(), flat))
        else:
            kept.append(q_loss)
    n_query_steps = len(query_losses)
    if first_order:
        grads = {k: g / (n_tasks * n_query_steps) for k, g in grads.items()}
    else:
        meta_loss = torch.stack(kept).mean()
        leaves = [params[k] for k in names]
        grads = dict(zip(names, torch.autograd.grad(meta_loss, leaves), strict=True))
    query = torch.stack(query_losses)
    return MetaStep(grads, float(query.mean()), torch.stack(support_losses), query)


def reference_meta_step(
    loss_fn: LossFn,
    params: Params,
    support: Any,
    query: Any,
    inner_steps: int = 15,
    inner_lr: float = 0.05,
    query_from_step: int = 2,
) -> MetaStep:
    """The official first-order loop for ONE task (loss_fn takes a one-element list, returns (1,)): query
    losses keep their graphs until a single backward of their mean at the end. `params` must require
    grad (the fast weights stay attached to them)."""
    _check_steps(inner_steps, query_from_step)
    names = list(params)
    _check_differentiable([params], "meta.engine=reference")
    fast = dict(params)  # attached to the meta-parameters
    support_losses, kept = [], []
    for step in range(1, inner_steps + 1):
        loss = _losses(loss_fn, [fast], True, support)
        support_losses.append(loss.detach())
        g = torch.autograd.grad(loss.sum(), [fast[k] for k in names])  # no create_graph: first order
        fast = {k: fast[k] - inner_lr * gk for k, gk in zip(names, g, strict=True)}
        if step >= query_from_step:
            kept.append(_losses(loss_fn, [fast], True, query))  # graph retained until the end
    meta_loss = torch.stack(kept).mean()
    grads = dict(zip(names, torch.autograd.grad(meta_loss, [params[k] for k in names]), strict=True))
    query_losses = torch.stack([q.detach() for q in kept])
    return MetaStep(grads, float(meta_loss.detach()), torch.stack(support_losses), query_losses)


def make_meta_optimizer(params, cfg) -> torch.optim.Optimizer:
    """AdamW(meta_lr, weight_decay) over the meta-parameters (cfg: `MetaConfig`)."""
    return torch.optim.AdamW(params, lr=cfg.meta_lr, weight_decay=cfg.weight_decay)


def meta_lr_at(step: int, cfg) -> float:
    """The meta learning rate of outer step `step` (0-based) under cfg.lr_schedule (cfg: `MetaConfig`)."""
    if cfg.lr_schedule == "constant":
        return cfg.meta_lr
    if cfg.lr_schedule == "cosine":
        return cfg.meta_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, cfg.outer_steps) / cfg.outer_steps))
    raise ValueError(f"meta.lr_schedule={cfg.lr_schedule!r}: expected constant or cosine")


def set_lr(optimizer, lr: float) -> None:
    """Set every parameter group's learning rate (a torch or DeepSpeed optimizer)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def apply_meta_gradient(
    optimizer: torch.optim.Optimizer, params: Params, grads: Params, grad_clip: float | None
) -> float:
    """Write `grads` into `.grad`, clip their global norm to grad_clip (None / <= 0: no clipping), step.
    Returns the norm before clipping."""
    missing = set(params) - set(grads)
    if missing:
        raise ValueError(f"apply_meta_gradient: no gradient for {sorted(missing)}")
    for k, p in params.items():
        p.grad = grads[k].detach().to(p.dtype).clone()
    tensors = list(params.values())
    if grad_clip is not None and grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(tensors, grad_clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in tensors]))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def run_meta_step(
    loss_fn: LossFn, params: Params, support: Any, query: Any, cfg, query_then_support: Any = None
) -> MetaStep:
    """`meta_step` / `reference_meta_step` as chosen by a `MetaConfig` (n_tasks = cfg.tasks_per_step);
    query_then_support: see `meta_step` (the fast engine only)."""
    if cfg.engine == "reference":
        if cfg.tasks_per_step != 1 or not cfg.first_order:
            raise ValueError("meta.engine=reference runs one task, first order (meta.tasks_per_step=1)")
        return reference_meta_step(
            loss_fn, params, support, query, cfg.inner_steps, cfg.inner_lr, cfg.query_from_step
        )
    return meta_step(
        loss_fn,
        params,
        support,
        query,
        cfg.tasks_per_step,
        cfg.inner_steps,
        cfg.inner_lr,
        cfg.query_from_step,
        cfg.first_order,
        query_then_support,
    )
