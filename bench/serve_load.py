"""Load test of the QA service on this machine: latency and throughput of cached-adapter answers, batched
(@serve.batch) vs unbatched (max_batch_size=1), on one answer replica; the cost of one adaptation (on the
adaptation deployment); and a profile of where one query's time goes (payload decoding + resampling, the
encoder, the LLM), measured in-process at batch 1 and at the batch size. Prints JSON.

    .venv/bin/python bench/serve_load.py                      # SmolLM2-135M (the embedded default LLM)
    .venv/bin/python bench/serve_load.py --llm tiny-llama     # plumbing only

The mapper is freshly initialised (seeded) and the encoder random-init: this measures cost, not accuracy.
Each query is one 12-lead 10 s 500 Hz ECG (base64 float32, canonicalised server-side to the 5 s window) with
the options yes / no scored. Traffic goes to 127.0.0.1 only; request counts are bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
QUESTION = "does this ecg show symptoms of baseline drift?"


def ecg_payload(seed: int) -> dict:
    x = np.random.default_rng(seed).normal(scale=0.3, size=(12, 5000)).astype("<f4")  # (leads, samples)
    return {"fs": 500, "leads": LEADS, "data": base64.b64encode(x.tobytes()).decode(), "dtype": "float32",
            "shape": [12, 5000]}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoint(llm: str, inner_steps: int, out: Path) -> Path:
    import torch

    from ecgray.config import from_dict
    from ecgray.models.checkpoint import save_checkpoint
    from ecgray.models.fusion import build_mapper
    from ecgray.models.llm import llm_hidden_size, load_llm

    tree = {"model": {"llm": llm}, "meta": {"inner_steps": inner_steps}}
    if llm.startswith("tiny"):
        tree["encoder"] = {"d_enc": 64, "n_layers": 1, "n_heads": 2, "stem_channels": 16}
    cfg = from_dict(tree)
    model, _ = load_llm(llm)
    torch.manual_seed(0)
    mapper = build_mapper(cfg.model, cfg.encoder.d_enc, llm_hidden_size(model))
    return save_checkpoint(out, mapper.state_dict(), cfg)


def profile(checkpoint: Path, cpus: int, batch: int, repeats: int = 3) -> dict:
    """Milliseconds per query of each stage, in this process (before Ray starts), at batch 1 and `batch`."""
    import torch

    from ecgray.config import ServeConfig
    from serve.engine import Query, load_engine
    from serve.payloads import ECGIn, canonical_ecg

    torch.set_num_threads(cpus)
    engine = load_engine(checkpoint, device="cpu")
    limits = ServeConfig()
    payloads = [ecg_payload(5000 + i) for i in range(batch)]
    t = time.perf_counter()
    ecgs = [canonical_ecg(ECGIn.model_validate(p), "ecgs[0]", limits, engine.cfg.data) for p in payloads]
    decode_ms = 1000 * (time.perf_counter() - t) / batch
    out = {"decode_and_resample_ms": round(decode_ms, 2)}
    for b in (1, batch):
        queries = [Query(e, QUESTION, ["yes", "no"], None) for e in ecgs[:b]]
        engine.answer(queries)  # warm-up
        enc, total = [], []
        for _ in range(repeats):
            x = torch.from_numpy(np.stack([q.ecg.signal for q in queries]))
            m = torch.from_numpy(np.stack([q.ecg.lead_mask for q in queries]))
            t = time.perf_counter()
            with torch.no_grad():
                engine.lm.encode(x, m)
            enc.append(time.perf_counter() - t)
            t = time.perf_counter()
            engine.answer(queries)
            total.append(time.perf_counter() - t)
        e, a = 1000 * min(enc) / b, 1000 * min(total) / b
        out[f"batch_{b}"] = {"encoder_ms": round(e, 1), "mapper_and_llm_ms": round(a - e, 1),
                             "engine_ms": round(a, 1)}  # fmt: skip
    out["engine_speedup_from_batching"] = round(
        out["batch_1"]["engine_ms"] / out[f"batch_{batch}"]["engine_ms"], 2
    )
    return out


def summary(latencies: list[float], wall: float, errors: int) -> dict:
    ms = sorted(1000 * t for t in latencies)
    return {
        "requests": len(ms) + errors,
        "errors": errors,
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))], 1),
        "mean_ms": round(statistics.fmean(ms), 1),
        "requests_per_s": round(len(ms) / wall, 2),
    }


async def load(url: str, adapter: str, concurrency: int, n_requests: int) -> dict:
    import httpx

    payloads = [ecg_payload(1000 + i) for i in range(n_requests)]
    sem = asyncio.Semaphore(concurrency)
    latencies, errors = [], 0

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one(i: int) -> None:
            nonlocal errors
            body = {
                "question": QUESTION,
                "ecgs": [payloads[i]],
                "adapter_id": adapter,
                "options": ["yes", "no"],
            }
            async with sem:
                t = time.perf_counter()
                r = await client.post(f"{url}/v1/answer", json=body)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n_requests)))
        wall = time.perf_counter() - start
    return summary(latencies, wall, errors)


async def during_adaptation(url: str, adapter: str, support: list[dict], concurrency: int = 8) -> dict:
    """Cached-adapter answers sent while a new support set is being adapted: how many finish meanwhile."""
    import httpx

    done_during, latencies = 0, []
    async with httpx.AsyncClient(timeout=3600) as client:
        adapting = asyncio.ensure_future(client.post(f"{url}/v1/adapt", json={"support": support}))
        start = time.perf_counter()
        await asyncio.sleep(0.5)  # let the inner loop start

        async def worker(seed: int) -> None:
            nonlocal done_during
            i = 0
            while not adapting.done():
                body = {"question": QUESTION, "ecgs": [ecg_payload(seed * 1000 + i)], "adapter_id": adapter,
                        "options": ["yes", "no"]}  # fmt: skip
                t = time.perf_counter()
                r = await client.post(f"{url}/v1/answer", json=body)
                if r.status_code == 200 and not adapting.done():
                    done_during += 1
                    latencies.append(time.perf_counter() - t)
                i += 1

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        r = await adapting
        assert r.status_code == 200 and r.json()["adapted"], r.text
    return {"adaptation_s": round(time.perf_counter() - start + 0.5, 2), "answers_completed_meanwhile": done_during,
            "p50_ms_meanwhile": round(1000 * statistics.median(latencies), 1) if latencies else None}  # fmt: skip


def wait_healthy(url: str, timeout_s: float = 600) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", default="smollm2-135m", help="smollm2-135m (default) or tiny-llama")
    parser.add_argument("--support-size", type=int, default=10, help="support items (2-way 5-shot = 10)")
    parser.add_argument("--inner-steps", type=int, default=15, help="inner SGD steps (paper: 15)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--requests-per-client", type=int, default=3, help="requests = max(8, this x concurrency)"
    )
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (= replica CPUs)")
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import httpx
    import ray
    from ray import serve

    from ecgray.config import ServeConfig, versions
    from serve.app import ServeArgs, build_app, required_cpus

    tmp = Path(tempfile.mkdtemp(prefix="ecgray-serve-bench-"))
    checkpoint = make_checkpoint(args.llm, args.inner_steps, tmp / "ckpt")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    support = [{"ecg": ecg_payload(i), "question": QUESTION, "answer": ["yes" if i % 2 else "no"]}
               for i in range(args.support_size)]  # fmt: skip
    results: dict = {"conditions": {
        "llm": args.llm, "support_size": args.support_size, "inner_steps": args.inner_steps,
        "replica_cpus": args.cpus, "answer_replicas": 1, "adaptation_replicas": 1,
        "ecg": "12 x 5000 @ 500 Hz, base64 float32", "options": 2,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs (shared)", "versions": versions(),
    }}  # fmt: skip
    results["profile"] = profile(checkpoint, args.cpus, args.max_batch_size)
    print(json.dumps({"profile": results["profile"]}), flush=True)
    # the answer and the adaptation replica each reserve --cpus; the adaptation one idles during the load
    ray.init(num_cpus=int(required_cpus(ServeConfig(replica_cpus=args.cpus))), include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for mode, batch in (("batched", args.max_batch_size), ("unbatched", 1)):
            cfg = ServeConfig(
                checkpoint=str(checkpoint),
                port=port,
                max_batch_size=batch,
                batch_wait_timeout_s=0.01,
                replica_cpus=args.cpus,
                adapter_store=str(tmp / f"adapters-{mode}"),
            )
            serve.run(build_app(ServeArgs(serve=cfg)), name="bench", route_prefix="/")
            wait_healthy(url)
            t = time.perf_counter()
            r = httpx.post(f"{url}/v1/adapt", json={"support": support}, timeout=3600)
            adapt_s = time.perf_counter() - t
            r.raise_for_status()
            assert r.json()["adapted"], r.json()
            t = time.perf_counter()
            hit = httpx.post(f"{url}/v1/adapt", json={"support": support}, timeout=600).json()
            results.setdefault("adaptation", {})[mode] = {
                "first_s": round(adapt_s, 2), "store_hit_s": round(time.perf_counter() - t, 3),
                "store_hit_adapted": hit["adapted"],
            }  # fmt: skip
            adapter = r.json()["adapter_id"]
            asyncio.run(load(url, adapter, 1, 2))  # warm-up
            for c in args.concurrency:
                n = max(8, args.requests_per_client * c)
                results.setdefault(mode, {})[f"concurrency_{c}"] = asyncio.run(load(url, adapter, c, n))
                print(json.dumps({mode: {c: results[mode][f"concurrency_{c}"]}}), flush=True)
            if mode == "batched":
                other = [
                    dict(item, answer=["no"] if item["answer"] == ["yes"] else ["yes"]) for item in support
                ]
                results[mode]["answers_during_adaptation"] = asyncio.run(
                    during_adaptation(url, adapter, other)
                )
                print(json.dumps({mode: results[mode]["answers_during_adaptation"]}), flush=True)
            info = httpx.get(f"{url}/v1/info").json()
            results[mode]["server_counters"] = {"answering": info["answer_replica"],
                                                "adaptation": info["adaptation_replica"]}  # fmt: skip
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    c = max(args.concurrency)
    results["batched_vs_unbatched_at_max_concurrency"] = round(
        results["batched"][f"concurrency_{c}"]["requests_per_s"]
        / results["unbatched"][f"concurrency_{c}"]["requests_per_s"],
        2,
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
