"""Encoder and LLM-loading figures: frozen encoder throughput, pretraining step time, load_llm times.

    .venv/bin/python bench/encoder.py [--device cpu|cuda] [--iters 3] [--smollm2]

Prints one JSON object (figures + conditions). Random inputs of the method's shape (12 leads x 2,500
samples = 5 s at 500 Hz); `--smollm2` also times load_llm("smollm2-135m") from its safetensors cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from ecgray.config import EncoderConfig
from ecgray.models.encoder import ECGEncoder, freeze
from ecgray.train.pretrain_encoder import cmsc_views, info_nce

CONFIGS = {
    "default_768x4": EncoderConfig(),
    "small_128x2": EncoderConfig(d_enc=128, n_layers=2, n_heads=4, stem_channels=32),
}


def timed(fn, iters: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--smollm2", action="store_true", help="also time the cached SmolLM2 load")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 12, 2500, device=device)
    mask = torch.ones(args.batch, 12, dtype=torch.bool, device=device)
    out: dict = {
        "conditions": {
            "device": torch.cuda.get_device_name()
            if device.type == "cuda"
            else platform.processor() or "cpu",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_avg_1m": os.getloadavg()[0],
            "batch": args.batch,
            "window": "12 x 2500",
            "iters": args.iters,
        },
        "encoder": {},
    }
    for name, cfg in CONFIGS.items():
        enc = ECGEncoder(cfg).to(device)
        n_params = sum(p.numel() for p in enc.parameters())
        frozen = freeze(ECGEncoder(cfg).to(device))

        def infer(frozen=frozen):
            with torch.inference_mode():
                frozen(x, mask)

        head = torch.nn.Linear(cfg.d_enc, 128).to(device)
        opt = torch.optim.AdamW(list(enc.parameters()) + list(head.parameters()), lr=1e-4)
        gen = torch.Generator(device=device).manual_seed(0)

        def step(enc=enc, head=head, opt=opt, cfg=cfg, gen=gen):
            xa, ma, xb, mb = cmsc_views(x, mask, cfg, gen)
            loss = info_nce(head(enc(xa, ma)[1]), head(enc(xb, mb)[1]), cfg.pretrain_temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()

        t_infer = timed(infer, args.iters, device)
        t_step = timed(step, args.iters, device)
        out["encoder"][name] = {
            "params": n_params,
            "frozen_forward_ecgs_per_s": round(args.batch / t_infer, 1),
            "contrastive_step_s": round(t_step, 3),
        }
    from ecgray.models.llm import load_llm

    for name in ["tiny-llama", "tiny-gemma"] + (["smollm2-135m"] if args.smollm2 else []):
        start = time.perf_counter()
        load_llm(name, device=device)
        out.setdefault("load_llm_s", {})[name] = round(time.perf_counter() - start, 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
