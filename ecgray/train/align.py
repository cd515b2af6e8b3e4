"""`ecgray align`: align the fusion module with the frozen LLM before meta-learning (method.md section 8 (4)).

Plain supervised training of the mapper through the frozen LLM on ECG-text pairs of the meta-train side,
teacher-forced with the model's own loss (`ECGLanguageModel.task_losses`: answer tokens + EOS), the way
vision-language models align a projector before anything else:
- statement captions (`align.captions`): "Question: which statements does this ECG show?" answered with the
  ECG's SCP statements (`caption_statements`: ECG-QA's answer names, so captions speak the answers' words),
  from ECGs of the prepared `train` split that no meta-val / meta-test item uses (`check_caption_ecgs`);
  `exclude_eval` leaves out every statement a meta-val / meta-test question asks about (`eval_statements`);
- the meta-train side's QA items (`align.qa_items`, `qa_items`): every sample of the meta-train classes,
  the samples meta-training draws its episodes from; never a meta-val or meta-test item.

Minibatches (`batch_positions`): step s takes the positions s*B .. s*B+B-1 of an endless stream of seeded
epochs (a permutation of the items per epoch, `numpy.random.default_rng([align.seed, epoch])`); worker r of W
takes the contiguous slice r*B/W .. (r+1)*B/W-1. Each worker's loss is its answer-token NLL sum times W over
the batch's token count (all workers together), so DeepSpeed's gradient average is the gradient of the whole
batch's token mean: 1 and N workers take the same steps. The job is meta_train's (Ray Train TorchTrainer,
DeepSpeed AdamW through `engine.MetaModule`, checkpoints, restarts: the glue in `engine.py`); one `AlignSource`
actor holds the items and hands each worker its batch by step. Output: a checkpoint like meta_train's
(mapper + config + metrics + splits + optimizer state; the metrics hold the train loss beside the ECG-blind
floor of that loss on the alignment items, `ecgray.eval.metrics.blind_loss_floor`), which `ecgray train`
starts from with `align.checkpoint` (`initial_mapper_state`).

`train_mapper` is the same training in one process (no Ray): the `supervised` baseline
(`ecgray.eval.baselines.train_supervised`) and the tests run it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import resource
import sys
import time

import numpy as np
import torch

from ecgray.config import QUESTION_TYPES, Config, from_dict, to_dict
from ecgray.logs import progress, say

CAPTION_QUESTION = "Which statements does this ECG show?"
"""The question of every statement caption (the model lowercases it, as every question)."""
EVAL_SIDES = ("meta-val", "meta-test")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ecgray.cli import add_config_arguments

    add_config_arguments(parser)


def log_location(args: argparse.Namespace) -> str:
    """The run directory whose logs/ holds the framework output (`ecgray.logs.console`): run_dir."""
    from ecgray.cli import config_from_args

    return config_from_args(args).run_dir


def run(args: argparse.Namespace) -> int:
    from ecgray.cli import config_from_args
    from ecgray.train.meta_train import checkpoint_location

    cfg = config_from_args(args)
    try:
        result = align(cfg)
    except (ValueError, FileNotFoundError) as err:  # bad config or data, named before any worker starts
        say(f"ecgray align: {err}", err=True)
        return 2
    location = checkpoint_location(cfg, result)
    say(f"checkpoint: {location} (meta-train from it: --set align.checkpoint={location})")
    say(f"metrics: {json.dumps(result.metrics)}")
    return 0  # Train V2: a failed run raises from fit(), and the command exits non-zero


# ------------------------------------------------------------------------------------------ the items


@functools.cache
def statement_names() -> dict[str, str]:
    """SCP code -> its name in captions: ECG-QA's answer name where ECG-QA has one (e.g. 1AVB -> "first
    degree av block"), else PTB-XL's statement description, lowercased (NORM -> "normal ecg"). Both tables
    are PTB-XL v1.0.3's / ECG-QA v1.0.2's, embedded in ecgray.synth.vocab."""
    from ecgray.synth import vocab

    names = {code: row[0].lower() for code, row in vocab.SCP_STATEMENTS.items()}
    for table in (vocab.QA_DIAGNOSTIC, vocab.QA_FORM, vocab.QA_RHYTHM):
        names.update(table)
    return names


def caption_statements(ecg_id: int, metadata: dict) -> list[str]:
    """The statement names of one ECG's scp_codes (prepared `metadata`), sorted; an unknown code is an error."""
    from ecgray.train.pretrain_encoder import scp_codes_of

    names = statement_names()
    unknown = [code for code in scp_codes_of(metadata) if code not in names]
    if unknown:
        raise ValueError(
            f"ecg_id {ecg_id}: metadata scp_codes {unknown} are not PTB-XL statements (expected codes of "
            "scp_statements.csv, e.g. SR, 1AVB)"
        )
    return sorted({names[code] for code in scp_codes_of(metadata)})


