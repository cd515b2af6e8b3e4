"""Model FLOP utilisation of one FOMAML meta-step on a GPU, LLaMA-3.1-8B-shaped random weights in bf16.

    python bench/gpu_meta_step.py --tasks 4                        # on the GPU machine (no download)
    python bench/gpu_meta_step.py --tiny --inner-steps 2 --tasks 2  # CPU sanity check

Imports only torch, transformers and ecgray.models / ecgray.meta (the GPU machine has no ray / deepspeed).
The model is built from a LlamaConfig (random weights); the tokenizer is ecgray's offline tiny tokenizer
(prompt token ids only need to be valid ids). Episodes: n_way x k_shot support and n_way x n_query query per
task, `--tasks` tasks per meta-step in lockstep, question-first layout with the question KV cache.

Model FLOPs are counted analytically from the shapes of every frozen-LLM pass the engine makes (counted by
wrapping the loss function): matmuls 2 * params * tokens forward, the same again for the input-gradient
backward (the frozen weights need no weight gradient), attention scores + mixing 4 * d * T_q * T_kv per layer
forward (x2 backward), the LM head only at answer positions; the once-per-step question-cache pass is
forward only. The mapper's FLOPs are ignored (< 1 %). MFU = achieved FLOP/s / --peak-tflops.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def llama_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
        )  # fmt: skip
    return LlamaConfig(  # LLaMA-3.1-8B shapes
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=False,
    )  # fmt: skip


def layer_params(c) -> int:
    head = c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head
    return c.hidden_size * (2 * c.hidden_size + 2 * kv) + 3 * c.hidden_size * c.intermediate_size


def pass_flops(c, batch, n_prefix: int, backward: bool) -> float:
    """FLOPs of one pass over [before ; prefix ; after] of `batch` (before cached when batch.cache is set)."""
    b = batch.size
    t_new = n_prefix + batch.after_ids.shape[1]
    t_past = batch.before_ids.shape[1] if batch.cache is not None else 0
    if batch.cache is None:
        t_new += batch.before_ids.shape[1]
    d, n_layers = c.hidden_size, c.num_hidden_layers
    dense = 2 * layer_params(c) * n_layers * b * t_new
    # causal attention: query i sees t_past + i + 1 keys
    pairs = b * (t_new * t_past + t_new * (t_new + 1) / 2)
    attn = 4 * d * n_layers * pairs
    head = 2 * d * c.vocab_size * int(batch.target_mask.sum())
    fwd = dense + attn + head
    return fwd + (dense + 2 * attn + head if backward else 0)


def cache_flops(c, batch) -> float:
    if batch.cache is None:
        return 0.0
    b, t = batch.before_ids.shape
    return (
        2 * layer_params(c) * c.num_hidden_layers * b * t
        + 4 * c.hidden_size * c.num_hidden_layers * b * t * (t + 1) / 2
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a 2-layer 64-wide LLaMA (CPU sanity check)")
    p.add_argument("--device", default="auto")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--inner-steps", type=int, default=15)
    p.add_argument("--n-way", type=int, default=5)
    p.add_argument("--k-shot", type=int, default=5)
    p.add_argument("--n-query", type=int, default=5)
    p.add_argument("--layout", default="question_first", choices=["question_first", "prefix_first"])
    p.add_argument("--repeats", type=int, default=2, help="timed meta-steps after one warm-up step")
    p.add_argument(
        "--peak-tflops", type=float, default=790.0, help="dense bf16 peak (H200 / H100 SXM ~ 790-990)"
    )
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    args = p.parse_args()

    import torch
    from transformers import LlamaForCausalLM

    from ecgray.config import ModelConfig
    from ecgray.meta import meta_step
    from ecgray.models.ecg_lm import ECGLanguageModel
    from ecgray.models.fusion import build_mapper
    from ecgray.models.llm import freeze_llm, tiny_tokenizer

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    c = llama_config(args.tiny)
    c._attn_implementation = args.attn
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        llm = freeze_llm(LlamaForCausalLM(c).to(dtype))
    build_s = time.perf_counter() - t0
    tokenizer = tiny_tokenizer()
    cfg = ModelConfig(llm="random-llama", prompt_layout=args.layout, dtype="auto")
    mapper = build_mapper(cfg, 768, c.hidden_size).to(device)  # fp32 mapper, bf16 LLM
    model = ECGLanguageModel(None, mapper, llm, tokenizer, cfg).train()

    attrs = ["baseline drift", "static noise", "burst noise", "atrial fibrillation", "sinus rhythm",
             "left ventricular hypertrophy", "myocardial infarction", "electrodes problems"]  # fmt: skip
    g = torch.Generator().manual_seed(0)

    def task(per_class: int):
        classes = torch.randperm(len(attrs), generator=g)[: args.n_way].tolist()
        qs = [f"does this ecg show symptoms of {attrs[k]}?" for k in classes for _ in range(per_class)]
        ans = [["yes" if k % 2 else "no"] for k in classes for _ in range(per_class)]
        return model.task_data(torch.randn(len(qs), 768, generator=g).to(device), None, qs, ans)

    flops = {"total": 0.0}
    base_loss = model.loss_fn()

    def counting_loss(fast, data):
        flops["total"] += sum(pass_flops(c, b, cfg.n_prefix, backward=True) for _, b in data.batches)
        return base_loss(fast, data)

    def one_step():
        support = model.task_set([task(args.k_shot) for _ in range(args.tasks)])
        query = model.task_set([task(args.n_query) for _ in range(args.tasks)])
        flops["total"] += sum(cache_flops(c, b) for data in (support, query) for _, b in data.batches)
        out = meta_step(
            counting_loss, model.mapper_params(), support, query, args.tasks, args.inner_steps, 0.05, 2
        )
        return out

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    one_step()  # warm-up (kernel selection, allocator)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    flops["total"] = 0.0
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        out = one_step()
    sync()
    seconds = (time.perf_counter() - t0) / args.repeats
    step_flops = flops["total"] / args.repeats
    achieved = step_flops / seconds / 1e12
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": "tiny LLaMA (2 x 64)" if args.tiny else "LLaMA-3.1-8B-shaped, random weights",
        "dtype": str(dtype).replace("torch.", ""),
        "conditions": vars(args),
        "llm_build_s": round(build_s, 1),
        "meta_step_s": round(seconds, 4),
        "episodes_per_s": round(args.tasks / seconds, 3),
        "model_gflop_per_meta_step": float(f"{step_flops / 1e9:.6g}"),
        "achieved_tflops": float(f"{achieved:.6g}"),
        "mfu_percent_of_peak": float(f"{100 * achieved / args.peak_tflops:.4g}"),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        "meta_loss": out.meta_loss,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
