"""DeepSpeed around the meta-gradient: the outer AdamW step of the mapper, averaged across workers.

ecgray.meta computes each worker's meta-gradient g (functional fast weights on a plain fp32 copy of the
mapper). DeepSpeed only has to average g across workers, clip it and step AdamW, at whatever ZeRO stage.
`MetaModule.forward(g)` returns the surrogate loss sum_k <theta_k, g_k>, whose gradient w.r.t. the
meta-parameters theta is exactly g, so `engine.backward` runs DeepSpeed's own reduction (all-reduce at
stage 0, reduce-scatter at 1-3) and `engine.step` its clipping and optimizer.

ZeRO stages. 0-2: every worker holds the whole frozen LLM (replicated); ZeRO 1/2 shard only the small
mapper's optimizer state / gradients. 3 (`ecgray train`, `ecgray tune`, `jobs.meta_train`): the frozen LLM
is partitioned across the workers, each holding 1/W of every tensor, from the moment it is loaded:
`partitioned_loading` keeps transformers' HfDeepSpeedConfig alive around `build_model`, so load_llm builds
the LLM under `deepspeed.zero.Init` and each rank reads only its own slice of every tensor from the
safetensors (random-weight tiny models, a few hundred kB, are built whole and partitioned by
`deepspeed.initialize`). Its weights are never modified. DeepSpeed's module hooks all-gather a module's
parameters before each call and free them after (train.zero3_max_live_parameters), its Linear layers
saving nothing for the backward that would keep a gathered weight alive (`FrozenLinear`), so every LLM call
is a collective: the model runs in lockstep
(`ECGLanguageModel.synchronise_ranks`, called by `build_engine`): every rank makes the same LLM calls in
the same order (ecg_lm.py's module docstring says how). The mapper (MetaModule.mapper, the master copy) is
partitioned too; its parameters are registered as external parameters of MetaModule, whose forward
reads them without calling the mapper, and `gather_theta` gathers them whole. `ecgray align` refuses
ZeRO-3 (its LLM calls are not rank-synchronised): `check_zero_stage`.

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

import contextlib
import dataclasses
import functools
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ecgray.config import ConfigError

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"
MOMENTS = ("exp_avg", "exp_avg_sq")
SUPPORTED_ZERO_STAGES = (0, 1, 2, 3)


def check_zero_stage(cfg, lockstep: bool = False) -> None:
    """train.zero_stage must be 0-3; 3 only for a job whose LLM calls run in lockstep across the workers
    (`lockstep`: meta-training, `ECGLanguageModel.synchronise_ranks`), else it is refused with what to use
    instead. Called on the driver (meta_train / align check_config) before any worker starts."""
    stage = cfg.train.zero_stage
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ConfigError(f"train.zero_stage={stage}: expected one of {list(SUPPORTED_ZERO_STAGES)}")
    if stage == 3 and not lockstep:
        raise ConfigError(
            "train.zero_stage=3 is supported by meta-training (`ecgray train`, `ecgray tune`, jobs.meta_train) "
            "only: this job's frozen-LLM calls are not rank-synchronised, and ZeRO-3's per-call parameter "
            "all-gathers would fall out of step. Set train.zero_stage=0 (or 1/2) for it; an 8B bf16 LLM "
            "(~16 GB) fits on one 40 GB GPU per worker."
        )


class MetaModule(nn.Module):
    """mapper (the meta-parameters) + the frozen LLM (replicated at ZeRO 0-2, partitioned at 3), one module
    for DeepSpeed."""

    def __init__(self, mapper: nn.Module, llm: nn.Module):
        super().__init__()
        self.mapper = mapper
        self.llm = llm

    def forward(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        # reads the mapper's parameters without calling the mapper: at ZeRO-3 they are registered as this
        # module's external parameters (build_engine), so its forward hook gathers them
        total = 0.0
        for name, p in self.mapper.named_parameters():
            total = total + (p * grads[name].to(p.dtype)).sum()
        return total


def deepspeed_config(cfg, world: int) -> dict:
    check_zero_stage(cfg, lockstep=True)  # whether this job may run ZeRO-3 is its driver's check_config's
    stage = cfg.train.zero_stage
    zero: dict = {"stage": stage}
    if stage == 3:
        # tensors of at most this many elements stay whole on every worker (norms, biases)
        zero["stage3_param_persistence_threshold"] = cfg.train.zero3_persistence_threshold
        # gathered weights kept at once / kept for a call this near (else freed after each module's call)
        zero["stage3_max_live_parameters"] = cfg.train.zero3_max_live_parameters
        zero["stage3_max_reuse_distance"] = cfg.train.zero3_max_live_parameters
        # DeepSpeed's replacement of F.linear (process-wide) saves every Linear's input for a weight gradient
        # the frozen LLM never takes; the LLM's Linear layers run `FrozenLinear` instead (build_engine)
        zero["memory_efficient_linear"] = False
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "gradient_clipping": cfg.meta.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(cfg.train.use_gpu and torch.cuda.is_available())},
        # torch.optim.AdamW, not DeepSpeed's JIT-compiled optimizers (platform.md)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


Gathered = Callable[[list[nn.Parameter]], contextlib.AbstractContextManager]
"""params -> a context in which they are whole (DeepSpeed's GatheredParameters at ZeRO-3; else nothing)."""


@contextlib.contextmanager
def partitioned_loading(cfg, world: int) -> Iterator[Gathered]:
    """The context a worker builds its model in (`worker_model`). At ZeRO-3: transformers' HfDeepSpeedConfig
    of this run alive, so `ecgray.models.llm.load_llm` constructs the LLM under `deepspeed.zero.Init` (every
    tensor partitioned as it is created, no weight initialised) and each rank reads from the safetensors
    only its own partition of every tensor (`llm.read_partitions`): no worker ever holds or reads the whole
    LLM. Large allocations are mmapped from here on (`mmap_large_allocations`). Yields the context that
    gathers parameters whole for code reading an LLM weight outside a module call. Else: nothing changes."""
    if cfg.train.zero_stage != 3:
        yield _gathered
        return
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    with framework_prints():
        deepspeed.init_distributed(dist_init_required=False)  # on Ray Train's process group
    mmap_large_allocations(cfg.train.zero3_mmap_threshold)
    keep = HfDeepSpeedConfig(deepspeed_config(cfg, world))  # noqa: F841 - transformers holds a weak reference
    try:
        yield _gathered
    finally:
        unset_hf_deepspeed_config()


def mmap_large_allocations(threshold: int) -> None:
    """glibc malloc: blocks of at least `threshold` bytes mmapped, returned to the OS when freed
    (train.zero3_mmap_threshold; 0: glibc's default left alone). Elsewhere than glibc: nothing, said."""
    if threshold < 0:
        raise ConfigError(f"train.zero3_mmap_threshold={threshold}: expected bytes >= 0 (0: glibc's default)")
    if threshold == 0:
        return
    import ctypes
    import platform

    from ecgray.logs import say

    if platform.libc_ver()[0] != "glibc":
        say(
            f"ecgray: train.zero3_mmap_threshold={threshold} not applied: this C library is not glibc",
            err=True,
        )
        return
    m_mmap_threshold = -3  # malloc.h
    if ctypes.CDLL(None).mallopt(m_mmap_threshold, threshold) != 1:
        raise ConfigError(f"train.zero3_mmap_threshold={threshold}: glibc's mallopt refused it")


@contextlib.contextmanager
def framework_prints() -> Iterator[None]:
    """DeepSpeed prints build notices to stdout ("DeepSpeed ...shm_comm_op built successfully"): what it
    prints here goes to the framework log (logger ecgray.frameworks, DEBUG), not to the console."""
    import io
    import logging

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            yield
    finally:
        for line in out.getvalue().splitlines():
            logging.getLogger("ecgray.frameworks").debug("deepspeed: %s", line)


def build_engine(mapper: nn.Module, llm: nn.Module, cfg, world: int, lr: float | None = None, lm=None):
    """-> (engine, MetaModule). `mapper` is the master copy; seeded identically on every worker. AdamW at
    `lr` (default meta.meta_lr), weight decay meta.weight_decay, gradients clipped to meta.grad_clip.
    At ZeRO-3 the model `lm` (whose frozen LLM is `llm`) is put in lockstep once DeepSpeed's hooks are on
    (`ECGLanguageModel.synchronise_ranks`): required there, refused without it."""
    import deepspeed

    stage = cfg.train.zero_stage
    if stage == 3 and (lm is None or lm.llm is not llm):
        raise ValueError(
            "build_engine: train.zero_stage=3 partitions the frozen LLM, so every call of it must run in "
            "lockstep across the workers: pass the ECGLanguageModel holding `llm` as lm="
        )
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_cache_dir() / "torch_extensions"))
    module = MetaModule(mapper, llm)
    optimizer = torch.optim.AdamW(
        mapper.parameters(), lr=cfg.meta.meta_lr if lr is None else lr, weight_decay=cfg.meta.weight_decay
    )
    with framework_prints():
        engine, *_ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=deepspeed_config(cfg, world), dist_init_required=False
        )
    if stage == 3:
        for p in mapper.parameters():
            deepspeed.zero.register_external_parameter(module, p)
        frozen_linears(llm)
        lm.synchronise_ranks()
    return engine, module


