"""Meta-training throughput on CPU: the official loop vs ecgray's engine, same episodes, JSON out.

    .venv/bin/python bench/meta_step.py --episodes 4 --inner-steps 15 --tasks 2

Engines (each runs in its own subprocess so its peak RSS is its own):
  reference      the official loop: paper_compat prompt (prefix first, padded to 30 tokens), full-sequence
                 logits, one task per step, the query graphs retained to one backward at the end
  reference_tf   the same loop with ecgray's teacher-forced prompt (prefix first): the loss check's baseline
  fast_pf        ecgray's engine, prefix first, answer-position logits, per-step query gradients (no graph
                 kept), one task per step: its losses must equal reference_tf's on the same episodes
  fast_2pass     ecgray's engine, --layout (question_first, or prefix_last: "Answer:" cached with the question)
                 with the question KV cache built once per episode, answer-position logits, --tasks tasks per
                 meta-step sharing every LLM pass
  fast           the same, and the query pass after inner step k merged with the support pass of step k + 1
                 (same fast weights: one pass, one backward; `meta_step(query_then_support=...)`), as
                 `ecgray train` runs it
--profile adds, per engine, the share of one meta-step's operator time spent in matrix products (torch.profiler).
--dtype sets the frozen LLM's precision for every engine (float32 as before, or bfloat16: the demo's on a
CPU with AMX / AVX512-BF16); the speedup is only ever between engines of one dtype, in one run.
Episodes are the paper's shape (n_way x k_shot support, n_way x n_query query, single-verify-like questions,
one question per class); ECG features are random (the encoder is frozen, its outputs are cached anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ATTRS = ["baseline drift", "static noise", "burst noise", "electrodes problems", "atrial fibrillation",
         "sinus rhythm", "left ventricular hypertrophy", "myocardial infarction"]  # fmt: skip
ENGINES = ["reference", "reference_tf", "fast_pf", "fast_2pass", "fast"]


def episodes(n: int, n_way: int, k_shot: int, n_query: int, d_enc: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        classes = torch.randperm(len(ATTRS) * 2, generator=g)[:n_way].tolist()
        sets = {}
        for name, per_class in (("support", k_shot), ("query", n_query)):
            qs, ans = [], []
            for c in classes:
                qs += [f"Does this ECG show symptoms of {ATTRS[c // 2]}?"] * per_class
                ans += [["yes" if c % 2 else "no"]] * per_class
            sets[name] = (torch.randn(len(qs), d_enc, generator=g), qs, ans)
        out.append(sets)
    return out


def run_engine(args) -> dict:
    import torch

    from ecgray.config import ModelConfig
    from ecgray.meta import meta_step, reference_meta_step
    from ecgray.models.ecg_lm import ECGLanguageModel
    from ecgray.models.fusion import build_mapper
    from ecgray.models.llm import llm_hidden_size, load_llm

    torch.set_num_threads(args.threads)
    engine = args.engine
    llm, tokenizer = load_llm(args.llm, args.dtype, "cpu")
    layout = args.layout if engine in ("fast", "fast_2pass") else "prefix_first"
    cfg = ModelConfig(llm=args.llm, prompt_layout=layout, paper_compat=engine == "reference")
    torch.manual_seed(0)
    mapper = build_mapper(cfg, args.d_enc, llm_hidden_size(llm))
    model = ECGLanguageModel(None, mapper, llm, tokenizer, cfg).train()
    eps = episodes(args.episodes, args.n_way, args.k_shot, args.n_query, args.d_enc, args.seed)
    tasks = args.tasks if engine in ("fast", "fast_2pass") else 1
    kw = dict(inner_steps=args.inner_steps, inner_lr=0.05, query_from_step=2)

    def step(group):
        support = model.task_set([model.task_data(e["support"][0], None, *e["support"][1:]) for e in group])
        query = model.task_set([model.task_data(e["query"][0], None, *e["query"][1:]) for e in group])
        if engine.startswith("reference"):
            return reference_meta_step(
                model.loss_fn(full_logits=True), model.mapper_params(), support, query, **kw
            )
        both = model.task_set(query.tasks + support.tasks) if engine == "fast" else None
        return meta_step(
            model.loss_fn(), model.mapper_params(), support, query, len(group), **kw, query_then_support=both
        )

    query_losses, times = [], []
    for start in range(0, len(eps), tasks):
        group = eps[start : start + tasks]
        torch.manual_seed(args.seed + start)  # same dropout masks in every engine on the same episode
        t0 = time.perf_counter()
        out = step(group)
        times.append(time.perf_counter() - t0)
        query_losses += out.query_losses.T.tolist()  # per episode: the query loss after each step
        print(f"[{engine}] episodes {start + len(group)}/{len(eps)}: {times[-1]:.1f} s", file=sys.stderr)
    return {
        "engine": engine,
        "episodes": len(eps),
        "tasks_per_step": tasks,
        "seconds": round(sum(times), 2),
        "episodes_per_s": round(len(eps) / sum(times), 5),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "query_losses": query_losses,
        **({"profile": profile(step, eps[:tasks])} if args.profile else {}),
    }


MATRIX_OPS = (
    "aten::mm",
    "aten::bmm",
    "aten::addmm",
    "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
)


def profile(step, group) -> dict:
    """One more meta-step under torch.profiler (after the timed ones): the share of its operator time spent
    in matrix products (forward and backward), and its top operators. What is left outside them bounds what
    any saving of overhead could still buy."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step(group)
    ops = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(ops.values())
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:8]
    return {
        "matrix_share": round(sum(ops.get(k, 0.0) for k in MATRIX_OPS) / total, 4),
        "top_ops_share": {k: round(v / total, 4) for k, v in top},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llm", default="smollm2-135m")
    p.add_argument("--episodes", type=int, default=2)
    p.add_argument("--inner-steps", type=int, default=15)
    p.add_argument("--n-way", type=int, default=5)
    p.add_argument("--k-shot", type=int, default=5)
    p.add_argument("--n-query", type=int, default=5)
    p.add_argument("--tasks", type=int, default=2, help="tasks per meta-step of the fast engine")
    p.add_argument("--d-enc", type=int, default=768)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", default="question_first", choices=["question_first", "prefix_last"],
                   help="model.prompt_layout of the fast_2pass and fast engines (both cache the question)")  # fmt: skip
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the frozen LLM's")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {ENGINES}")
    p.add_argument("--profile", action="store_true",
                   help="also profile one meta-step per engine: the share of operator time in matrix products")  # fmt: skip
    p.add_argument("--engine", help=argparse.SUPPRESS)  # internal: run one engine in this process
    args = p.parse_args()
    if args.engine:
        print(json.dumps(run_engine(args)))
        return 0
    if args.episodes % args.tasks:
        p.error(f"--episodes ({args.episodes}) must be a multiple of --tasks ({args.tasks})")
    results = {}
    for engine in args.engines.split(","):
        if engine not in ENGINES:
            p.error(f"--engines: unknown engine {engine!r}; expected some of {ENGINES}")
        cmd = [sys.executable, __file__, *sys.argv[1:], "--engine", engine]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ, check=True)
        results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
    report = {
        "conditions": {k: v for k, v in vars(args).items() if k not in ("engine",)}
        | {"torch_threads": args.threads, "cpu_count": os.cpu_count(), "load_average": os.getloadavg()},
        "engines": {k: {kk: vv for kk, vv in v.items() if kk != "query_losses"} for k, v in results.items()},
    }
    for fast in ("fast_2pass", "fast"):
        if "reference" in results and fast in results:
            report[f"speedup_{fast}_vs_reference"] = round(
                results[fast]["episodes_per_s"] / results["reference"]["episodes_per_s"], 2
            )
    if "fast_2pass" in results and "fast" in results:
        a, b = results["fast_2pass"]["query_losses"], results["fast"]["query_losses"]
        report["max_abs_query_loss_diff_fast_2pass_vs_fast"] = max(
            abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)
        )
    if "reference_tf" in results and "fast_pf" in results:
        a, b = results["reference_tf"]["query_losses"], results["fast_pf"]["query_losses"]
        report["max_abs_query_loss_diff_reference_tf_vs_fast_pf"] = max(
            abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)
        )
        report["speedup_fast_pf_vs_reference_tf"] = round(
            results["fast_pf"]["episodes_per_s"] / results["reference_tf"]["episodes_per_s"], 2
        )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