def _eval_samples(samples: list[dict], cfg: Config):
    """Every sample on a meta-val / meta-test side, for each question type of the data (the split rules of
    `episodes.*`, protocol and split mode included)."""
    from ecgray.data.episodes import build_classes, split_classes

    present = {s["question_type"] for s in samples}
    for qt in (t for t in QUESTION_TYPES if t in present):
        episodes = dataclasses.replace(cfg.episodes, question_type=qt)
        sides = split_classes(build_classes(samples, qt, episodes), episodes)
        for side in EVAL_SIDES:
            for groups in sides[side].values():
                for group in groups.values():
                    yield from group


def eval_statements(samples: list[dict], cfg: Config) -> set[str]:
    """What meta-val / meta-test questions ask about: the attributes and answers of their samples
    (lowercased), over every question type of the data."""
    names = set()
    for s in _eval_samples(samples, cfg):
        names.update(str(a).strip().lower() for a in [*(s.get("attribute") or []), *s["answer"]])
    return names


def eval_ecg_ids(samples: list[dict], cfg: Config) -> set[int]:
    """The ECGs of every meta-val / meta-test sample (every question type of the data)."""
    return {int(i) for s in _eval_samples(samples, cfg) for i in s["ecg_id"]}


def caption_items(
    prepared_dir: str, samples: list[dict], cfg: Config, mode: str | None = None
) -> tuple[list[dict], dict]:
    """Statement captions (module docstring) of the prepared `train`-split ECGs that no meta-val /
    meta-test sample uses -> (items, summary counts). mode: align.captions (default: the config's)."""
    from ecgray.train.pretrain_encoder import read_ecg_table

    mode = cfg.align.captions if mode is None else mode
    if mode == "none":
        return [], {"caption_ecgs": 0}
    if mode not in ("all", "exclude_eval"):
        raise ValueError(f"align.captions={mode!r}: expected all, exclude_eval or none")
    ecg_ids, split, metadata, _ = read_ecg_table(prepared_dir)
    held_out = eval_ecg_ids(samples, cfg)
    excluded = eval_statements(samples, cfg) if mode == "exclude_eval" else set()
    items, dropped = [], set()
    train_ids = {int(i) for i, s in zip(ecg_ids, split, strict=True) if s == "train"}
    for ecg_id, meta in zip(ecg_ids, metadata, strict=True):
        ecg_id = int(ecg_id)
        if ecg_id not in train_ids or ecg_id in held_out:
            continue
        names = caption_statements(ecg_id, meta)
        kept = [n for n in names if n not in excluded]
        dropped.update(set(names) - set(kept))
        if kept:
            items.append({"ecg_id": ecg_id, "question": CAPTION_QUESTION, "answer": kept, "class": "caption"})
    check_caption_ecgs(items, train_ids, held_out, prepared_dir)
    summary = {
        "caption_ecgs": len(items),
        "caption_train_ecgs": len(train_ids),
        "caption_held_out_ecgs": len(train_ids & held_out),
        "caption_excluded_statements": sorted(dropped),
    }
    return items, summary


def check_caption_ecgs(items: list[dict], train_ids: set[int], held_out: set[int], where: str) -> None:
    """Refuse captions of an ECG outside the prepared `train` split or used by a meta-val / meta-test item."""
    from ecgray.data.episodes import item_ecg_ids

    ids = {i for item in items for i in item_ecg_ids(item)}
    outside, evaluated = sorted(ids - train_ids), sorted(ids & held_out)
    if outside or evaluated:
        raise ValueError(
            f"{where}: alignment captions of ECGs {outside[:5]} outside the prepared train split and "
            f"{evaluated[:5]} used by meta-val / meta-test items; captions must come from training patients only"
        )


