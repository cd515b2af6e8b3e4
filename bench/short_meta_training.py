"""A short meta-training run in one process (the library's loop, no Ray), then evaluation on meta-val
episodes (never meta-test: settings are chosen here) against the baselines on the same episodes: the quick
way to try a demo setting (meta_lr, question type, outer steps,
layout) before a full `make demo`. Prints one line per outer step and, per question type, exact match per
inner step with the 95 % CI half-width at the last step.

    .venv/bin/python bench/short_meta_training.py --run runs/demo --steps 30 \
        --set meta.meta_lr=0.005 episodes.question_type=single-choose --eval-types single-choose

`--run` is a demo run directory (config.yaml + prepared data + encoder); `--init` starts from a checkpoint
directory or a .safetensors file instead of a fresh mapper; --set overrides the run's config.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from ecgray.config import load_config
from ecgray.data.episodes import EpisodeSampler
from ecgray.data.shards import ECGStore, read_qa
from ecgray.eval import baselines as B
from ecgray.eval.meta_test import load_template_answers, meta_test
from ecgray.meta.maml import apply_meta_gradient, make_meta_optimizer, meta_lr_at, set_lr
from ecgray.models.checkpoint import load_checkpoint
from ecgray.models.ecg_lm import build_model
from ecgray.train.loop import FeatureCache, meta_gradient


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/demo", help="a demo run directory")
    p.add_argument("--set", nargs="*", default=[], help="config overrides, dotted.key=value")
    p.add_argument("--steps", type=int, default=20, help="outer steps (0: evaluate --init as it is)")
    p.add_argument("--init", default=None, help="checkpoint dir or .safetensors to start from")
    p.add_argument("--eval-types", default="single-verify", help="comma-separated question types")
    p.add_argument("--episodes", type=int, default=10, help="meta-val episodes per question type")
    p.add_argument("--baselines", default="finetune_scratch,blind_llm")
    p.add_argument("--save", default=None, help="write the meta-trained mapper here (.safetensors)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(Path(a.run) / "config.yaml", a.set)
    if a.steps:  # the run's length is --steps (what meta.lr_schedule decays over)
        cfg = dataclasses.replace(cfg, meta=dataclasses.replace(cfg.meta, outer_steps=a.steps))
    torch.manual_seed(cfg.seed)
    state = None
    if a.init:
        from safetensors.torch import load_file

        state = load_file(a.init) if a.init.endswith(".safetensors") else load_checkpoint(a.init)[0]
    lm = build_model(cfg, "cpu", mapper_state=state)
    store = ECGStore.open(cfg.data.prepared_dir)
    theta = lm.mapper_params()
    t0 = time.time()
    if a.steps:
        qa = read_qa(cfg.data.prepared_dir, cfg.data.source, cfg.data.variant, cfg.episodes.types())
        sampler = EpisodeSampler(qa, cfg.episodes, "meta-train", seed=cfg.seed)
        cache = FeatureCache(lm, store)
        opt = make_meta_optimizer(list(theta.values()), cfg.meta)
        g = cfg.meta.tasks_per_step
        lm.train()
        for s in range(a.steps):
            eps = [sampler.episode(s * g + j) for j in range(g)]
            r = meta_gradient(lm, cache, {k: v.detach() for k, v in theta.items()}, eps, cfg)
            set_lr(opt, meta_lr_at(s, cfg.meta))
            apply_meta_gradient(opt, theta, r.grads, cfg.meta.grad_clip)
            sl = r.support_losses
            print(
                f"step {s + 1} meta_loss {r.meta_loss:.3f} support loss {float(sl[0].mean()):.3f} -> "
                f"{float(sl[-1].mean()):.3f} ({time.time() - t0:.0f} s)",
                flush=True,
            )
        lm.eval()
    if a.save:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in theta.items()}, a.save)
    print(f"meta-training {time.time() - t0:.0f} s", flush=True)
    for qt in a.eval_types.split(","):
        qcfg = dataclasses.replace(cfg, episodes=dataclasses.replace(cfg.episodes, question_type=qt))
        qa = read_qa(cfg.data.prepared_dir, cfg.data.source, cfg.data.variant, [qt])
        eps = EpisodeSampler(qa, qcfg.episodes, "meta-val", seed=cfg.eval.seed).episodes(a.episodes)
        common = {"template_answers": load_template_answers(qcfg), "feature_cache": {}}
        t1 = time.time()
        res = {"meta_test": meta_test(lm, theta, eps, store, qcfg, **common)}
        for b in filter(None, a.baselines.split(",")):
            res[b] = getattr(B, b)(lm, eps, store, qcfg, **common)
        for name, r in res.items():
            em = r["summary"][qt]["exact_match"]
            steps = " ".join(f"{c['mean']:.3f}" for c in em)
            print(f"{qt} {name}: exact match per step {steps} +- {em[-1]['half_width']:.3f}", flush=True)
        print(f"eval {qt}: {time.time() - t1:.0f} s", flush=True)


if __name__ == "__main__":
    main()