class FrozenLinear(torch.autograd.Function):
    """y = x W^T + b through a frozen weight partitioned by ZeRO-3 (gathered by DeepSpeed's module hooks
    for the call and again for its backward). It saves the Parameter W itself, not a view of its gathered
    data: autograd's own linear saves W^T, which would keep every gathered weight of a pass alive until its
    backward (+470 MB at SmolLM2's tallest pass, measured); and it saves no input, W taking no gradient
    (DeepSpeed's own F.linear replacement, memory_efficient_linear, saves every Linear's input: an
    estimated +190 MB of activations).
    The forward is torch's linear itself, so outputs are bitwise those of ZeRO-0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: nn.Parameter, bias: nn.Parameter | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return torch._C._nn.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        if weight.shape != weight.ds_shape:
            raise RuntimeError(
                f"FrozenLinear backward: the weight holds {tuple(weight.shape)}, not its gathered "
                f"{tuple(weight.ds_shape)} (DeepSpeed's pre-backward hook did not gather it)"
            )
        return grad.matmul(weight), None, None


def frozen_linears(llm: nn.Module) -> None:
    """Every nn.Linear of the frozen, partitioned LLM computes through `FrozenLinear` (its forward replaced
    on the instance; DeepSpeed's gathering hooks stay around it)."""
    for name, m in llm.named_modules():
        if isinstance(m, nn.Linear):
            if m.weight.requires_grad:
                raise ValueError(f"frozen_linears: {name}.weight requires grad (the LLM must be frozen)")
            m.forward = functools.partial(_frozen_linear, m)


def _frozen_linear(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return FrozenLinear.apply(x, m.weight, m.bias)


def _cache_dir() -> Path:
    from ecgray.models.llm import cache_root

    return cache_root()


def gather_theta(module: MetaModule) -> dict[str, torch.Tensor]:
    """Full fp32 copies of the meta-parameters (gathered from their partitions at ZeRO-3: every worker must
    call it then)."""
    params = dict(module.mapper.named_parameters())
    with _gathered(list(params.values())):
        return {k: p.detach().float().clone() for k, p in params.items()}


def _gathered(params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
    """A context in which `params` are whole: DeepSpeed's GatheredParameters where they are partitioned
    (ZeRO-3), else nothing."""
    if not any(hasattr(p, "ds_id") for p in params):  # not partitioned (ZeRO 0-2)
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def held_parameter_bytes(module: nn.Module) -> int:
    """Bytes of `module`'s parameters this worker holds: whole tensors, or at ZeRO-3 its partition of each
    (plus the whole of the small tensors DeepSpeed keeps on every worker, ds_persist)."""
    total = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):
            total += p.ds_tensor.numel() * p.ds_tensor.element_size()
            total += p.ds_numel * p.element_size() if p.ds_persist else 0
        else:
            total += p.numel() * p.element_size()
    return total


def _plain_optimizer(engine) -> torch.optim.Optimizer | None:
    """The torch AdamW when DeepSpeed left it unwrapped (stage 0, fp32), else None."""
    opt = engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) and not hasattr(opt, "bit16_groups") else None


def optimizer_state(engine, module: MetaModule) -> dict[str, torch.Tensor]:
    """`{param}.{exp_avg|exp_avg_sq}` as full fp32 tensors (an all-reduce of the partitions at ZeRO-1/2/3 and
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
    """Put saved AdamW moments back (at any of ZeRO 0-3) and set AdamW's step count to `step`."""
    from deepspeed.utils import safe_set_full_optimizer_state

    plain = _plain_optimizer(engine)
    names = [n for n, _ in module.mapper.named_parameters()]
    missing = [f"{n}.{k}" for n in names for k in MOMENTS if f"{n}.{k}" not in state]
    if missing:
        raise ValueError(f"{OPTIMIZER_FILE}: no saved AdamW state for {missing[:4]} ({len(missing)} missing)")
    if hasattr(engine.optimizer, "fp32_partitioned_groups_flat"):
        # ZeRO-3's optimizer makes AdamW's moments at its first step: make them (zeros) to write into
        for flat in engine.optimizer.fp32_partitioned_groups_flat:
            slot = engine.optimizer.optimizer.state[flat]
            for key in MOMENTS:
                slot.setdefault(key, torch.zeros_like(flat))
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


def worker_model(cfg, device, feature_stats: dict | None, world: int = 1):
    """-> (lm, master): the model (`build_model`; lm.mapper is the working copy the passes run on, fp32, and
    its buffers are the ones saved) and the master copy of the mapper that DeepSpeed steps, equal to it.
    At ZeRO-3 the frozen LLM comes partitioned over the `world` workers (`partitioned_loading`)."""
    from ecgray.models.ecg_lm import build_model
    from ecgray.models.fusion import build_mapper, mapper_buffers

    with partitioned_loading(cfg, world) as gathered:
        lm = build_model(cfg, device, feature_stats=feature_stats, gathered=gathered)
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
    splits, AdamW moments and `state` (step, history). Every worker takes part (ZeRO-1/2/3's optimizer
    state and ZeRO-3's mapper are gathered); rank 0 writes the files."""
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