def qa_items(samples: list[dict], cfg: Config) -> list[dict]:
    """Every sample of the meta-train classes (episodes.* split rules, every type of `episodes.types()`),
    once, with its class answer: what meta-training draws its episodes from."""
    from ecgray.data.episodes import (
        build_classes,
        class_answer,
        ecgs_per_sample,
        sample_identity,
        split_classes,
    )

    items, seen = [], set()
    for qt in cfg.episodes.types():
        episodes = dataclasses.replace(cfg.episodes, question_type=qt)
        classes = split_classes(build_classes(samples, qt, episodes), episodes)["meta-train"]
        for key in sorted(classes):
            for qid in sorted(classes[key]):
                for s in classes[key][qid]:
                    ident = sample_identity(s)
                    if ident in seen:  # a single-choose `none` sample sits in several classes
                        continue
                    seen.add(ident)
                    ids = [int(i) for i in s["ecg_id"]]
                    items.append(
                        {"ecg_id": ids[0] if ecgs_per_sample(qt) == 1 else ids, "question": s["question"],
                         "answer": class_answer(s, qt), "class": key}
                    )  # fmt: skip
    if not items:
        raise ValueError("no meta-train QA samples (check episodes.* and the qa rows)")
    return items


def verify_question(statement: str) -> str:
    return f"Does this ECG show {statement}?"


def verify_captions(captions: list[dict], repeats: int, seed: int) -> list[dict]:
    """align.caption_form=verify: per caption and repeat, "does this ECG show <s>?" for one statement s of the
    ECG (-> yes) and one it lacks (-> no), drawn from the statements the captions name
    (`numpy.random.default_rng([seed, repeat])`). An ECG that shows every such statement gets no `no` item."""
    vocabulary = sorted({name for c in captions for name in c["answer"]})
    items = []
    for repeat in range(repeats):
        rng = np.random.default_rng([seed, repeat])
        for c in captions:
            shown = set(c["answer"])
            absent = [name for name in vocabulary if name not in shown]
            pairs = [(c["answer"][int(rng.integers(len(c["answer"])))], "yes")]
            if absent:
                pairs.append((absent[int(rng.integers(len(absent)))], "no"))
            for statement, answer in pairs:
                items.append(
                    {"ecg_id": c["ecg_id"], "question": verify_question(statement), "answer": [answer],
                     "class": "caption"}
                )  # fmt: skip
    return items


def align_items(prepared_dir: str, samples: list[dict], cfg: Config) -> tuple[list[dict], dict]:
    """Captions (align.captions in align.caption_form, each `align.caption_repeats` times) then QA items
    (align.qa_items) -> (items, summary counts)."""
    items, summary = caption_items(prepared_dir, samples, cfg)
    if cfg.align.caption_form == "verify":
        items = verify_captions(items, cfg.align.caption_repeats, cfg.align.seed)
    elif cfg.align.caption_form == "list":
        items = items * cfg.align.caption_repeats
    else:
        raise ValueError(f"align.caption_form={cfg.align.caption_form!r}: expected list or verify")
    qa = qa_items(samples, cfg) if cfg.align.qa_items else []
    summary.update(caption_items=len(items), qa_items=len(qa), items=len(items) + len(qa))
    if not items and not qa:
        raise ValueError(
            f"{prepared_dir}: no alignment items (align.captions={cfg.align.captions}: {len(items)} captions, "
            f"align.qa_items={cfg.align.qa_items})"
        )
    return items + qa, summary


# ------------------------------------------------------------------------------------ batches and loss


@functools.lru_cache(maxsize=4)
def _epoch_order(n_items: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_items)


