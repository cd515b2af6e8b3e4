"""`ecgray train`: meta-train the fusion module with Ray Train (TorchTrainer) + DeepSpeed.

Recipe: the driver makes sure the frozen encoder's features of every prepared ECG exist (`ecgray
features`, a Ray Data job, run once per encoder and data) and starts `train.num_workers` workers; each
worker builds the model, wraps the mapper and the frozen LLM in a DeepSpeed engine (engine.py), and per
outer step asks for its own share of the step's episodes by index and computes their meta-gradient from
the features of their ECGs alone (loop.py), which DeepSpeed averages across workers before AdamW. One
`EpisodeSource` actor per run holds the QA table and the episode samplers (a pure function of seed and
index) and draws the episodes the workers ask for: no process holds the signals, the workers hold neither
the QA table nor a list of every episode, so their memory does not grow with the data set. Every `meta.eval_every` steps the
workers evaluate on meta-val episodes (classes / questions carved from the meta-train side: meta-test is
never read while training); every `meta.checkpoint_every` steps (and at the end) a checkpoint
(mapper + config + metrics + the split's class keys + optimizer state) is reported to Ray Train, which
restarts failed worker groups from the latest one (`train.max_failures`).
With `align.checkpoint` set, a fresh run's mapper starts from that alignment checkpoint (`ecgray align`)
instead of the seeded init; its model.* and encoder.* must equal the run's. The Ray Train glue (trainer,
worker setup, resume, checkpoint reports) is shared with `ecgray align` in engine.py.
With train.zero_stage=3 the frozen LLM is partitioned across the workers from the moment it is loaded and
the model runs in lockstep (every worker makes the same LLM calls, in training and in the meta-val
evaluation alike: ecg_lm.py); the mapper trains and checkpoints exactly as at the other stages.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from ecgray.config import Config, from_dict, to_dict
from ecgray.logs import progress, say


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ecgray.cli import add_config_arguments

    add_config_arguments(parser)


def log_location(args: argparse.Namespace) -> str:
    """The run directory whose logs/ holds the framework output (`ecgray.logs.console`): run_dir."""
    from ecgray.cli import config_from_args

    return config_from_args(args).run_dir


def run(args: argparse.Namespace) -> int:
    from ecgray.cli import config_from_args

    cfg = config_from_args(args)
    try:
        result = meta_train(cfg)
    except (ValueError, FileNotFoundError) as err:  # bad config or data, named before any worker starts
        say(f"ecgray train: {err}", err=True)
        return 2
    say(f"checkpoint: {checkpoint_location(cfg, result)}")
    say(f"metrics: {json.dumps(result.metrics)}")
    say(f"driver peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0  # Train V2: a failed run raises from fit(), and the command exits non-zero


def checkpoint_location(cfg: Config, result) -> str | None:
    """The run's latest checkpoint as a path or URI (Ray gives a path inside the storage filesystem)."""
    from ecgray import storage

    if result.checkpoint is None:
        return None
    path = result.checkpoint.path
    if storage.is_uri(cfg.train.storage_path) and not storage.is_uri(path):
        return f"{cfg.train.storage_path.split('://', 1)[0]}://{path}"
    return path


def check_config(cfg: Config) -> None:
    """Fail on the driver, before any worker starts, with the key to fix."""
    from ecgray.models.ecg_lm import check_data_fits_encoder
    from ecgray.models.encoder import check_encoder_checkpoint
    from ecgray.train.align import check_init_checkpoint
    from ecgray.train.engine import check_zero_stage
    from ecgray.train.loop import local_tasks

    check_zero_stage(cfg, lockstep=True)  # ZeRO-3: the model's LLM calls run in lockstep (build_engine)
    local_tasks(cfg.meta.tasks_per_step, cfg.train.num_workers)
    check_encoder_checkpoint(cfg.encoder)
    check_data_fits_encoder(cfg)
    check_init_checkpoint(cfg)  # align.checkpoint, when set: readable and of this run's model / encoder
    if cfg.episodes.meta_val_fraction <= 0:
        raise ValueError(
            "episodes.meta_val_fraction=0: meta-training evaluates on meta-val episodes (never meta-test); "
            "give it a meta-val side, e.g. episodes.meta_val_fraction=0.1"
        )
    for key in ("outer_steps", "eval_every", "checkpoint_every", "eval_episodes"):
        if getattr(cfg.meta, key) < 1:
            raise ValueError(f"meta.{key} must be >= 1, got {getattr(cfg.meta, key)}")
    from ecgray import storage

    if not storage.is_dir(storage.join(cfg.data.prepared_dir, "qa")):
        raise FileNotFoundError(
            f"data.prepared_dir={cfg.data.prepared_dir}: no qa/ shards (run `ecgray prepare` first)"
        )


