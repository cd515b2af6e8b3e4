"""Meta-training throughput and memory on Ray Train + DeepSpeed, on this machine (CPU).

    .venv/bin/python bench/scaling.py                      # tiny-llama: episodes/s with 1 vs 2 workers
    .venv/bin/python bench/scaling.py --llm smollm2-135m   # SmolLM2, 2 workers: ZeRO-0 vs ZeRO-3

Every run meta-trains on a toy prepared dataset (ecgray.train.toy: random ECGs, single-verify questions) with
the same global batch of `--tasks` tasks per outer step split across the workers. episodes/s leaves out the
first step (warm-up). Memory per worker: the parameter bytes it holds (the whole frozen LLM at ZeRO 0-2, its
partition at ZeRO-3, plus the mapper; `engine.held_parameter_bytes`) and its peak RSS (max over workers).
`--runs` lists workers:stage pairs. Prints one JSON object.
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
    parser.add_argument(
        "--runs",
        default=None,
        help="workers:zero_stage pairs, comma-separated (default: 1:0,2:0 for tiny-llama, 2:0,2:3 otherwise)",
    )
    parser.add_argument(
        "--zero3-max-live", type=int, default=10**7, help="train.zero3_max_live_parameters (ZeRO-3 runs)"
    )
    args = parser.parse_args()
    spec = args.runs or ("1:0,2:0" if args.llm == "tiny-llama" else "2:0,2:3")
    pairs = [tuple(int(x) for x in pair.split(":")) for pair in spec.split(",")]
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
                # ZeRO-3 frees each module's gathered weights after its call (DeepSpeed's default keeps a model
                # of < 1e9 parameters gathered whole): ~1/W of the LLM held per worker
                f"train.zero3_max_live_parameters={args.zero3_max_live}",
            ],
        )  # fmt: skip

    runs = [run(cfg(workers, zero, f"w{workers}z{zero}")) for workers, zero in pairs]
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
                "episodes_per_s_vs_first_run": [round(r["episodes_per_s"] / runs[0]["episodes_per_s"], 2) for r in runs],
            },
            indent=2,
        )
    )  # fmt: skip
    ray.shutdown()


if __name__ == "__main__":
    main()
