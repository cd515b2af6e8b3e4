"""`ecgray pretrain-encoder`: pretrain the built-in ECG encoder on prepared shards, then linear-probe it.

Recipe: setup (config, seed, data) -> train -> save -> probe.
  - contrastive (default, no labels): CMSC-style. Each record's window is cut into two adjacent segments of
    T/2 samples; each segment gets its own augmentation (Gaussian noise, random missing leads); the two
    segments of one record are positives, every other record in the batch a negative (symmetric InfoNCE on
    a projection head that is thrown away afterwards).
  - supervised: multi-label BCE on the scp_codes of train-split ECGs (codes in
    encoder.pretrain_exclude_codes, e.g. the statements of meta-test classes, are never used).
Only ECGs of the prepared `train` split are trained on. Plain torch on CPU or GPU.

Writes into --out: encoder.safetensors, config.yaml (+ versions.json; encoder.checkpoint points at the new
file), loss_log.jsonl, probe.json (logistic regression on frozen pooled features of train ECGs, scored on
test ECGs, against the same architecture at random init).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ecgray.config import Config, EncoderConfig
from ecgray.models.encoder import ECGEncoder, freeze, input_fits, input_spec, save_encoder


@dataclass
class PretrainData:
    """What pretraining reads: per-ECG split and metadata, and signal / lead-mask accessors by id."""

    ecg_ids: np.ndarray
    """(n,) int64, every ECG."""
    split: np.ndarray
    """(n,) str: train / valid / test (ECG-QA's patient-disjoint split of the ECG)."""
    metadata: list[dict]
    """Per ECG: scp_codes (code -> likelihood), heart_axis, ..."""
    signals: Callable[[Sequence[int]], np.ndarray]
    """ids -> float32 (B, 12, T) in mV."""
    lead_mask: Callable[[Sequence[int]], np.ndarray]
    """ids -> bool (B, 12)."""
    fs: int
    """Sampling rate of the signals (Hz)."""

    def ids_of(self, split: str) -> np.ndarray:
        return self.ecg_ids[self.split == split]


def read_ecg_table(prepared_dir: str | Path) -> tuple[np.ndarray, np.ndarray, list[dict], np.ndarray]:
    """(ecg_ids, split, metadata dicts, fs) from the ecgs/*.parquet shards (signals are not read)."""
    import pyarrow.parquet as pq

    from ecgray import storage

    files = storage.list_files(storage.join(str(prepared_dir), "ecgs"), ".parquet")
    if not files:
        raise FileNotFoundError(
            f"prepared dir {prepared_dir}: no ecgs/*.parquet (run `ecgray prepare` first)"
        )
    filesystem, _ = storage.filesystem(str(prepared_dir))
    columns = ["ecg_id", "split", "metadata", "fs"]
    ids, splits, meta, fs = [], [], [], []
    for f in files:
        names = pq.read_schema(filesystem.open_input_file(f)).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{f}: missing column(s) {missing}; expected {columns} (prepared-shards format)")
        table = pq.read_table(f, columns=columns, filesystem=filesystem)
        table = table.select(columns).to_pydict()
        ids += table["ecg_id"]
        splits += table["split"]
        fs += table["fs"]
        for ecg_id, raw in zip(table["ecg_id"], table["metadata"], strict=True):
            try:
                meta.append(json.loads(raw) if raw else {})
            except json.JSONDecodeError as err:
                raise ValueError(f"{f}: ECG {ecg_id}: metadata is not valid JSON ({err})") from None
    return np.asarray(ids, dtype=np.int64), np.asarray(splits, dtype=object), meta, np.asarray(fs)


def open_prepared(prepared_dir: str | Path) -> PretrainData:
    """PretrainData over `ecgray prepare` output: signals through ECGStore, labels from the ecgs Parquet."""
    from ecgray.data.shards import ECGStore

    ecg_ids, split, metadata, fs = read_ecg_table(prepared_dir)
    rates = sorted({int(r) for r in fs})
    if len(rates) != 1:
        raise ValueError(f"prepared dir {prepared_dir}: ECGs at several sampling rates {rates}; expected one")
    store = ECGStore.load(prepared_dir)  # every signal in memory: training draws random batches of them
    return PretrainData(ecg_ids, split, metadata, store.signals, store.lead_mask, rates[0])


# ----------------------------------------------------------------------------------------------- training


def cmsc_views(
    x: torch.Tensor, mask: torch.Tensor, cfg: EncoderConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two adjacent segments of each record, each augmented on its own. x (B, 12, T), mask (B, 12) ->
    (view_a (B, 12, S), mask_a, view_b (B, 12, S), mask_b), S = T // 2 rounded down to a multiple of patch."""
    seg = (x.shape[-1] // 2) // cfg.patch * cfg.patch
    if seg < cfg.patch:
        raise ValueError(
            f"ECG window of T={x.shape[-1]} samples is too short for two segments of encoder.patch={cfg.patch}"
        )
    views = []
    for part in (x[..., :seg], x[..., seg : 2 * seg]):
        views += list(augment(part, mask, gen, cfg.pretrain_lead_dropout, cfg.pretrain_noise))
    return views[0], views[1], views[2], views[3]


def augment(
    x: torch.Tensor, mask: torch.Tensor, gen: torch.Generator, p_drop: float, noise: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian noise (noise x the record's std) and random missing leads (each present lead dropped with
    p_drop, at least one lead kept), so the encoder learns to cope with limited-lead inputs."""
    std = x.std(dim=(1, 2), keepdim=True)
    x = x + noise * std * torch.randn(x.shape, generator=gen, device=x.device)
    keep = torch.rand(mask.shape, generator=gen, device=x.device) >= p_drop
    new_mask = mask & keep
    # records that lost every lead keep their original mask
    empty = ~new_mask.any(dim=1)
    new_mask[empty] = mask[empty]
    return x, new_mask


def info_nce(za: torch.Tensor, zb: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of za and zb are positives, all other rows negatives. za, zb (B, d)."""
    za, zb = F.normalize(za, dim=-1), F.normalize(zb, dim=-1)
    logits = za @ zb.T / temperature  # (B, B)
    target = torch.arange(za.shape[0], device=za.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def scp_label_space(data: PretrainData, exclude: Sequence[str], min_count: int = 2) -> list[str]:
    """SCP codes present in >= min_count train-split ECGs, minus the excluded ones (sorted)."""
    counts: dict[str, int] = {}
    for meta, split in zip(data.metadata, data.split, strict=True):
        if split == "train":
            for code in scp_codes_of(meta):
                counts[code] = counts.get(code, 0) + 1
    return sorted(c for c, n in counts.items() if n >= min_count and c not in set(exclude))


def scp_codes_of(meta: dict) -> list[str]:
    """The statement codes of one ECG (a likelihood of 0 is still a valid statement in PTB-XL)."""
    codes = meta.get("scp_codes") or {}
    if isinstance(codes, str):  # a Python-literal dict as in ptbxl_database.csv
        import ast

        codes = ast.literal_eval(codes)
    return list(codes)


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over 5 % of the steps, then cosine decay to 0."""
    warmup = max(1, int(0.05 * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def pretrain(
    cfg: Config,
    data: PretrainData,
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """Train an encoder per cfg.encoder on the train-split ECGs of `data`; write the artefacts into out_dir.
    Returns {"losses": [...], "checkpoint": path, "probe": report}."""
    enc_cfg = cfg.encoder
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if enc_cfg.kind != "conv_transformer":
        raise ValueError(
            f"encoder.kind={enc_cfg.kind}: `ecgray pretrain-encoder` trains the built-in conv_transformer; a "
            f"wav2vec2_ecg encoder is loaded from external weights (e.g. ECG-FM's): convert a fairseq "
            f"checkpoint once with `ecgray convert-encoder IN.pt OUT.safetensors`"
        )
    train_ids = data.ids_of("train")
    if len(train_ids) < 2:
        raise ValueError(f"pretraining needs >= 2 train-split ECGs, found {len(train_ids)}")
    window_s = np.asarray(data.signals(train_ids[:1])).shape[-1] / data.fs
    if not input_fits(enc_cfg, data.fs, window_s):
        raise ValueError(
            f"encoder expects {input_spec(enc_cfg)} (encoder.fs, encoder.window_s); the ECGs are "
            f"{data.fs} Hz, {float(window_s)} s windows"
        )
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    encoder = ECGEncoder(enc_cfg).to(device)
    if enc_cfg.pretrain_objective == "contrastive":
        head: nn.Module = nn.Sequential(
            nn.Linear(enc_cfg.d_enc, enc_cfg.d_enc), nn.GELU(), nn.Linear(enc_cfg.d_enc, 128)
        )
        codes: list[str] = []
    else:
        codes = scp_label_space(data, enc_cfg.pretrain_exclude_codes)
        if not codes:
            raise ValueError("supervised pretraining: no scp_codes found in the train-split ECGs' metadata")
        head = nn.Linear(enc_cfg.d_enc, len(codes))
        code_index = {c: i for i, c in enumerate(codes)}
        id_to_row = {int(e): i for i, e in enumerate(data.ecg_ids)}
    head = head.to(device)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=enc_cfg.pretrain_lr, weight_decay=enc_cfg.pretrain_weight_decay)

    batch_size = min(enc_cfg.pretrain_batch_size, len(train_ids))
    order = rng.permutation(train_ids)
    cursor = 0
    losses = []
    from ecgray.logs import progress as progress_bar

    bar = progress_bar(
        range(enc_cfg.pretrain_steps),
        desc=f"pretrain-encoder ({enc_cfg.pretrain_objective})",
        disable=not progress,
    )
    encoder.train()
    head.train()
    t0 = time.perf_counter()
    with open(out_dir / "loss_log.jsonl", "w") as log:
        for step in bar:
            if cursor + batch_size > len(order):  # new epoch
                order, cursor = rng.permutation(train_ids), 0
            ids = order[cursor : cursor + batch_size]
            cursor += batch_size
            x = torch.from_numpy(np.asarray(data.signals(ids), dtype=np.float32)).to(device)
            mask = torch.from_numpy(np.asarray(data.lead_mask(ids), dtype=bool)).to(device)
            if enc_cfg.pretrain_objective == "contrastive":
                xa, ma, xb, mb = cmsc_views(x, mask, enc_cfg, gen)
                loss = info_nce(
                    head(encoder(xa, ma)[1]), head(encoder(xb, mb)[1]), enc_cfg.pretrain_temperature
                )
            else:
                target = torch.zeros(len(ids), len(codes), device=device)
                for i, ecg_id in enumerate(ids):
                    for code in scp_codes_of(data.metadata[id_to_row[int(ecg_id)]]):
                        if code in code_index:
                            target[i, code_index[code]] = 1.0
                xa, ma = augment(x, mask, gen, enc_cfg.pretrain_lead_dropout, enc_cfg.pretrain_noise)
                loss = F.binary_cross_entropy_with_logits(head(encoder(xa, ma)[1]), target)
            lr = lr_at(step, enc_cfg.pretrain_steps, enc_cfg.pretrain_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"pretraining loss became {value} at step {step} (lr {lr:.2e})")
            losses.append(value)
            log.write(json.dumps({"step": step, "loss": value, "lr": lr}) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{value:.4f}")
    train_s = time.perf_counter() - t0

    ckpt = save_encoder(
        encoder,
        out_dir / "encoder.safetensors",
        extra_metadata={
            "objective": enc_cfg.pretrain_objective,
            "steps": enc_cfg.pretrain_steps,
            "final_loss": losses[-1] if losses else None,
            "seed": cfg.seed,
            "labels": codes,
        },
    )
    freeze(encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        random_encoder = freeze(ECGEncoder(enc_cfg).to(device))
    probe = linear_probe_report(encoder, random_encoder, data, enc_cfg.probe_labels, device, seed=cfg.seed)
    probe.update(
        {
            "objective": enc_cfg.pretrain_objective,
            "steps": enc_cfg.pretrain_steps,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "train_seconds": round(train_s, 2),
        }
    )
    (out_dir / "probe.json").write_text(json.dumps(probe, indent=2))
    return {"losses": losses, "checkpoint": ckpt, "probe": probe}


# ---------------------------------------------------------------------------------------------- probing


@torch.inference_mode()
def pooled_features(
    encoder: ECGEncoder, data: PretrainData, ids: np.ndarray, device, batch_size: int = 64
) -> np.ndarray:
    """Frozen pooled features (n, D_enc) of the ECGs `ids`."""
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        x = torch.from_numpy(np.asarray(data.signals(chunk), dtype=np.float32)).to(device)
        mask = torch.from_numpy(np.asarray(data.lead_mask(chunk), dtype=bool)).to(device)
        out.append(encoder(x, mask)[1].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.d_enc), np.float32)


def probe_targets(data: PretrainData, label: str) -> tuple[np.ndarray, list[str]]:
    """Per-ECG class index for one probe label (-1: unknown), and the class names.
    An scp code -> [absent, present]; `heart_axis` -> the axis values seen."""
    if label == "heart_axis":
        values = [m.get("heart_axis") for m in data.metadata]
        classes = sorted({v for v in values if isinstance(v, str) and v})
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index.get(v, -1) if isinstance(v, str) else -1 for v in values]), classes
    return np.array([int(label in scp_codes_of(m)) for m in data.metadata]), ["absent", "present"]


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = 1e-2, seed: int = 0) -> Callable:
    """Class-balanced multinomial logistic regression (full-batch L-BFGS) on standardised features;
    returns predict_proba(x) -> (n, n_classes)."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy((x - mean) / std).double()
    yt = torch.from_numpy(y).long()
    counts = torch.bincount(yt, minlength=n_classes).double().clamp_min(1.0)
    weight = counts.sum() / (n_classes * counts)
    torch.manual_seed(seed)
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w + b, yt, weight=weight) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_, b_ = w.detach(), b.detach()

    def predict_proba(xs: np.ndarray) -> np.ndarray:
        z = torch.from_numpy((xs - mean) / std).double() @ w_ + b_
        return torch.softmax(z, -1).numpy()

    return predict_proba


def auroc(y: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve (rank formulation, ties averaged); None when only one class is present."""
    from scipy.stats import rankdata

    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    if pos == 0 or neg == 0:
        return None
    ranks = rankdata(score)
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def linear_probe_report(
    encoder: ECGEncoder, random_encoder: ECGEncoder, data: PretrainData, labels: Sequence[str], device, seed=0
) -> dict:
    """Logistic regression on frozen pooled features of train ECGs, scored on test ECGs (valid ECGs when
    the prepared data has no test split), for the pretrained and a random-init encoder."""
    train_rows = np.flatnonzero(data.split == "train")
    test_split = "test" if (data.split == "test").any() else "valid"
    test_rows = np.flatnonzero(data.split == test_split)
    report: dict = {
        "train_ecgs": int(len(train_rows)),
        "test_split": test_split,
        "test_ecgs": int(len(test_rows)),
        "labels": {},
    }
    if not labels:
        report["skipped"] = "encoder.probe_labels is empty"
        return report
    if len(test_rows) == 0:
        report["skipped"] = "no test or valid ECGs to score the probe on"
        return report
    feats = {
        name: (
            pooled_features(enc, data, data.ecg_ids[train_rows], device),
            pooled_features(enc, data, data.ecg_ids[test_rows], device),
        )
        for name, enc in (("pretrained", encoder), ("random_init", random_encoder))
    }
    for label in labels:
        y_all, classes = probe_targets(data, label)
        tr, te = y_all[train_rows], y_all[test_rows]
        known_tr, known_te = tr >= 0, te >= 0
        present = sorted(set(tr[known_tr].tolist()))
        entry: dict = {
            "classes": classes,
            "train_counts": np.bincount(tr[known_tr], minlength=len(classes)).tolist(),
            "test_counts": np.bincount(te[known_te], minlength=len(classes)).tolist(),
        }
        if len(present) < 2 or known_te.sum() == 0:
            entry["skipped"] = "fewer than 2 classes among the train ECGs, or no labelled test ECGs"
            report["labels"][label] = entry
            continue
        for name, (f_tr, f_te) in feats.items():
            proba = fit_logistic(f_tr[known_tr], tr[known_tr], len(classes), seed=seed)(f_te[known_te])
            pred, y = proba.argmax(1), te[known_te]
            recalls = [float((pred[y == c] == c).mean()) for c in np.unique(y)]
            result = {"accuracy": float((pred == y).mean()), "balanced_accuracy": float(np.mean(recalls))}
            if len(classes) == 2:
                result["auroc"] = auroc(y, proba[:, 1])
            entry[name] = result
        report["labels"][label] = entry
    return report


# ------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ecgray.cli import add_config_arguments

    parser.add_argument(
        "--data", required=True, help="prepared dir written by `ecgray prepare` (ecgs/*.parquet)"
    )
    parser.add_argument(
        "--out", required=True, help="output dir: encoder.safetensors, config.yaml, probe.json"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ecgray import storage
    from ecgray.cli import config_from_args
    from ecgray.config import save_config

    cfg = config_from_args(args)
    data_dir, target = storage.resolve(args.data), storage.resolve(args.out)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # a URI output is written here first and uploaded at the end
    out = Path(tempfile.mkdtemp(prefix="ecgray-encoder-")) if storage.is_uri(target) else Path(target)
    try:
        data = open_prepared(data_dir)
        result = pretrain(cfg, data, out, device=device, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as err:
        print(f"ecgray pretrain-encoder: {err}", file=sys.stderr)
        return 2
    checkpoint = storage.join(target, Path(result["checkpoint"]).name)
    resolved = replace(cfg, encoder=replace(cfg.encoder, checkpoint=checkpoint))
    resolved = replace(resolved, data=replace(resolved.data, prepared_dir=data_dir))
    save_config(resolved, out)
    if storage.is_uri(target):
        storage.upload_dir(out, target)
        shutil.rmtree(out)
    summary = {
        "checkpoint": checkpoint,
        "first_loss": result["probe"]["first_loss"],
        "final_loss": result["probe"]["final_loss"],
        "probe": storage.join(target, "probe.json"),
    }
    print(json.dumps(summary))
    return 0