class EpisodeSource:
    """The run's episode samplers (meta-train, seed `seed`; meta-val, seed `seed + 1`) over the QA table of
    `data.prepared_dir`, in one Ray actor (`build_trainer` starts it with 0 CPUs): workers ask it for the
    episodes of given indices. The QA table is read once per run, here, not in every worker."""

    def __init__(self, config: dict):
        from ecgray.data.episodes import EpisodeSampler
        from ecgray.data.shards import read_qa

        cfg = from_dict(config)
        self.problem = None
        """Why the samplers could not be built (data that cannot give these episodes), else None."""
        try:
            qa = read_qa(cfg.data.prepared_dir, cfg.data.source, cfg.data.variant, cfg.episodes.types())
            self._samplers = {
                "meta-train": EpisodeSampler(qa, cfg.episodes, "meta-train", seed=cfg.seed),
                "meta-val": EpisodeSampler(qa, cfg.episodes, "meta-val", seed=cfg.seed + 1),
            }
            self._splits = self._samplers["meta-train"].split_keys  # = split_keys(qa, cfg.episodes)
        except (ValueError, FileNotFoundError) as err:  # EpisodeError is a ValueError
            self.problem = f"{cfg.data.prepared_dir}: {err}"

    def check(self) -> str | None:
        return self.problem

    def episodes(self, side: str, indices: list[int]) -> list[dict]:
        return [self._samplers[side].episode(i) for i in indices]

    def splits(self) -> dict:
        """The class keys of each side (`split_keys`), stored with every checkpoint."""
        return self._splits

    def peak_rss_mb(self) -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_trainer(cfg: Config, callbacks: list | None = None):
    """The TorchTrainer of a meta-training run (also used by `ecgray tune`, one per trial). The features of
    the run's encoder and data are computed first when missing (`ecgray.features.ensure_features`;
    `ecgray tune` computes them before its trials start)."""
    from ecgray.train.engine import feature_inputs, torch_trainer

    check_config(cfg)
    # the frozen encoder's features of every ECG, computed once, and a grounded mapper's statistics
    features, stats = feature_inputs(cfg)
    # the samplers are built here, once, so a config whose episodes cannot be drawn fails before any worker
    source = episode_source(cfg)
    loop_config = {"cfg": to_dict(cfg), "features": features, "episodes": source, "feature_stats": stats}
    return torch_trainer(cfg, train_loop_per_worker, loop_config, cfg.train.name, callbacks)


def episode_source(cfg: Config):
    """The run's EpisodeSource actor (0 CPUs); a config whose episodes cannot be drawn is refused here."""
    import ray

    source = ray.remote(num_cpus=0)(EpisodeSource).remote(to_dict(cfg))
    problem = ray.get(source.check.remote())
    if problem is not None:
        ray.kill(source)
        raise ValueError(problem)
    return source


def meta_train(cfg: Config):
    """Run meta-training on the current Ray cluster (ray.init() when none is connected) -> ray.train.Result."""
    import ray

    check_config(cfg)
    from ecgray.logs import runtime_env

    if not ray.is_initialized():
        ray.init(runtime_env=runtime_env())
    return build_trainer(cfg).fit()


# ------------------------------------------------------------------------------------------------ worker


