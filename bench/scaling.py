"""Meta-training throughput and memory on Ray Train + DeepSpeed, on this machine (CPU).

    .venv/bin/python bench/scaling.py                      # tiny-llama: episodes/s with 1 vs 2 workers
    .venv/bin/python bench/scaling.py --llm smollm2-135m   # SmolLM2, 2 workers: ZeRO-0 vs ZeRO-3

Every run meta-trains on a toy prepared dataset (ecgray.train.toy: random ECGs, single-verify questions) with
the same global batch of `--tasks` tasks per outer step split across the workers. episodes/s leaves out the
first step (warm-up). Memory per worker: the parameter bytes it holds (the whole frozen LLM at ZeRO 0-2, its
partition at ZeRO-3, plus the mapper; `engine.held_parameter_bytes`) and its peak RSS (max over workers).
`--runs` lists workers:stage[:cpus per worker] triples (the cpus also set each worker's torch threads), e.g.
`--runs 2:0:1,1:0:2` for the demo's layout question on 2 cores: 2 workers x 1 thread against 1 worker x 2
threads. Prints one JSON object.

    .venv/bin/python bench/scaling.py --demo-run runs/demo --runs 2:0:1,1:0:2 --steps 6
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
        "cpus_per_worker": cfg.train.cpus_per_worker,
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
        help="workers:zero_stage[:cpus_per_worker], comma-separated (default: 1:0,2:0 for tiny-llama, "
        "2:0,2:3 otherwise; cpus_per_worker 1)",
    )
    parser.add_argument(
        "--demo-run",
        default="",
        help="a demo run directory: meta-train on its episodes from its alignment with its config (model, dtype, "
        "tasks, inner steps) instead of the toy data; --llm / --dtype / --tasks / --inner-steps are then the run's",
    )
    parser.add_argument(
        "--dtype", default="float32", help="model.dtype of the frozen LLM (float32, bfloat16)"
    )
    parser.add_argument(
        "--zero3-max-live", type=int, default=10**7, help="train.zero3_max_live_parameters (ZeRO-3 runs)"
    )
    args = parser.parse_args()
    spec = args.runs or ("1:0,2:0" if args.llm == "tiny-llama" else "2:0,2:3")
    runs_spec = [[int(x) for x in item.split(":")] for item in spec.split(",")]
    if any(len(r) not in (2, 3) for r in runs_spec):
        raise SystemExit(
            f"--runs {spec}: each entry is workers:zero_stage or workers:zero_stage:cpus_per_worker"
        )
    triples = [(r[0], r[1], r[2] if len(r) == 3 else 1) for r in runs_spec]
    warnings.filterwarnings("ignore")
    import ray

    from ecgray.config import load_config
    from ecgray.train.toy import toy_overrides, write_toy_prepared

    tmp = tempfile.mkdtemp(prefix="ecgray-scaling-")
    prepared = write_toy_prepared(os.path.join(tmp, "prepared"))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)

    def cfg(workers: int, zero: int, cpus: int, name: str):
        if args.demo_run:  # the demo's own episodes, model and dtype, from its alignment
            run_dir = os.path.abspath(args.demo_run)
            return load_config(
                os.path.join(run_dir, "config.yaml"),
                [
                    f"align.checkpoint={run_dir}/align", f"data.prepared_dir={run_dir}/data/prepared",
                    f"encoder.checkpoint={run_dir}/encoder/encoder.safetensors", f"meta.outer_steps={args.steps}",
                    f"meta.eval_every={args.steps}", f"meta.checkpoint_every={args.steps}",
                    f"train.num_workers={workers}", f"train.zero_stage={zero}", f"train.cpus_per_worker={cpus}",
                    f"train.storage_path={tmp}/runs", f"train.name={name}",
                ],
            )  # fmt: skip
        return load_config(
            None,
            toy_overrides(prepared)
            + [
                f"model.llm={args.llm}", f"meta.tasks_per_step={args.tasks}", f"meta.outer_steps={args.steps}",
                f"meta.inner_steps={args.inner_steps}", f"meta.eval_every={args.steps}",
                f"meta.checkpoint_every={args.steps}", f"train.num_workers={workers}", f"train.zero_stage={zero}",
                f"train.cpus_per_worker={cpus}", f"model.dtype={args.dtype}",
                f"train.storage_path={tmp}/runs", f"train.name={name}",
                # ZeRO-3 frees each module's gathered weights after its call (DeepSpeed's default keeps a model
                # of < 1e9 parameters gathered whole): ~1/W of the LLM held per worker
                f"train.zero3_max_live_parameters={args.zero3_max_live}",
            ],
        )  # fmt: skip

    configs = [cfg(w, zero, cpus, f"w{w}z{zero}c{cpus}") for w, zero, cpus in triples]
    runs = [run(c) for c in configs]
    first = configs[0]
    print(
        json.dumps(
            {
                "bench": "scaling",
                "llm": first.model.llm,
                "conditions": {
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), no GPU, {first.model.dtype} LLM",
                    "episode": f"the meta-train episodes of {args.demo_run}" if args.demo_run else "2-way 2-shot 2-query single-verify, toy ECGs (1 s at 100 Hz), tiny encoder",
                    "tasks_per_step": first.meta.tasks_per_step, "inner_steps": first.meta.inner_steps, "outer_steps": args.steps,
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
