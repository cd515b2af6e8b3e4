"""Checkpoints of the trainable parts: `mapper.safetensors` + the resolved `config.yaml` + `metrics.json` +
`splits.json` (the meta-train / meta-val / meta-test class keys per question type the run was trained on, so
evaluation can refuse data that splits differently).

No pickle anywhere: tensors in safetensors, config as YAML validated back into a typed `Config`, metrics as
JSON. Written into a temporary sibling directory and renamed into place, so a reader never sees half a
checkpoint (a crash leaves the previous one intact). Read from a directory or a URI (`ecgray.storage`);
a checkpoint saved to a URI is written locally first and uploaded (config and mapper last-written files
are read only when complete: the mapper file is uploaded after the others).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ecgray.config import Config, ConfigError, from_dict, to_dict

MAPPER_FILE = "mapper.safetensors"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
SPLITS_FILE = "splits.json"


def save_checkpoint(
    directory: str | Path,
    mapper_state: dict[str, torch.Tensor],
    cfg: Config,
    metrics: dict | None = None,
    splits: dict | None = None,
) -> Path:
    """Write the checkpoint atomically (temp dir + rename); an existing checkpoint at `directory` is replaced.
    splits: `ecgray.data.episodes.split_keys` of the training data (None: not recorded)."""
    import yaml
    from safetensors.torch import save_file

    from ecgray import storage

    if storage.is_uri(directory):
        with tempfile.TemporaryDirectory(prefix="ecgray-checkpoint-") as tmp:
            local = save_checkpoint(Path(tmp) / "checkpoint", mapper_state, cfg, metrics, splits)
            for name in sorted(p.name for p in local.iterdir() if p.name != MAPPER_FILE) + [MAPPER_FILE]:
                storage.write_bytes(storage.join(str(directory), name), (local / name).read_bytes())
        return directory
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    bad = [k for k, v in mapper_state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"save_checkpoint: mapper_state entries {bad} are not tensors")
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in mapper_state.items()}
        save_file(tensors, str(tmp / MAPPER_FILE), metadata={"format": "ecgray-mapper"})
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (tmp / METRICS_FILE).write_text(json.dumps(metrics or {}, indent=2, default=float))
        if splits is not None:
            (tmp / SPLITS_FILE).write_text(json.dumps(splits, indent=1))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _read(directory: str | Path, name: str, required: bool = True) -> bytes | None:
    """A checkpoint file's bytes from a directory or URI; a missing required file is named."""
    from ecgray import storage

    location = storage.join(str(directory), name)
    if not storage.is_file(location):
        if required:
            raise FileNotFoundError(f"checkpoint {directory}: {name} is missing")
        return None
    return storage.read_bytes(location)


def resolve_checkpoint(location: str | Path) -> str:
    """A checkpoint directory (or URI) as given, or, for a run directory (`train.storage_path/train.name`,
    which holds Ray Train's `checkpoint_*` folders), its checkpoint of the highest step. Neither: an error
    naming what was found."""
    from ecgray import storage

    location = str(location)
    if storage.is_file(storage.join(location, MAPPER_FILE)):
        return location
    steps = {}
    for name in storage.list_names(location):
        if name.startswith("checkpoint_"):
            candidate = storage.join(location, name)
            raw = _read(candidate, "train_state.json", required=False)
            if raw is not None and storage.is_file(storage.join(candidate, MAPPER_FILE)):
                steps[name] = (int(json.loads(raw).get("step", -1)), name)
    if not steps:
        found = storage.list_names(location)[:8]
        raise FileNotFoundError(
            f"checkpoint {location}: no {MAPPER_FILE}, and no checkpoint_* folder of a run in it "
            f"(found {found or 'nothing'}); give a checkpoint directory or a run directory "
            "(train.storage_path/train.name)"
        )
    return storage.join(location, max(steps.values())[1])


def load_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], Config]:
    """(mapper state, typed Config) from a checkpoint directory or URI; nothing is unpickled."""
    from safetensors.torch import load

    raw = _read(directory, MAPPER_FILE)
    return load(raw), load_checkpoint_config(directory)


def load_checkpoint_config(directory: str | Path) -> Config:
    """The typed Config a checkpoint was trained with (its config.yaml), without reading the tensors."""
    import yaml

    text = _read(directory, CONFIG_FILE).decode()
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"checkpoint {directory}/{CONFIG_FILE}: not valid YAML ({err})") from None
    try:
        cfg = from_dict(tree or {})
    except ConfigError as err:
        raise ConfigError(f"checkpoint {directory}/{CONFIG_FILE}: {err}") from None
    return cfg


def load_splits(directory: str | Path) -> dict | None:
    """The stored split keys ({question type: {side: [class keys]}}), or None for a checkpoint without them."""
    raw = _read(directory, SPLITS_FILE, required=False)
    return None if raw is None else json.loads(raw)


def load_metrics(directory: str | Path) -> dict:
    raw = _read(directory, METRICS_FILE, required=False)
    return {} if raw is None else json.loads(raw)


def load_mapper_state(
    mapper: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Copy `state` into `mapper`, strictly: missing / unexpected names and shape mismatches are named."""
    own = mapper.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    fixed = sorted(set(dict(mapper.named_buffers())) & set(missing))
    if fixed:
        raise ValueError(
            f"{source} has no {fixed}: {type(mapper).__name__} keeps these fixed tensors (statistics of the "
            "meta-train side's features, the LLM's token-embedding norm) with its weights, and they are never "
            "recomputed; this checkpoint was saved without them (parameters only?) and cannot be used"
        )
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]  # fmt: skip
    if missing or unexpected or wrong:
        raise ValueError(
            f"{source} does not fit the mapper ({type(mapper).__name__}): "
            + "; ".join(
                part
                for part in (
                    f"missing {missing}" if missing else "",
                    f"unexpected {unexpected}" if unexpected else "",
                    f"shape mismatch {wrong}" if wrong else "",
                )
                if part
            )
            + " (was it trained with another model.mapper / LLM / encoder width?)"
        )
    mapper.load_state_dict(state, strict=True)