def train_loop_per_worker(config: dict) -> None:
    cfg = from_dict(config["cfg"])
    from ecgray.train import engine as eng

    rank, world, device = eng.worker_setup(cfg, seed=cfg.seed)
    import ray.train
    import torch
    import torch.distributed as dist

    from ecgray.eval.metrics import blind_loss_floor
    from ecgray.meta.maml import meta_lr_at, set_lr
    from ecgray.train.align import initial_mapper_state
    from ecgray.train.loop import (
        FeatureCache,
        episode_indices,
        eval_indices,
        local_tasks,
        meta_gradient,
        meta_test_sums,
    )  # fmt: skip

    G = cfg.meta.tasks_per_step
    local_tasks(G, world)

    # lm.mapper: the working copy the inner loops run on (fp32); its buffers are the ones saved
    # at ZeRO-3 the frozen LLM is loaded partitioned across the workers
    lm, master = eng.worker_model(cfg, device, config["feature_stats"], world)
    resumed = eng.resume(lm, master, cfg, "meta-train", rank)
    if resumed is None and cfg.align.checkpoint is not None:  # start from the aligned mapper
        eng.load_mapper(lm, master, initial_mapper_state(cfg), f"align.checkpoint={cfg.align.checkpoint}")
    start = 0 if resumed is None else resumed.step
    history = {"restarts": []} if resumed is None else resumed.history

    engine, module = eng.build_engine(master, lm.llm, cfg, world, lm=lm)  # ZeRO-3: lm now in lockstep
    # parameters this worker holds: the whole frozen LLM at ZeRO 0-2, its partition at ZeRO-3
    param_mb = eng.held_parameter_bytes(module) / 2**20
    if resumed is not None:
        eng.load_optimizer_state(engine, module, resumed.optimizer, start)

    store = eng.feature_store(cfg, config["features"])  # ids, lead masks, splits; features per ECG
    cache = FeatureCache(lm, store)
    source = config["episodes"]  # the run's EpisodeSource actor
    splits = ray.get(source.splits.remote()) if rank == 0 else None  # rank 0 writes the checkpoints
    my_eval = eval_indices(cfg.meta.eval_episodes, rank, world)

    def meta_val(theta) -> dict:
        sums = torch.tensor(
            meta_test_sums(lm, theta, ray.get(source.episodes.remote("meta-val", my_eval)), store, cfg),
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
        state = {"step": step, **history}
        eng.report_checkpoint(engine, module, lm, cfg, metrics, splits, state, rank)

    steps = cfg.meta.outer_steps
    t_first = None  # end of this attempt's first step: the rate below leaves out its warm-up
    # rank 0's progress is the run's: a bar on the driver's console (every step's metrics go to the log)
    bar = progress(total=steps, initial=start, desc="meta-train", unit="step", disable=rank != 0)
    for step in range(start, steps):
        episodes = ray.get(source.episodes.remote("meta-train", episode_indices(step, G, rank, world)))
        theta = eng.gather_theta(module)
        result = meta_gradient(lm, cache, theta, episodes, cfg)
        loss = engine(result.grads)  # surrogate: its gradient w.r.t. theta is the meta-gradient
        engine.backward(loss)
        lr = meta_lr_at(step, cfg.meta)
        set_lr(engine.optimizer, lr)
        engine.step()
        done = step + 1
        t_first = t_first or time.perf_counter()
        # the least loss a model that ignores the ECG reaches on these query / support sets
        floors = [
            sum(blind_loss_floor(ep[part], lm) for ep in episodes) / len(episodes)
            for part in ("query", "support")
        ]
        meta_loss, support_last, meta_floor, support_floor = eng.all_mean(
            [result.meta_loss, float(result.support_losses[-1].mean()), *floors], world
        )
        metrics = {
            "step": done,
            "meta_loss": meta_loss,
            "meta_loss_floor": meta_floor,
            "meta_lr": lr,
            "support_loss_last": support_last,
            "support_loss_floor": support_floor,
            "episodes_per_s": (done - start - 1) * G / (time.perf_counter() - t_first)
            if done > start + 1
            else None,
            "peak_rss_mb": eng.all_max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "param_mb_per_worker": param_mb,
        }
        if rank == 0:
            print(json.dumps(metrics), flush=True)
        if done % cfg.meta.eval_every == 0 or done == steps:
            metrics.update(meta_val(eng.gather_theta(module)))
        shown = f"meta_loss {meta_loss:.3f} (ECG-blind floor {meta_floor:.3f})"
        if "meta_val_accuracy" in metrics:
            shown += f", meta_val_acc {metrics['meta_val_accuracy']:.3f}"
        bar.set_postfix_str(shown)
        bar.update(1)
        if done == steps:
            metrics["episode_source_rss_mb"] = ray.get(source.peak_rss_mb.remote())
        if done % cfg.meta.checkpoint_every == 0 or done == steps:
            save(done, metrics)
        else:
            ray.train.report(metrics)
    bar.close()


if __name__ == "__main__":
    from ecgray.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
