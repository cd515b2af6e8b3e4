"""Meta-training throughput and memory on Ray Train + DeepSpeed, on this machine (CPU).

    .venv/bin/python bench/scaling.py                      # tiny-llama: episodes/s with 1 vs 2 workers
    .venv/bin/python bench/scaling.py --llm smollm2-135m   # SmolLM2: the same, plus ZeRO-0 vs ZeRO-2 memory

Every run meta-trains on a toy prepared dataset (ecgray.train.toy: random ECGs, single-verify questions) with
the same global batch of `--tasks` tasks per outer step split across the workers. episodes/s leaves out the
first step (warm-up). Memory per worker: the parameters it holds (the frozen LLM is replicated at every ZeRO
stage; ZeRO-3 is refused, see ecgray/train/engine.py) and its peak RSS (max over workers). Prints one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings


def run(cfg) -> dict:
    from ecgray.train.meta_train import build_trainer

    started = time.perf_counter()
    result = build_trainer(cfg).fit()
    if result.error is not None:
        raise result.error
    m = result.metrics
    return {
        "workers": cfg.train.num_workers,
        "zero_stage": cfg.train.zero_stage,
        "episodes_per_s": round(m["episodes_per_s"], 3),
        "param_mb_per_worker": round(m["param_mb_per_worker"], 1),
        "peak_rss_mb_max_worker": round(m["peak_rss_mb"], 1),
        "final_meta_loss": round(m["meta_loss"], 5),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", default="tiny-llama", help="tiny-llama (default) or smollm2-135m")
    parser.add_argument("--steps", type=int, default=6, help="outer steps per run")
    parser.add_argument(
        "--tasks", type=int, default=2, help="tasks per outer step (global, split across workers)"
    )
    parser.add_argument("--inner-steps", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import ray

    from ecgray.config import load_config
    from ecgray.train.toy import toy_overrides, write_toy_prepared

    tmp = tempfile.mkdtemp(prefix="ecgray-scaling-")
    prepared = write_toy_prepared(os.path.join(tmp, "prepared"))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)

    def cfg(workers: int, zero: int, name: str):
        return load_config(
            None,
            toy_overrides(prepared)
            + [
                f"model.llm={args.llm}", f"meta.tasks_per_step={args.tasks}", f"meta.outer_steps={args.steps}",
                f"meta.inner_steps={args.inner_steps}", f"meta.eval_every={args.steps}",
                f"meta.checkpoint_every={args.steps}", f"train.num_workers={workers}", f"train.zero_stage={zero}",
                f"train.storage_path={tmp}/runs", f"train.name={name}",
            ],
        )  # fmt: skip

    runs = [run(cfg(1, 0, "w1z0")), run(cfg(2, 0, "w2z0"))]
    if args.llm != "tiny-llama":
        # ZeRO-2 shards only the mapper's optimizer state and gradients: next to ZeRO-0 it shows how little that is
        runs.append(run(cfg(2, 2, "w2z2")))
    print(
        json.dumps(
            {
                "bench": "scaling",
                "llm": args.llm,
                "conditions": {
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), no GPU, fp32",
                    "episode": "2-way 2-shot 2-query single-verify, toy ECGs (1 s at 100 Hz), tiny encoder",
                    "tasks_per_step": args.tasks, "inner_steps": args.inner_steps, "outer_steps": args.steps,
                    "cpus_per_worker": 1,
                },
                "runs": runs,
                "speedup_2_vs_1_workers": round(runs[1]["episodes_per_s"] / runs[0]["episodes_per_s"], 2),
            },
            indent=2,
        )
    )  # fmt: skip
    ray.shutdown()


if __name__ == "__main__":
    main()
