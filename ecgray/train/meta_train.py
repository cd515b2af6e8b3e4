"""`ecgray train`: meta-train the fusion module with Ray Train (TorchTrainer) + DeepSpeed.

Recipe: the driver builds the meta-train episode stream (a Ray Dataset) and starts `train.num_workers`
workers; each worker builds the model, wraps the mapper and the frozen LLM in a DeepSpeed engine
(engine.py), and per outer step computes the meta-gradient of its share of the step's tasks
(loop.py), which DeepSpeed averages across workers before AdamW. Every `meta.eval_every` steps the
workers evaluate on meta-val episodes (classes / questions carved from the meta-train side: meta-test is
never read while training); every `meta.checkpoint_every` steps (and at the end) a checkpoint
(mapper + config + metrics + the split's class keys + optimizer state) is reported to Ray Train, which
restarts failed worker groups from the latest one (`train.max_failures`).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

from ecgray.config import Config, from_dict, to_dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ecgray.cli import add_config_arguments

    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ecgray.cli import config_from_args

    cfg = config_from_args(args)
    result = meta_train(cfg)
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    print(f"metrics: {result.metrics}")
    return 0


def check_config(cfg: Config) -> None:
    """Fail on the driver, before any worker starts, with the key to fix."""
    from ecgray.models.ecg_lm import check_data_fits_encoder
    from ecgray.models.encoder import check_encoder_checkpoint
    from ecgray.train.loop import local_tasks

    local_tasks(cfg.meta.tasks_per_step, cfg.train.num_workers)
    check_encoder_checkpoint(cfg.encoder)
    check_data_fits_encoder(cfg)
    if cfg.episodes.meta_val_fraction <= 0:
        raise ValueError(
            "episodes.meta_val_fraction=0: meta-training evaluates on meta-val episodes (never meta-test); "
            "give it a meta-val side, e.g. episodes.meta_val_fraction=0.1"
        )
    for key in ("outer_steps", "eval_every", "checkpoint_every", "eval_episodes"):
        if getattr(cfg.meta, key) < 1:
            raise ValueError(f"meta.{key} must be >= 1, got {getattr(cfg.meta, key)}")
    if not (Path(cfg.data.prepared_dir) / "qa").is_dir():
        raise FileNotFoundError(
            f"data.prepared_dir={cfg.data.prepared_dir}: no qa/ shards (run `ecgray prepare` first)"
        )


def build_trainer(cfg: Config, callbacks: list | None = None):
    """The TorchTrainer of a meta-training run (also used by `ecgray tune`, one per trial)."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    from ecgray.data.episodes import episode_dataset

    check_config(cfg)
    count = cfg.meta.outer_steps * cfg.meta.tasks_per_step
    episodes = episode_dataset(
        cfg.data.prepared_dir, cfg.episodes, "meta-train", count, cfg.seed,
        source=cfg.data.source, variant=cfg.data.variant,
    )  # fmt: skip
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=to_dict(cfg),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.train.name,
            storage_path=str(Path(cfg.train.storage_path).resolve())
            if "://" not in cfg.train.storage_path
            else cfg.train.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets={"train": episodes},
        # Every worker sees the whole (small, JSON) stream and keeps its own slots (loop.worker_of), in
        # order: the step -> worker assignment is then exact, whatever Ray Data's block split would be.
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),
    )


def meta_train(cfg: Config):
    """Run meta-training on the current Ray cluster (ray.init() when none is connected) -> ray.train.Result."""
    import ray

    if not ray.is_initialized():
        ray.init()
    return build_trainer(cfg).fit()


# ------------------------------------------------------------------------------------------------ worker


