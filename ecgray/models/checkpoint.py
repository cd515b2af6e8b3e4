"""Checkpoints of the trainable parts: `mapper.safetensors` + the resolved `config.yaml` + `metrics.json` +
`splits.json` (the meta-train / meta-val / meta-test class keys per question type the run was trained on, so
evaluation can refuse data that splits differently).

No pickle anywhere: tensors in safetensors, config as YAML validated back into a typed `Config`, metrics as
JSON. Written into a temporary sibling directory and renamed into place, so a reader never sees half a
checkpoint (a crash leaves the previous one intact).
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


def load_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], Config]:
    """(mapper state, typed Config) from a checkpoint directory; nothing is unpickled."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (MAPPER_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint {directory}: {name} is missing")
    return load_file(str(directory / MAPPER_FILE)), load_checkpoint_config(directory)


def load_checkpoint_config(directory: str | Path) -> Config:
    """The typed Config a checkpoint was trained with (its config.yaml), without reading the tensors."""
    import yaml

    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {directory}: {CONFIG_FILE} is missing")
    try:
        tree = yaml.safe_load((directory / CONFIG_FILE).read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"checkpoint {directory}/{CONFIG_FILE}: not valid YAML ({err})") from None
    try:
        cfg = from_dict(tree or {})
    except ConfigError as err:
        raise ConfigError(f"checkpoint {directory}/{CONFIG_FILE}: {err}") from None
    return cfg


def load_splits(directory: str | Path) -> dict | None:
    """The stored split keys ({question type: {side: [class keys]}}), or None for a checkpoint without them."""
    path = Path(directory) / SPLITS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def load_metrics(directory: str | Path) -> dict:
    path = Path(directory) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_mapper_state(
    mapper: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Copy `state` into `mapper`, strictly: missing / unexpected names and shape mismatches are named."""
    own = mapper.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
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
