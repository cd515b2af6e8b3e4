"""The adapter store: adapted fast weights by adapter id, in a directory or under a URI any replica reads.

`/v1/adapt` runs the inner loop once and writes `<store>/<adapter id>.safetensors`; an answer replica that
gets a request for that id loads it (through Ray Serve model multiplexing, so later requests for it are
routed to replicas that already hold it). Locations resolve through pyarrow's filesystems: a local path,
`file://`, `s3://`, `gs://`, `hdfs://`. The files are safetensors (tensors + a string metadata map; nothing
is unpickled); the metadata names the model the weights were adapted for, checked on every load.
"""

from __future__ import annotations

import json
import re
import struct
import uuid
from pathlib import Path

import torch

ADAPTER_ID = re.compile(r"^ad-[0-9a-f]{32}$")
MODEL_KEY = "ecgray.model_id"


class AdapterNotFound(KeyError):
    """No adapter of that id in the store."""


def resolve_location(location: str) -> str:
    """A local path made absolute (once, where the service starts); URIs unchanged."""
    if "://" in location:
        return location
    return str(Path(location).expanduser().resolve())


class AdapterStore:
    """Adapters as `<location>/<adapter id>.safetensors` on a pyarrow filesystem."""

    def __init__(self, location: str):
        from pyarrow import fs

        self.location = location
        try:
            self.fs, root = fs.FileSystem.from_uri(location)
        except (ValueError, TypeError):  # a plain local path
            self.fs, root = fs.LocalFileSystem(), resolve_location(location)
        except OSError as err:
            raise ValueError(f"serve.adapter_store={location}: cannot open this location ({err})") from None
        self.root = root.rstrip("/")
        try:
            self.fs.create_dir(self.root, recursive=True)
        except OSError as err:
            raise ValueError(f"serve.adapter_store={location}: cannot create it ({err})") from None

    def _path(self, adapter_id: str) -> str:
        if not ADAPTER_ID.match(adapter_id):  # also what keeps ids from naming other paths
            raise ValueError(f"adapter id {adapter_id!r}: expected 'ad-' and 32 hex digits")
        return f"{self.root}/{adapter_id}.safetensors"

    def exists(self, adapter_id: str) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(self._path(adapter_id)).type == fs.FileType.File

    def save(self, adapter_id: str, fast_weights: dict[str, torch.Tensor], model_id: str) -> None:
        """Write the fast weights; readers never see a partial file (written aside, then moved)."""
        from safetensors.torch import save

        data = save(
            {k: v.detach().contiguous().cpu() for k, v in fast_weights.items()}, {MODEL_KEY: model_id}
        )
        final = self._path(adapter_id)
        tmp = f"{final}.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, final)

    def load(self, adapter_id: str, model_id: str) -> dict[str, torch.Tensor]:
        """The fast weights of `adapter_id`; AdapterNotFound when absent, ValueError when they belong to
        another model (checkpoint or inner-loop settings)."""
        from safetensors.torch import load

        path = self._path(adapter_id)
        try:
            with self.fs.open_input_stream(path) as f:
                data = f.read()
        except FileNotFoundError:
            raise AdapterNotFound(adapter_id) from None
        weights = load(data)
        (n,) = struct.unpack("<Q", data[:8])  # safetensors: 8-byte header length, then the JSON header
        stored = json.loads(data[8 : 8 + n]).get("__metadata__", {}).get(MODEL_KEY)
        if stored != model_id:
            raise ValueError(
                f"adapter {adapter_id} in {self.location} was adapted for model {stored!r}, "
                f"not this service's {model_id!r}"
            )
        return weights