def train_loop_per_worker(config: dict) -> None:
    cfg = from_dict(config)
    import json

    import ray.train
    import torch
    import torch.distributed as dist

    from ecgray.data.episodes import EpisodeSampler, split_keys
    from ecgray.data.shards import ECGStore, read_qa
    from ecgray.meta.maml import meta_lr_at, set_lr
    from ecgray.models.checkpoint import load_checkpoint, load_mapper_state, save_checkpoint
    from ecgray.models.ecg_lm import build_model
    from ecgray.models.fusion import build_mapper
    from ecgray.train import engine as eng
    from ecgray.train.loop import (
        FeatureCache,
        eval_indices,
        local_tasks,
        meta_gradient,
        meta_test_sums,
        resolve_device,
        worker_of,
    )  # fmt: skip

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg.train.cpus_per_worker))
    torch.manual_seed(
        cfg.seed + rank
    )  # dropout streams differ per worker; theta init is seeded in build_model
    device = resolve_device(cfg)
    G = cfg.meta.tasks_per_step
    local_tasks(G, world)

    lm = build_model(cfg, device)  # lm.mapper: the working copy the inner loops run on (fp32)
    master = build_mapper(cfg.model, lm.encoder.d_enc, lm.d_llm).to(device)
    master.load_state_dict(lm.mapper.state_dict())

    start, history = 0, {"restarts": []}
    checkpoint = ray.train.get_checkpoint() if cfg.train.resume else None
    saved_opt = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state, _ = load_checkpoint(d)
            load_mapper_state(master, state, source=f"checkpoint {d}")
            saved_opt, saved = eng.read_train_state(Path(d))
        start = int(saved["step"])
        history = {"restarts": saved.get("restarts", []) + [start]}
        print(f"[rank {rank}] resuming from step {start}", flush=True)

    engine, module = eng.build_engine(master, lm.llm, cfg, world)
    # parameters this worker holds after DeepSpeed's partitioning (ZeRO-3: its shard of the LLM and mapper)
    param_mb = sum(getattr(p, "ds_tensor", p).numel() * p.element_size() for p in module.parameters()) / 2**20
    if saved_opt is not None:
        eng.load_optimizer_state(engine, module, saved_opt, start)

    store = ECGStore.open(cfg.data.prepared_dir)
    cache = FeatureCache(lm, store)
    qa = read_qa(cfg.data.prepared_dir, cfg.data.source, cfg.data.variant, cfg.episodes.types())
    splits = split_keys(qa, cfg.episodes) if rank == 0 else None  # rank 0 writes the checkpoints
    val_sampler = EpisodeSampler(qa, cfg.episodes, "meta-val", seed=cfg.seed + 1)
    my_eval = eval_indices(cfg.meta.eval_episodes, rank, world)

    def all_mean(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return (t / world).tolist()

    def meta_val(theta) -> dict:
        sums = torch.tensor(
            meta_test_sums(lm, theta, [val_sampler.episode(i) for i in my_eval], store, cfg),
            dtype=torch.float64,
        )
        dist.all_reduce(sums)
        n = float(sums[0])
        return {
            "meta_val_episodes": int(n),
            "meta_val_accuracy_step0": float(sums[1]) / n,
            "meta_val_accuracy": float(sums[2]) / n,
            "meta_val_token_acc": float(sums[3]) / n,
        }

    def save(step: int, metrics: dict):
        # every worker takes part in gathering (a collective at ZeRO-3); rank 0 writes and reports the files
        theta = eng.gather_theta(module)
        opt = eng.optimizer_state(engine, module)
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "checkpoint"
            save_checkpoint(target, theta, cfg, metrics, splits)
            eng.write_train_state(target, opt, {"step": step, **history})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(target)))

    steps = cfg.meta.outer_steps
    pending: dict[int, list[tuple[int, dict]]] = {}
    step = start
    t_first = None  # end of this attempt's first step: the rate below leaves out its warm-up
    shard = ray.train.get_dataset_shard("train")
    for row in shard.iter_rows():
        index = int(row["index"])
        s, owner = worker_of(index, G, world)
        if s < start or owner != rank:
            continue
        pending.setdefault(s, []).append((index, json.loads(row["episode"])))
        while step in pending and len(pending[step]) == G // world:
            episodes = [ep for _, ep in sorted(pending.pop(step), key=lambda x: x[0])]
            theta = eng.gather_theta(module)
            result = meta_gradient(lm, cache, theta, episodes, cfg)
            loss = engine(result.grads)  # surrogate: its gradient w.r.t. theta is the meta-gradient
            engine.backward(loss)
            lr = meta_lr_at(step, cfg.meta)
            set_lr(engine.optimizer, lr)
            engine.step()
            step += 1
            t_first = t_first or time.perf_counter()
            meta_loss, support_last = all_mean([result.meta_loss, float(result.support_losses[-1].mean())])
            metrics = {
                "step": step,
                "meta_loss": meta_loss,
                "meta_lr": lr,
                "support_loss_last": support_last,
                "episodes_per_s": (step - start - 1) * G / (time.perf_counter() - t_first)
                if step > start + 1
                else None,
                "peak_rss_mb": all_max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, world),
                "param_mb_per_worker": param_mb,
            }
            if rank == 0:
                print(json.dumps(metrics), flush=True)
            if step % cfg.meta.eval_every == 0 or step == steps:
                metrics.update(meta_val(eng.gather_theta(module)))
            if step % cfg.meta.checkpoint_every == 0 or step == steps:
                save(step, metrics)
            else:
                ray.train.report(metrics)
    if step != steps:
        raise RuntimeError(f"[rank {rank}] episode stream ended at step {step} of meta.outer_steps={steps}")


def all_max(value: float, world: int) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


if __name__ == "__main__":
    from ecgray.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
