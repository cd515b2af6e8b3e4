"""Frozen-encoder feature throughput: the built-in encoder (configs/demo.yaml) vs an ECG-FM-sized wav2vec2_ecg.

    .venv/bin/python bench/encoder_features.py [--batch 32] [--batches 3] [--gpu-tflops 790] [--gpu-util 0.25]

Measured here: ECGs per second of each encoder's forward (fp32, torch.no_grad, random weights and random
ECGs of the encoder's input shape, one warm-up batch, then --batches timed batches) on this machine's CPU,
and from that the minutes to encode PTB-XL's 21,799 ECGs. Projected, not measured: the same on one GPU,
from the forward's FLOPs per ECG (multiply-adds of the convolutions, projections and attention, counted
from the architecture; norms and activations left out) and an assumed sustained throughput of
--gpu-util x --gpu-tflops (default 25 % of an H200's ~790 TFLOP/s dense bf16, docs/platform). The
projection ignores kernel-launch and transfer overheads, so for a small encoder (the demo's, 0.5 M
parameters) it is only a lower bound on the time: such a model is overhead-bound on a GPU. Prints a table
and one JSON line; every figure says whether it is measured or projected.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from ecgray.config import EncoderConfig, load_config
from ecgray.models.encoder import build_encoder, freeze

PTBXL_ECGS = 21_799
REPO = Path(__file__).resolve().parents[1]


def flops_per_ecg(cfg: EncoderConfig, n_samples: int) -> float:
    """Forward FLOPs (2 per multiply-add) of one ECG through the encoder, from its architecture."""
    d, f, h = cfg.d_enc, cfg.ffn_mult * cfg.d_enc, 0.0
    if cfg.kind == "conv_transformer":
        n = n_samples // cfg.patch
        h += 2 * cfg.stem_channels * 12 * 7 * n_samples  # stride-1 stem conv, kernel 7
        h += 2 * d * cfg.stem_channels * cfg.patch * n  # patchifying conv
    else:
        n, c_in = n_samples, 12
        for c, k, s in cfg.conv_layers:
            n = (n - k) // s + 1
            h += 2 * c * c_in * k * n
            c_in = c
        h += 2 * n * c_in * d if c_in != d else 0  # post_extract_proj
        h += 2 * n * d * (d // cfg.pos_conv_groups) * cfg.pos_conv_kernel  # convolutional positions
    layer = 2 * n * (4 * d * d) + 2 * (2 * n * n * d) + 2 * n * (2 * d * f)  # q k v out, QK^T and AV, FFN
    return h + cfg.n_layers * layer


def measure(cfg: EncoderConfig, n_samples: int, batch: int, batches: int) -> float:
    """ECGs per second of the frozen encoder's forward on the CPU (fp32, no_grad)."""
    torch.manual_seed(0)
    encoder = freeze(build_encoder(cfg))
    x = torch.randn(batch, 12, n_samples)
    mask = torch.ones(batch, 12, dtype=torch.bool)
    with torch.no_grad():
        encoder(x, mask)  # warm-up
        start = time.perf_counter()
        for _ in range(batches):
            encoder(x, mask)
        seconds = time.perf_counter() - start
    return batch * batches / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3, help="timed batches after one warm-up batch")
    parser.add_argument("--gpu-tflops", type=float, default=790.0, help="GPU peak dense bf16 TFLOP/s assumed")
    parser.add_argument(
        "--gpu-util", type=float, default=0.25, help="fraction of that peak assumed sustained"
    )
    args = parser.parse_args()
    demo = load_config(REPO / "configs" / "demo.yaml")
    encoders = {
        "conv_transformer (configs/demo.yaml)": (demo.encoder, demo.data.n_samples),
        "wav2vec2_ecg (ECG-FM sizes)": (EncoderConfig(kind="wav2vec2_ecg"), 2500),
    }
    gpu_flops = args.gpu_tflops * 1e12 * args.gpu_util
    rows = []
    for name, (cfg, n_samples) in encoders.items():
        rate = measure(cfg, n_samples, args.batch, args.batches)
        flops = flops_per_ecg(cfg, n_samples)
        with torch.device("meta"):
            params = sum(p.numel() for p in build_encoder(cfg).parameters())
        rows.append(
            {
                "encoder": name,
                "input": f"12 x {n_samples} ({cfg.fs} Hz)",
                "parameters": params,
                "gflop_per_ecg": round(flops / 1e9, 3),
                "cpu_ecgs_per_s (measured)": round(rate, 1),
                "ptbxl_cpu_min (from measured)": round(PTBXL_ECGS / rate / 60, 1),
                "gpu_ecgs_per_s (projected)": float(f"{gpu_flops / flops:.3g}"),
                "ptbxl_gpu_s (projected)": float(f"{PTBXL_ECGS * flops / gpu_flops:.3g}"),
            }
        )
    conditions = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "batch": args.batch,
        "timed_batches": args.batches,
        "dtype": "float32",
        "gpu_assumption": f"{args.gpu_util:.0%} of {args.gpu_tflops:g} TFLOP/s dense bf16 (projected, not measured)",
        "ptbxl_ecgs": PTBXL_ECGS,
    }
    for row in rows:
        print(row["encoder"])
        for key, value in row.items():
            if key != "encoder":
                print(f"  {key:<32} {value}")
    print(json.dumps({"conditions": conditions, "encoders": rows}))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
