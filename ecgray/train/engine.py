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

The Ray Train glue both training jobs share (`ecgray train`, `ecgray align`) lives here too: the
TorchTrainer (`torch_trainer`), a worker's setup (`worker_setup`, `feature_store`), resuming from the run's
latest checkpoint (`resume`), reporting a checkpoint (`report_checkpoint`) and cross-worker reductions.
The `MetaModule` surrogate serves any gradient computed outside DeepSpeed: the meta-gradient, or the
alignment's plain minibatch gradient.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
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


def build_engine(mapper: nn.Module, llm: nn.Module, cfg, world: int, lr: float | None = None):
    """-> (engine, MetaModule). `mapper` is the master copy; seeded identically on every worker. AdamW at
    `lr` (default meta.meta_lr), weight decay meta.weight_decay, gradients clipped to meta.grad_clip."""
    check_zero_stage(cfg)  # before DeepSpeed touches the LLM
    import deepspeed

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_cache_dir() / "torch_extensions"))
    module = MetaModule(mapper, llm)
    optimizer = torch.optim.AdamW(
        mapper.parameters(), lr=cfg.meta.meta_lr if lr is None else lr, weight_decay=cfg.meta.weight_decay
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


# ------------------------------------------------------------------ Ray Train glue (`ecgray train`, `ecgray align`)


def torch_trainer(cfg, loop, loop_config: dict, name: str, callbacks: list | None = None):
    """The TorchTrainer of a training job: train.num_workers workers of train.cpus_per_worker CPUs (a GPU each
    with train.use_gpu) running `loop(loop_config)`, checkpoints under train.storage_path/name (the 2 newest
    kept), train.max_failures restarts of the worker group."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from ecgray import storage

    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage.resolve(cfg.train.storage_path),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )


def worker_setup(cfg, seed: int) -> tuple[int, int, torch.device]:
    """A Ray Train worker's first lines: quiet frameworks, train.cpus_per_worker torch threads, torch seeded
    with seed + rank (dropout streams differ per worker; the mapper's init is seeded in build_model), the
    device. -> (rank, world, device)."""
    from ecgray.logs import quiet_frameworks

    quiet_frameworks()
    import ray.train

    from ecgray.train.loop import resolve_device

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg.train.cpus_per_worker))
    torch.manual_seed(seed + rank)
    return rank, world, resolve_device(cfg)


def feature_store(cfg, features: str):
    """The prepared ECGs (ids, lead masks, splits; signals only if read) with the run's precomputed
    features attached (`ecgray.features`): read per ECG, as the items need them."""
    from ecgray.data.shards import ECGStore
    from ecgray.features import FeatureStore

    store = ECGStore.open(cfg.data.prepared_dir)
    store.features = FeatureStore.open(features)
    return store


def feature_inputs(cfg) -> tuple[str, dict | None]:
    """On the driver: the location of the frozen encoder's features of every ECG (computed once when
    missing, `ecgray.features.ensure_features`) and, for a grounded mapper, its standardisation statistics
    of the meta-train side (ECG-QA's train split), computed once; None for the other mappers."""
    from ecgray.features import ensure_features, pooled_stats

    features = ensure_features(cfg)
    grounded = cfg.model.mapper == "grounded"
    stats = pooled_stats(features, cfg.data.prepared_dir, cfg.data.source) if grounded else None
    return features, stats


def worker_model(cfg, device, feature_stats: dict | None):
    """-> (lm, master): the model (`build_model`; lm.mapper is the working copy the passes run on, fp32, and
    its buffers are the ones saved) and the master copy of the mapper that DeepSpeed steps, equal to it."""
    from ecgray.models.ecg_lm import build_model
    from ecgray.models.fusion import build_mapper, mapper_buffers

    lm = build_model(cfg, device, feature_stats=feature_stats)
    master = build_mapper(cfg.model, lm.encoder.d_enc, lm.d_llm, mapper_buffers(lm.mapper)).to(device)
    master.load_state_dict(lm.mapper.state_dict())
    return lm, master


def load_mapper(lm, master: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """A checkpoint's mapper into the master copy and the working copy (its buffers, never recomputed)."""
    from ecgray.models.checkpoint import load_mapper_state

    load_mapper_state(master, state, source=source)
    load_mapper_state(lm.mapper, state, source=source)


@dataclasses.dataclass
class Resumed:
    """What a restarted worker group takes from the run's latest checkpoint."""

    step: int
    optimizer: dict[str, torch.Tensor]
    history: dict
    """The saved train state (minus `step`), its `restarts` extended by this restart's step."""


def resume(lm, master: nn.Module, cfg, what: str, rank: int) -> Resumed | None:
    """Load the run's latest checkpoint (Ray Train's, when train.resume) into the mapper's copies
    (`load_mapper`); None: no checkpoint, a fresh run."""
    import ray.train

    from ecgray.logs import say
    from ecgray.models.checkpoint import load_checkpoint

    checkpoint = ray.train.get_checkpoint() if cfg.train.resume else None
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        state, _ = load_checkpoint(d)
        load_mapper(lm, master, state, f"checkpoint {d}")
        optimizer, saved = read_train_state(Path(d))
    step = int(saved.pop("step"))
    saved["restarts"] = saved.get("restarts", []) + [step]
    say(f"{what}: rank {rank} resumes from step {step}")
    return Resumed(step, optimizer, saved)


def report_checkpoint(
    engine, module: MetaModule, lm, cfg, metrics: dict, splits, state: dict, rank: int
) -> None:
    """Report `metrics` with a checkpoint: the mapper (parameters + lm.mapper's buffers), config, metrics,
    splits, AdamW moments and `state` (step, history). Every worker takes part (ZeRO-1/2's optimizer state
    is gathered); rank 0 writes the files."""
    import ray.train

    from ecgray.models.checkpoint import save_checkpoint
    from ecgray.models.fusion import mapper_buffers

    theta = gather_theta(module)
    opt = optimizer_state(engine, module)
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "checkpoint"
        save_checkpoint(target, {**theta, **mapper_buffers(lm.mapper)}, cfg, metrics, splits)
        write_train_state(target, opt, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(target)))


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over the workers (float64)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_mean(values: list[float], world: int) -> list[float]:
    """Element-wise mean over the `world` workers (float64)."""
    return [v / world for v in all_sum(values)]


def all_max(value: float) -> float:
    """The largest of the workers' values."""
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)
