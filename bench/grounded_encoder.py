"""How much the frozen encoder alone knows on grounded episodes: the no-LLM controls on meta-val episodes.

    python bench/grounded_encoder.py [--work runs/bench_grounded_encoder] [--episodes 40]

Builds the demo's synthetic world and shards once (cached in --work), pretrains encoder variants (the demo's
architecture; cached), and on grounded meta-val episodes (questions carved from the meta-train side, never
meta-test) of single-verify and single-choose prints exact match with its 95 % bootstrap interval for
`encoder_prototype` (nearest class mean of the pooled features inside the episode), `text_lookup` and
`support_majority`. Variants:
  contrastive-150   the demo's encoder (CMSC-style InfoNCE, 150 steps)
  contrastive-600   the same objective, 4x longer
  supervised-150    multi-label BCE on the SCP statements of the train split, minus every statement a
                    meta-val or meta-test question asks about (so nothing evaluated here is a label)
An encoder whose prototypes stay near the text controls' 0.5 gives the mapper nothing to read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecgray.config import load_config  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
TYPES = ["single-verify", "single-choose"]


def held_out_codes(samples, episodes_cfg) -> list[str]:
    """SCP codes whose ECG-QA names appear in the attributes of meta-val or meta-test questions."""
    from ecgray.data.episodes import build_classes, split_classes
    from ecgray.synth import vocab

    by_name = {}
    for table in (vocab.QA_DIAGNOSTIC, vocab.QA_FORM, vocab.QA_RHYTHM):
        by_name.update({name: code for code, name in table.items()})
    names = set()
    for qt in TYPES:
        cfg = dataclasses.replace(episodes_cfg, question_type=qt)
        sides = split_classes(build_classes(samples, qt, cfg), cfg)
        for side in ("meta-val", "meta-test"):
            for groups in sides[side].values():
                for group in groups.values():
                    names.update(a for s in group for a in (s["attribute"] or []))
    return sorted({by_name[n] for n in names if n in by_name})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/bench_grounded_encoder")
    parser.add_argument("--episodes", type=int, default=40)
    args = parser.parse_args()

    import ray
    import torch

    from ecgray.data.episodes import EpisodeSampler
    from ecgray.data.prepare import prepare
    from ecgray.data.shards import ECGStore, read_qa
    from ecgray.eval import baselines as B
    from ecgray.models.ecg_lm import build_model
    from ecgray.synth.world import generate_world
    from ecgray.train.pretrain_encoder import open_prepared, pretrain

    work = Path(args.work).resolve()
    base = load_config(DEMO, ["model.llm=tiny-llama", "model.n_heads=2", "encoder.random_init=true"])
    synth, prepared = work / "synth", work / "prepared"
    if not (synth / "world.json").is_file():
        summary = generate_world(synth, base.synth.patients, base.synth.seed, progress=False)
        (synth / "world.json").write_text(json.dumps(summary, default=str))
    if not (prepared / "report.json").is_file():
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
        data = dataclasses.replace(
            base.data,
            ptbxl_dir=str(synth / "ptbxl"),
            ecgqa_dir=str(synth / "ecgqa"),
            prepared_dir=str(prepared),
        )
        prepare(data, prepared, strict=True)
        ray.shutdown()
    samples = read_qa(prepared, source="ptbxl", variant="template", question_types=TYPES)
    store = ECGStore.open(prepared)
    excluded = held_out_codes(samples, base.episodes)
    variants = {
        "contrastive-150": ["encoder.pretrain_steps=150"],
        "contrastive-600": ["encoder.pretrain_steps=600"],
        "supervised-150": [
            "encoder.pretrain_steps=150", "encoder.pretrain_objective=supervised",
            f"encoder.pretrain_exclude_codes={json.dumps(excluded)}",
        ],
    }  # fmt: skip
    print(f"supervised-150 never sees these {len(excluded)} held-out statements: {', '.join(excluded)}")
    print(f"{'encoder':<17} {'question type':<14} {'method':<18} {'EM [95 % CI]':>22}  (meta-val, grounded)")
    rows = []
    for name, overrides in variants.items():
        cfg = load_config(DEMO, ["model.llm=tiny-llama", "model.n_heads=2", *overrides])
        enc_dir = work / name
        t0 = time.perf_counter()
        if not (enc_dir / "encoder.safetensors").is_file():
            torch.manual_seed(0)
            pretrain(cfg, open_prepared(prepared), enc_dir, device="cpu", progress=False)
        seconds = time.perf_counter() - t0
        cfg.encoder.checkpoint = str(enc_dir / "encoder.safetensors")
        model = build_model(cfg, "cpu")
        cache: dict = {}
        for qt in TYPES:
            qcfg = dataclasses.replace(cfg, episodes=dataclasses.replace(cfg.episodes, question_type=qt))
            episodes = EpisodeSampler(samples, qcfg.episodes, "meta-val", seed=0).episodes(args.episodes)
            for method in ("encoder_prototype", "text_lookup", "support_majority"):
                result = getattr(B, method)(model, episodes, store, qcfg, feature_cache=cache)
                em = result["summary"][qt]["exact_match"][-1]
                print(f"{name:<17} {qt:<14} {method:<18} {em['mean']:.3f} [{em['lo']:.3f}, {em['hi']:.3f}]")
                rows.append(
                    {"encoder": name, "question_type": qt, "method": method, **em, "pretrain_s": seconds}
                )
    (work / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
