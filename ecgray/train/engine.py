"""DeepSpeed around the meta-gradient: the outer AdamW step of the mapper, averaged across workers.

ecgray.meta computes each worker's meta-gradient g (functional fast weights on a plain fp32 copy of the
mapper). DeepSpeed only has to average g across workers, clip it and step AdamW, at whatever ZeRO stage.
`MetaModule.forward(g)` returns the surrogate loss sum_k <theta_k, g_k>, whose gradient w.r.t. the
meta-parameters theta is exactly g, so `engine.backward` runs DeepSpeed's own reduction (all-reduce at
stage 0, reduce-scatter at 1-2) and `engine.step` its clipping and optimizer.

ZeRO stages 0-2 only: every worker holds the whole frozen LLM (replicated) and ZeRO at most shards the
small mapper's optimizer state and gradients. ZeRO-3 is refused (`check_zero_stage`): it would partition
the frozen LLM, but every worker loads the full LLM before DeepSpeed partitions it (peak memory above
ZeRO-0's), and ranks make different numbers of LLM calls per outer step (one pass per length bucket and
per option-trie chunk, different episodes on each rank), so ZeRO-3's per-call parameter all-gathers
fall out of step and hang.

Train state on disk (no pickle): the mapper via `ecgray.models.checkpoint`, the AdamW moments as full
(unpartitioned) tensors in `optimizer.safetensors`, the step counter and history in `train_state.json`,
so a checkpoint restores at any ZeRO stage and worker count.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ecgray.config import ConfigError

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"
MOMENTS = ("exp_avg", "exp_avg_sq")
SUPPORTED_ZERO_STAGES = (0, 1, 2)


def check_zero_stage(cfg) -> None:
    """Refuse train.zero_stage=3 (and anything outside 0-2) with what to use instead. Called on the driver
    (meta_train.check_config) before any worker starts, and again by `deepspeed_config`."""
    stage = cfg.train.zero_stage
    if stage == 3:
        raise ConfigError(
            "train.zero_stage=3 is not supported: every worker would load the full frozen LLM before DeepSpeed "
            "partitions it (peak memory above ZeRO-0), and ranks make different numbers of LLM calls per outer "
            "step (one pass per length bucket and per option-trie chunk, different episodes per rank), so "
            "ZeRO-3's per-call parameter all-gathers fall out of step and hang. Replicate the frozen LLM "
            "instead: set train.zero_stage=0 (or 1/2, which shard only the small mapper's optimizer state / "
            "gradients); an 8B bf16 LLM (~16 GB) fits on one 40 GB GPU per worker."
        )
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ConfigError(f"train.zero_stage={stage}: expected one of {list(SUPPORTED_ZERO_STAGES)}")


class MetaModule(nn.Module):
    """mapper (the meta-parameters) + the frozen LLM (replicated on every worker), one module for DeepSpeed."""

    def __init__(self, mapper: nn.Module, llm: nn.Module):
        super().__init__()
        self.mapper = mapper
        self.llm = llm

    def forward(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for name, p in self.mapper.named_parameters():
            total = total + (p * grads[name].to(p.dtype)).sum()
        return total


def deepspeed_config(cfg, world: int) -> dict:
    check_zero_stage(cfg)
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "gradient_clipping": cfg.meta.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": bool(cfg.train.use_gpu and torch.cuda.is_available())},
        # torch.optim.AdamW, not DeepSpeed's JIT-compiled optimizers (platform.md)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(mapper: nn.Module, llm: nn.Module, cfg, world: int):
    """-> (engine, MetaModule). `mapper` is the master copy; seeded identically on every worker."""
    check_zero_stage(cfg)  # before DeepSpeed touches the LLM
    import deepspeed

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_cache_dir() / "torch_extensions"))
    module = MetaModule(mapper, llm)
    optimizer = torch.optim.AdamW(
        mapper.parameters(), lr=cfg.meta.meta_lr, weight_decay=cfg.meta.weight_decay
    )
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=deepspeed_config(cfg, world), dist_init_required=False
    )
    return engine, module


def _cache_dir() -> Path:
    from ecgray.models.llm import cache_root

    return cache_root()


def gather_theta(module: MetaModule) -> dict[str, torch.Tensor]:
    """Full fp32 copies of the meta-parameters (at ZeRO 0-2 every worker holds them whole)."""
    return {k: p.detach().float().clone() for k, p in module.mapper.named_parameters()}


def _plain_optimizer(engine) -> torch.optim.Optimizer | None:
    """The torch AdamW when DeepSpeed left it unwrapped (stage 0, fp32), else None."""
    opt = engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) and not hasattr(opt, "bit16_groups") else None


def optimizer_state(engine, module: MetaModule) -> dict[str, torch.Tensor]:
    """`{param}.{exp_avg|exp_avg_sq}` as full fp32 tensors (an all-reduce of the partitions at ZeRO-1/2 and
    under bf16: every worker must call it)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    out = {}
    plain = _plain_optimizer(engine)
    for name, p in module.mapper.named_parameters():
        for key in MOMENTS:
            if plain is not None:
                value = plain.state.get(p, {}).get(key)
            else:
                value = safe_get_full_optimizer_state(p, key)
            if value is not None:
                out[f"{name}.{key}"] = value.detach().float().cpu().contiguous()
    return out


def load_optimizer_state(engine, module: MetaModule, state: dict[str, torch.Tensor], step: int) -> None:
    """Put saved AdamW moments back (at any of ZeRO 0-2) and set AdamW's step count to `step`."""
    from deepspeed.utils import safe_set_full_optimizer_state

    plain = _plain_optimizer(engine)
    names = [n for n, _ in module.mapper.named_parameters()]
    missing = [f"{n}.{k}" for n in names for k in MOMENTS if f"{n}.{k}" not in state]
    if missing:
        raise ValueError(f"{OPTIMIZER_FILE}: no saved AdamW state for {missing[:4]} ({len(missing)} missing)")
    for name, p in module.mapper.named_parameters():
        for key in MOMENTS:
            value = state[f"{name}.{key}"]
            if plain is not None:
                slot = plain.state.setdefault(p, {})
                slot[key] = value.to(p.device, p.dtype).reshape(p.shape).clone()
                slot["step"] = torch.tensor(float(step))
            else:
                safe_set_full_optimizer_state(p, value.to(p.device), key)
    if plain is None:
        # ZeRO / bf16 optimizers keep one torch optimizer over flat fp32 partitions
        inner = engine.optimizer.optimizer
        for slot in inner.state.values():
            slot["step"] = torch.tensor(float(step))


def write_train_state(directory: Path, optimizer: dict[str, torch.Tensor], state: dict) -> None:
    """optimizer.safetensors (from `optimizer_state`) + train_state.json (step, restarts) into a checkpoint dir."""
    from safetensors.torch import save_file

    directory = Path(directory)
    save_file(optimizer, str(directory / OPTIMIZER_FILE))
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2))


def read_train_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (OPTIMIZER_FILE, STATE_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"checkpoint {directory}: {name} is missing (not a meta-training checkpoint)"
            )
    return load_file(str(directory / OPTIMIZER_FILE)), json.loads((directory / STATE_FILE).read_text())
