"""DeepSpeed around the meta-gradient: the outer AdamW step of the mapper, averaged across workers.

ecgray.meta computes each worker's meta-gradient g (functional fast weights on a plain fp32 copy of the
mapper). DeepSpeed only has to average g across workers, clip it and step AdamW, at whatever ZeRO stage.
`MetaModule.forward(g)` returns the surrogate loss sum_k <theta_k, g_k>, whose gradient w.r.t. the
meta-parameters theta is exactly g, so `engine.backward` runs DeepSpeed's own reduction (all-reduce at
stage 0, reduce-scatter at 1-3) and `engine.step` its clipping and optimizer.

The frozen LLM lives inside the module too, so ZeRO-3 partitions it across workers; the forward passes
of the inner loop call its submodules directly and DeepSpeed's hooks gather their parameters.

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

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


class MetaModule(nn.Module):
    """mapper (the meta-parameters) + the frozen LLM, as one module for DeepSpeed."""

    def __init__(self, mapper: nn.Module, llm: nn.Module, zero_stage: int):
        super().__init__()
        self.mapper = mapper
        self.llm = llm
        if zero_stage == 3:
            import deepspeed

            # forward() reads the mapper's parameters without calling the mapper: tell ZeRO-3 to gather them.
            for p in mapper.parameters():
                deepspeed.zero.register_external_parameter(self, p)

    def forward(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for name, p in self.mapper.named_parameters():
            total = total + (p * grads[name].to(p.dtype)).sum()
        return total


def deepspeed_config(cfg, world: int) -> dict:
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
    import deepspeed

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_cache_dir() / "torch_extensions"))
    module = MetaModule(mapper, llm, cfg.train.zero_stage)
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


def _zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def gather_theta(module: MetaModule) -> dict[str, torch.Tensor]:
    """Full fp32 copies of the meta-parameters (a collective at ZeRO-3: every worker must call it)."""
    params = dict(module.mapper.named_parameters())
    if any(_zero3(p) for p in params.values()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {k: p.detach().float().clone() for k, p in params.items()}
    return {k: p.detach().float().clone() for k, p in params.items()}


def _plain_optimizer(engine) -> torch.optim.Optimizer | None:
    """The torch AdamW when DeepSpeed left it unwrapped (stage 0, fp32), else None."""
    opt = engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) and not hasattr(opt, "bit16_groups") else None


def optimizer_state(engine, module: MetaModule) -> dict[str, torch.Tensor]:
    """`{param}.{exp_avg|exp_avg_sq}` as full fp32 tensors (a collective at ZeRO-3)."""
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
    """Put saved AdamW moments back (at any ZeRO stage) and set AdamW's step count to `step`."""
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