def batch_positions(n_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Item indices of step `step` (module docstring): positions step*B .. step*B+B-1 of seeded epochs."""
    if n_items < 1 or batch_size < 1:
        raise ValueError(f"batch_positions: {n_items} items, batch size {batch_size}; both must be >= 1")
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, j = divmod(position, n_items)
        out.append(int(_epoch_order(n_items, seed, epoch)[j]))
    return out


def worker_slice(batch: list, rank: int, world: int) -> list:
    """Worker `rank` of `world`'s contiguous share of a batch (its size a multiple of world)."""
    if len(batch) % world:
        raise ValueError(
            f"align.batch_size={len(batch)} is not a multiple of train.num_workers={world}: every worker "
            "must take the same number of items per step"
        )
    per = len(batch) // world
    return batch[rank * per : (rank + 1) * per]


def batch_nll(lm, cache, params: dict[str, torch.Tensor], items: list[dict]) -> tuple[torch.Tensor, float]:
    """(sum of the answer-token NLL over the items, their answer-token count) under `params`, in one
    frozen-LLM pass (per length bucket); single- and two-ECG items run as two tasks of that pass.
    cache: a `loop.FeatureCache` (anything with `features(ecg_ids)`)."""
    from ecgray.data.episodes import item_ecg_ids
    from ecgray.train.loop import item_features

    tasks = []
    for n_ecg in sorted({len(item_ecg_ids(i)) for i in items}):
        part = [i for i in items if len(item_ecg_ids(i)) == n_ecg]
        tokens, pooled = item_features(cache, part)
        tasks.append(lm.task_data(pooled, tokens, [i["question"] for i in part], [i["answer"] for i in part]))
    counts = [float(sum(map(len, t.rows.targets))) for t in tasks]
    means = lm.task_losses([params] * len(tasks), tasks)  # (M,) token means
    nll = (means * torch.tensor(counts, dtype=means.dtype, device=means.device)).sum()
    return nll, sum(counts)


def train_mapper(
    lm,
    params: dict[str, torch.Tensor],
    items: list[dict],
    cache,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    grad_clip: float | None,
    seed: int,
    progress_bar: bool = False,
    desc: str = "align",
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The alignment in one process: `steps` AdamW steps of `batch_size` items (`batch_positions`, at most
    all items), the batch's answer-token mean loss, mapper dropout on (seeded by `seed`), gradient norm
    clipped to grad_clip. params are copied, never written. -> (trained params, loss per step)."""
    from ecgray.meta import apply_meta_gradient

    batch_size = min(batch_size, len(items))
    if steps < 1 or batch_size < 1:
        raise ValueError(f"train_mapper: steps={steps}, batch size={batch_size}; both must be >= 1")
    params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    losses = []
    bar = progress(total=steps, desc=desc, unit="step", disable=not progress_bar)
    was = lm.training
    lm.train()
    try:
        with torch.random.fork_rng(devices=[]):  # dropout draws, seeded
            torch.manual_seed(seed)
            for step in range(steps):
                batch = [items[i] for i in batch_positions(len(items), batch_size, step, seed)]
                nll, count = batch_nll(lm, cache, params, batch)
                loss = nll / count
                grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
                apply_meta_gradient(optimizer, params, grads, grad_clip)
                losses.append(float(loss.detach()))
                bar.set_postfix_str(f"loss {losses[-1]:.3f}")
                bar.update(1)
    finally:
        lm.train(was)
        bar.close()
    return {k: v.detach() for k, v in params.items()}, losses


# ------------------------------------------------------------------------------ meta-training's start


def check_init_checkpoint(cfg: Config) -> str | None:
    """The resolved `align.checkpoint` (None when unset), refused when its model.* or encoder.* differ from
    the run's (naming the keys)."""
    from ecgray.models.checkpoint import load_checkpoint_config, resolve_checkpoint

    if cfg.align.checkpoint is None:
        return None
    location = resolve_checkpoint(cfg.align.checkpoint)
    saved = load_checkpoint_config(location)
    differ = [
        f"{section}.{key}"
        for section in ("model", "encoder")
        for key, value in to_dict(getattr(cfg, section)).items()
        if to_dict(getattr(saved, section)).get(key) != value
    ]
    if differ:
        raise ValueError(
            f"align.checkpoint={location}: trained with other {', '.join(differ[:8])} than this run; "
            "align with the run's model.* and encoder.* settings (or leave align.checkpoint unset)"
        )
    return location


def initial_mapper_state(cfg: Config) -> dict[str, torch.Tensor] | None:
    """The aligned mapper meta-training starts from (`align.checkpoint`, checked), or None when unset."""
    from ecgray.models.checkpoint import load_checkpoint

    location = check_init_checkpoint(cfg)
    return None if location is None else load_checkpoint(location)[0]


# ------------------------------------------------------------------------------------------ the job


def check_config(cfg: Config) -> None:
    """Fail on the driver, before any worker starts, with the key to fix."""
    from ecgray import storage
    from ecgray.models.ecg_lm import check_data_fits_encoder
    from ecgray.models.encoder import check_encoder_checkpoint
    from ecgray.train.engine import check_zero_stage

    check_zero_stage(cfg)
    check_encoder_checkpoint(cfg.encoder)
    check_data_fits_encoder(cfg)
    a = cfg.align
    for key in ("steps", "batch_size", "checkpoint_every", "caption_repeats"):
        if getattr(a, key) < 1:
            raise ValueError(f"align.{key} must be >= 1 for `ecgray align`, got {getattr(a, key)}")
    if a.lr <= 0:
        raise ValueError(f"align.lr must be > 0, got {a.lr}")
    if a.batch_size % cfg.train.num_workers:
        raise ValueError(
            f"align.batch_size={a.batch_size} is not a multiple of train.num_workers={cfg.train.num_workers}"
        )
    if a.captions == "none" and not a.qa_items:
        raise ValueError("align.captions=none and align.qa_items=false: nothing to align on")
    if not storage.is_dir(storage.join(cfg.data.prepared_dir, "qa")):
        raise FileNotFoundError(
            f"data.prepared_dir={cfg.data.prepared_dir}: no qa/ shards (run `ecgray prepare` first)"
        )


class AlignSource:
    """The run's alignment items (`align_items`) in one Ray actor (`build_trainer` starts it with 0 CPUs):
    workers ask it for their share of each step's batch. The QA table and metadata are read once, here."""

    def __init__(self, config: dict):
        from ecgray.data.episodes import split_keys
        from ecgray.data.shards import read_qa

        cfg = from_dict(config)
        self.cfg = cfg
        self.problem = None
        """Why the items could not be built (data that cannot give them), else None."""
        try:
            qa = read_qa(cfg.data.prepared_dir, cfg.data.source, cfg.data.variant)
            self.items, self._summary = align_items(cfg.data.prepared_dir, qa, cfg)
            self._splits = split_keys(
                [s for s in qa if s["question_type"] in cfg.episodes.types()], cfg.episodes
            )
            if len(self.items) < cfg.align.batch_size:
                raise ValueError(
                    f"{len(self.items)} items, fewer than align.batch_size={cfg.align.batch_size}"
                )
        except (ValueError, FileNotFoundError) as err:  # EpisodeError is a ValueError
            self.problem = f"{cfg.data.prepared_dir}: {err}"

    def check(self) -> str | None:
        return self.problem

    def summary(self) -> dict:
        return self._summary

    def splits(self) -> dict:
        """The class keys of each side (`split_keys`), stored with the checkpoint as meta_train's are."""
        return self._splits

    def batch(self, step: int, rank: int, world: int) -> list[dict]:
        a = self.cfg.align
        positions = worker_slice(batch_positions(len(self.items), a.batch_size, step, a.seed), rank, world)
        return [self.items[i] for i in positions]

    def all_items(self) -> list[dict]:
        return self.items

    def peak_rss_mb(self) -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_trainer(cfg: Config, callbacks: list | None = None):
    """The TorchTrainer of an alignment run; the features of the run's encoder and data are computed first
    when missing (`ecgray.features.ensure_features`)."""
    import ray

    from ecgray.train.engine import feature_inputs, torch_trainer

    check_config(cfg)
    # the frozen encoder's features of every ECG, computed once, and a grounded mapper's statistics
    features, stats = feature_inputs(cfg)
    source = ray.remote(num_cpus=0)(AlignSource).remote(to_dict(cfg))
    problem = ray.get(source.check.remote())
    if problem is not None:
        ray.kill(source)
        raise ValueError(problem)
    s = ray.get(source.summary.remote())
    excluded = len(s.get("caption_excluded_statements", []))
    say(
        f"align: {s['items']} items: {s['caption_items']} caption items ({s['caption_ecgs']} ECGs x {cfg.align.caption_repeats}, "
        f"align.caption_form={cfg.align.caption_form}, align.captions={cfg.align.captions}, {excluded} eval statements left out), {s['qa_items']} "
        "meta-train QA items; "
        f"{cfg.align.steps} steps of {cfg.align.batch_size}"
    )
    loop_config = {"cfg": to_dict(cfg), "features": features, "items": source, "feature_stats": stats}
    return torch_trainer(cfg, train_loop_per_worker, loop_config, cfg.align.name, callbacks)


def align(cfg: Config):
    """Run the alignment on the current Ray cluster (ray.init() when none is connected) -> ray.train.Result."""
    import ray

    check_config(cfg)
    from ecgray.logs import runtime_env

    if not ray.is_initialized():
        ray.init(runtime_env=runtime_env())
    return build_trainer(cfg).fit()


def train_loop_per_worker(config: dict) -> None:
    cfg = from_dict(config["cfg"])
    from ecgray.train import engine as eng

    rank, world, device = eng.worker_setup(cfg, seed=cfg.align.seed)
    import ray.train

    from ecgray.eval.metrics import blind_loss_floor
    from ecgray.train.loop import FeatureCache

    # the mapper seeded from cfg.seed, as meta-training's; lm.mapper's buffers are the ones saved
    lm, master = eng.worker_model(cfg, device, config["feature_stats"])
    resumed = eng.resume(lm, master, cfg, "align", rank)
    engine, module = eng.build_engine(master, lm.llm, cfg, world, lr=cfg.align.lr)
    if resumed is not None:
        eng.load_optimizer_state(engine, module, resumed.optimizer, resumed.step)
    start = 0 if resumed is None else resumed.step
    history = {"restarts": [], "losses": []} if resumed is None else resumed.history
    cache = FeatureCache(lm, eng.feature_store(cfg, config["features"]))
    source = config["items"]  # the run's AlignSource actor
    splits = ray.get(source.splits.remote()) if rank == 0 else None  # rank 0 writes the checkpoints
    lm.train()  # the mapper's dropout, as in the inner loops

    a = cfg.align
    t_first = None
    bar = progress(total=a.steps, initial=start, desc="align", unit="step", disable=rank != 0)
    for step in range(start, a.steps):
        items = ray.get(source.batch.remote(step, rank, world))
        theta = {k: v.requires_grad_() for k, v in eng.gather_theta(module).items()}
        nll, count = batch_nll(lm, cache, theta, items)
        tokens = eng.all_sum([count])[0]  # the whole batch's answer tokens, over every worker
        # DeepSpeed averages the W workers' gradients: W * (own NLL sum) / (all tokens) makes that average
        # the gradient of the whole batch's token mean
        grads = torch.autograd.grad(nll * world / tokens, list(theta.values()))
        loss = engine(dict(zip(theta, grads, strict=True)))  # surrogate: its gradient w.r.t. theta is grads
        engine.backward(loss)
        engine.step()
        done = step + 1
        t_first = t_first or time.perf_counter()
        batch_loss = eng.all_sum([float(nll.detach())])[0] / tokens
        history["losses"].append(batch_loss)
        metrics = {
            "step": done,
            "align_loss": batch_loss,
            "align_lr": a.lr,
            "items_per_s": (done - start - 1) * a.batch_size / (time.perf_counter() - t_first)
            if done > start + 1
            else None,
            "peak_rss_mb": eng.all_max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
        if rank == 0:
            print(json.dumps(metrics), flush=True)
        bar.set_postfix_str(f"loss {batch_loss:.3f}")
        bar.update(1)
        if done == a.steps:
            last = history["losses"][-10:]
            metrics.update(
                align_loss_first_step=history["losses"][0],
                align_loss_last_10=sum(last) / len(last),
                **{f"align_{k}": v for k, v in ray.get(source.summary.remote()).items()},
            )
            if rank == 0:  # what a model that never reads the ECG can reach on these items
                metrics["align_blind_loss_floor"] = blind_loss_floor(ray.get(source.all_items.remote()), lm)
        if done % a.checkpoint_every == 0 or done == a.steps:
            state = {"step": done, **history}
            eng.report_checkpoint(engine, module, lm, cfg, metrics, splits, state, rank)
        else:
            ray.train.report(metrics)
    bar.close()


if __name__ == "__main__":
    from ecgray.cli import main

    sys.exit(main(["align", *sys.argv[1:]]))


__all__ = [
    "CAPTION_QUESTION",
    "align",
    "align_items",
    "batch_nll",
    "batch_positions",
    "caption_items",
    "caption_statements",
    "check_caption_ecgs",
    "eval_ecg_ids",
    "eval_statements",
    "initial_mapper_state",
    "qa_items",
    "train_mapper",
]
