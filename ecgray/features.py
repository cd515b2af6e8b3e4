"""`ecgray features`: the frozen encoder's outputs for every prepared ECG, computed once with Ray Data and
read back lazily by ecg_id (`FeatureStore`), so training, eval and the demo read features, not signals.

The job: `ray.data.read_parquet(<prepared>/ecgs)` -> `map_batches(EncodeBatch)` over an actor pool (each
actor loads the frozen encoder once, `load_encoder(cfg.encoder, device, seed=cfg.seed)`, one GPU per actor
where the cluster has GPUs, CPUs otherwise: `actor_plan`) -> `write_parquet`. Layout, beside the shards:

    <prepared>/features/<key>/part-*.parquet   ecg_id int64, pooled fixed_size_list<float32>[D_enc],
                                               tokens fixed_size_list<fixed_size_list<float32>[D_enc]>[N]
                                               (tokens only when stored: the qformer mapper reads them)
    <prepared>/features/<key>/features.json    the commit: key, what the key hashes, D_enc, N, n ECGs,
                                               the part files and their rows, versions; written LAST

A folder without features.json is never taken as complete. A local location is written in a hidden staging
folder (`.staging-<key>-<id>`) renamed into place after features.json; a URI (object stores have no
rename) is written in place, part files named by the write's id, and features.json, listing them, is the
commit. Row groups are small (at most 256 rows and ~4 MiB), so reading one ECG decodes little.

The key (`feature_key`) is a hash of everything the features depend on: the encoder's weights (sha256 of
`encoder.checkpoint`'s bytes; with `encoder.random_init`, of the seeded random encoder's state_dict), its
architecture and input fields (`arch_dict`), the prepared ECGs' identity (each `ecgs/` shard's name, size
and Parquet footer, which holds its row counts, column-chunk sizes and statistics: a rewritten shard gets
a new footer), whether tokens are stored and the layout's format version. New data or a new encoder is a
new key, hence a new folder; a folder is never rewritten in place (except by `--rebuild`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath

import numpy as np

from ecgray import storage
from ecgray.config import Config, EncoderConfig

FORMAT = 1
"""Version of the folder layout above; part of the key, so a layout change never reads old folders."""
META_FILE = "features.json"
MAX_GROUP_ROWS = 256
GROUP_BYTES = 4 * 2**20
"""Row groups hold at most MAX_GROUP_ROWS rows and about GROUP_BYTES bytes (tokens: ~13 rows of 100 x 768)."""
FEATURE_COLUMNS = ("ecg_id", "pooled", "tokens")


class StaleFeaturesError(ValueError):
    """A features folder computed for another key than the one asked for."""


def needs_tokens(cfg: Config) -> bool:
    """Whether the run's mapper reads the encoder's tokens (qformer) or only the pooled vector
    (the config-side twin of ecgray.eval.meta_test.needs_tokens)."""
    return cfg.model.mapper == "qformer"


def rebuild_command(cfg: Config | None = None) -> str:
    where = "" if cfg is None else f" --set data.prepared_dir={cfg.data.prepared_dir}"
    return f"ecgray features --config <the run's config>{where}"


# ----------------------------------------------------------------------------------------------- the key


def _sha256_file(location: str) -> str:
    fs, path = storage.filesystem(location)
    digest = hashlib.sha256()
    try:
        with fs.open_input_stream(path) as f:
            while chunk := f.read(16 * 2**20):
                digest.update(chunk)
    except FileNotFoundError:
        raise FileNotFoundError(f"encoder.checkpoint={location}: no such file") from None
    return digest.hexdigest()


def state_sha256(module) -> str:
    """sha256 over a module's state_dict: every tensor's name, dtype, shape and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy())  # the raw bytes, any dtype (bf16 included)
    return digest.hexdigest()


def weights_identity(enc: EncoderConfig, seed: int) -> dict:
    """What the encoder's weights are: the checkpoint file's sha256, or (random_init, no checkpoint) the
    sha256 of the seeded random encoder's state_dict. No weights at all is refused
    (`check_encoder_checkpoint`)."""
    from ecgray.models.encoder import check_encoder_checkpoint, load_encoder

    check_encoder_checkpoint(enc)
    if enc.checkpoint is not None:
        return {"checkpoint_sha256": _sha256_file(enc.checkpoint)}
    return {"random_init_state_sha256": state_sha256(load_encoder(enc, "cpu", seed=seed))}


def data_identity(prepared_dir: str) -> list[dict]:
    """Each `ecgs/` shard's name, size and footer hash (the footer alone is read: a few KB per shard)."""
    folder = storage.join(prepared_dir, "ecgs")
    files = storage.list_files(folder, ".parquet")
    if not files:
        raise FileNotFoundError(f"{folder}: no Parquet shards (run `ecgray prepare` to write ecgs/)")
    fs, _ = storage.filesystem(folder)
    out = []
    for path in files:
        with fs.open_input_file(path) as f:
            size = f.size()
            tail = f.read_at(8, size - 8) if size >= 12 else b""
            if tail[4:] != b"PAR1":
                raise ValueError(f"{path}: not a Parquet file (no PAR1 footer)")
            n = int.from_bytes(tail[:4], "little")
            footer = f.read_at(n, size - 8 - n)
        name = PurePosixPath(path).name
        out.append({"name": name, "bytes": size, "footer_sha256": hashlib.sha256(footer).hexdigest()})
    return out


def key_inputs(cfg: Config, tokens: bool | None = None) -> dict:
    """What the key hashes (stored in features.json, so a stale folder can say what changed)."""
    from ecgray.models.encoder import arch_dict

    return {
        "format": FORMAT,
        "encoder": arch_dict(cfg.encoder),
        "weights": weights_identity(cfg.encoder, cfg.seed),
        "data": data_identity(cfg.data.prepared_dir),
        "tokens": needs_tokens(cfg) if tokens is None else bool(tokens),
    }


def key_of(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def feature_key(cfg: Config, tokens: bool | None = None) -> str:
    """The features' key for a run config (module docstring); tokens None: stored iff the mapper reads them."""
    return key_of(key_inputs(cfg, tokens))


def features_root(cfg: Config) -> str:
    return storage.join(cfg.data.prepared_dir, "features")


def features_folder(cfg: Config, key: str) -> str:
    """Where the features of `key` live (complete or not): <prepared>/features/<key>."""
    return storage.join(features_root(cfg), key)


def features_location(cfg: Config) -> str:
    """The location of the run's complete features (the key of its encoder, data and mapper); missing
    ones raise FileNotFoundError naming `ecgray features`, stale ones StaleFeaturesError."""
    inputs = key_inputs(cfg)
    key = key_of(inputs)
    location = features_folder(cfg, key)
    meta = read_meta(location)
    if meta is None:
        state = "half-written (no features.json)" if storage.is_dir(location) else "not computed"
        raise FileNotFoundError(
            f"{location}: no complete features for key {key} of this encoder and data ({state}); compute "
            f"them with `{rebuild_command(cfg)}`"
        )
    check_key(meta, location, key, inputs, cfg)
    return location


def features_complete(cfg: Config) -> bool:
    """Whether the run's features are computed and committed (stale ones raise, as in features_location)."""
    try:
        features_location(cfg)
    except FileNotFoundError:
        return False
    return True


def read_meta(location: str) -> dict | None:
    """features.json of a features folder, or None when there is none (not computed, or half-written)."""
    path = storage.join(location, META_FILE)
    if not storage.is_file(path):
        return None
    try:
        meta = json.loads(storage.read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    missing = [k for k in ("format", "key", "d_enc", "n_ecgs", "tokens", "files") if k not in meta]
    if missing:
        raise ValueError(f"{path}: not a features.json written by `ecgray features` (no {missing})")
    return meta


def check_key(meta: dict, location: str, key: str, inputs: dict | None = None, cfg: Config | None = None):
    """Refuse features computed for another key, naming both keys, what differs, and the command."""
    if meta["key"] == key:
        return
    differs = ""
    if inputs is not None and isinstance(meta.get("key_inputs"), dict):
        changed = [k for k in inputs if meta["key_inputs"].get(k) != inputs[k]]
        differs = f" (what changed: {', '.join(changed)})" if changed else ""
    raise StaleFeaturesError(
        f"{location}: stale features: computed for key {meta['key']}, but this run's encoder and data give "
        f"key {key}{differs}. Compute the current ones with `{rebuild_command(cfg)}` (writes features/{key})"
    )


# ------------------------------------------------------------------------------------------- the Ray job


@dataclass(frozen=True)
class ActorPlan:
    """How the encoding actors are sized: `actors` actors of `num_cpus` CPUs and `num_gpus` GPUs each, the
    encoder on `device` with `threads` torch threads, `batch_size` ECGs per call."""

    actors: int
    num_cpus: float
    num_gpus: float
    device: str
    threads: int
    batch_size: int


def actor_plan(
    resources: dict, gpu: bool, actors: int | None = None, batch_size: int | None = None
) -> ActorPlan:
    """The actor pool from the cluster's resources (`ray.cluster_resources()`), no config: on GPUs one
    actor per GPU (more actors than GPUs share them); on CPUs one actor per 4 CPUs, one CPU left for the
    read and write tasks, each actor's torch threads = its CPUs."""
    if actors is not None and actors < 1:
        raise ValueError(f"--actors {actors}: expected >= 1")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: expected >= 1")
    if gpu:
        gpus = float(resources.get("GPU", 0))
        if gpus < 1:
            raise ValueError(
                f"GPU encoding asked for, but the Ray cluster has no GPU (resources {resources})"
            )
        n = actors or int(gpus)
        return ActorPlan(n, 1.0, min(1.0, gpus / n), "cuda", 1, batch_size or 256)
    free = max(1, int(resources.get("CPU", 1)) - 1)
    n = actors or max(1, free // 4)
    per = free / n if n > free else float(free // n)
    return ActorPlan(n, per, 0.0, "cpu", max(1, int(per)), batch_size or 32)


class EncodeBatch:
    """The map_batches callable: a pyarrow batch of `ecgs/` rows (ecg_id, signal, lead_mask) -> a pyarrow
    table of features. Built once per actor from the run config (a dict) with the frozen encoder on it."""

    def __init__(self, cfg: dict, tokens: bool, device: str, threads: int):
        import torch

        from ecgray.config import from_dict
        from ecgray.models.encoder import load_encoder

        run = from_dict(cfg)
        if device == "cpu":
            torch.set_num_threads(threads)
        self.device, self.tokens = device, tokens
        self.encoder = load_encoder(run.encoder, device, seed=run.seed)

    def __call__(self, batch):
        import pyarrow as pa
        import torch

        from ecgray.data.shards import signals_from_arrow

        signals = signals_from_arrow(batch.column("signal"))  # (B, 12, T)
        if not signals.flags.writeable:  # a view of Arrow's buffer: torch wants its own memory
            signals = signals.copy()
        mask = batch.column("lead_mask").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        mask = mask.astype(bool).reshape(-1, 12)  # (B, 12)
        # what ECGLanguageModel.encode does: the frozen encoder under no_grad on (signals, lead_mask)
        with torch.no_grad():
            tokens, pooled = self.encoder(
                torch.from_numpy(signals).to(self.device), torch.from_numpy(mask).to(self.device)
            )  # (B, N, D_enc), (B, D_enc)
        pooled = pooled.float().cpu().numpy()
        columns = {"ecg_id": batch.column("ecg_id").cast(pa.int64()), "pooled": _fixed(pooled)}
        if self.tokens:
            columns["tokens"] = _fixed(tokens.float().cpu().numpy())
        return pa.table(columns)


def _fixed(values: np.ndarray):
    """float32 (B, *shape) -> nested fixed_size_list array of B rows."""
    import pyarrow as pa

    out = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
    for size in reversed(values.shape[1:]):
        out = pa.FixedSizeListArray.from_arrays(out, size)
    return out


def feature_schema(d_enc: int, n_tokens: int, tokens: bool):
    import pyarrow as pa

    fields = [("ecg_id", pa.int64()), ("pooled", pa.list_(pa.float32(), d_enc))]
    if tokens:
        fields.append(("tokens", pa.list_(pa.list_(pa.float32(), d_enc), n_tokens)))
    return pa.schema(fields)


def output_shape(enc: EncoderConfig, n_samples: int) -> tuple[int, int]:
    """(N tokens, D_enc) the encoder gives for windows of n_samples, from a forward on the meta device
    (shapes only: no weights, no compute)."""
    import torch

    from ecgray.models.encoder import build_encoder

    with torch.device("meta"):
        tokens, pooled = build_encoder(enc)(
            torch.zeros(1, 12, n_samples), torch.ones(1, 12, dtype=torch.bool)
        )  # (1, N, D_enc), (1, D_enc)
    return int(tokens.shape[1]), int(pooled.shape[1])


def _part_files():
    """A FilenameProvider naming the parts part-<write id>-<task>-<i>.parquet."""
    from ray.data.datasource import FilenameProvider

    class PartFiles(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{write_uuid}-{task_index:06d}"

    return PartFiles()


def _input_files(prepared_dir: str) -> tuple[object, list[str], int, np.ndarray]:
    """(filesystem, shard paths, samples per window, every ecg_id) of the prepared ECGs."""
    import pyarrow.parquet as pq

    folder = storage.join(prepared_dir, "ecgs")
    fs, _ = storage.filesystem(folder)
    files = storage.list_files(folder, ".parquet")
    if not files:
        raise FileNotFoundError(f"{folder}: no Parquet shards (run `ecgray prepare` to write ecgs/)")
    lengths = {pq.read_schema(fs.open_input_file(p)).field("signal").type.value_type.list_size for p in files}
    if len(lengths) != 1:
        raise ValueError(f"{folder}: shards hold windows of different lengths {sorted(lengths)}")
    ids = pq.read_table(files, columns=["ecg_id"], filesystem=fs).column("ecg_id").to_numpy()
    return fs, files, lengths.pop(), ids.astype(np.int64)


def _gpu_wanted(cfg: Config, resources: dict) -> bool:
    """GPU actors when the run asks for a GPU (device=cuda, or train.use_gpu) or the cluster has GPUs."""
    if cfg.device == "cpu":
        return False
    if cfg.device == "cuda" or cfg.train.use_gpu:
        return True
    return float(resources.get("GPU", 0)) >= 1


def compute_features(
    cfg: Config,
    progress: bool = True,
    tokens: bool | None = None,
    actors: int | None = None,
    batch_size: int | None = None,
    rebuild: bool = False,
) -> dict:
    """The frozen encoder's features of every ECG of `cfg.data.prepared_dir` (a path or URI) at
    `<prepared>/features/<key>` (module docstring); returns the report (features.json's fields, plus
    `location` and `computed`: False when complete features for the key were already there, which are then
    reused as they are unless `rebuild`). tokens None: stored iff the mapper reads them. actors /
    batch_size None: `actor_plan`. Starts a local Ray unless one is running."""
    import pyarrow.parquet as pq
    import ray

    from ecgray.config import to_dict, versions
    from ecgray.data.prepare import ensure_ray
    from ecgray.data.shards import ShardRows
    from ecgray.models.ecg_lm import check_data_fits_encoder

    t0 = time.perf_counter()
    check_data_fits_encoder(cfg)
    inputs = key_inputs(cfg, tokens)
    tokens, key = inputs["tokens"], key_of(inputs)
    location = features_folder(cfg, key)
    t_key = time.perf_counter() - t0
    meta = read_meta(location)
    if meta is not None and not rebuild:
        check_key(meta, location, key, inputs, cfg)
        return {**meta, "location": location, "computed": False}

    fs, in_files, n_samples, in_ids = _input_files(cfg.data.prepared_dir)
    n_tokens, d_enc = output_shape(cfg.encoder, n_samples)
    bytes_per_row = 8 + 4 * d_enc * (1 + (n_tokens if tokens else 0))
    group_rows = max(1, min(MAX_GROUP_ROWS, GROUP_BYTES // bytes_per_row))

    ensure_ray()
    plan = actor_plan(ray.cluster_resources(), _gpu_wanted(cfg, ray.cluster_resources()), actors, batch_size)
    local = not storage.is_uri(location)
    write_id = uuid.uuid4().hex[:8]
    target = storage.join(features_root(cfg), f".staging-{key}-{write_id}") if local else location
    if not local and storage.exists(location):
        storage.delete_dir(location)  # no features.json (or rebuild): an interrupted write's remains
    out_fs, target_path = storage.filesystem(target)
    ctx = ray.data.DataContext.get_current()
    old_bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = old_bars and progress  # quiet_frameworks may have turned them off
    if progress:
        print(
            f"features: encoding {len(in_ids):,} ECGs ({plan.actors} x {plan.device} actor"
            f"{'s' if plan.actors > 1 else ''}) -> {location}",
            file=sys.stderr, flush=True,
        )  # fmt: skip
    t1 = time.perf_counter()
    try:
        ds = ray.data.read_parquet(
            in_files, filesystem=fs, columns=["ecg_id", "signal", "lead_mask"]
        ).map_batches(
            EncodeBatch,
            fn_constructor_kwargs={
                "cfg": to_dict(cfg),
                "tokens": tokens,
                "device": plan.device,
                "threads": plan.threads,
            },
            batch_size=plan.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=plan.actors),
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus or None,
        )
        ds.write_parquet(
            target_path,
            filesystem=out_fs,
            filename_provider=_part_files(),
            schema=feature_schema(d_enc, n_tokens, tokens),
            row_group_size=group_rows,
            compression="none",  # float features hardly compress (zstd saves ~8 %); reads stay a copy
            use_dictionary=["ecg_id"],
            write_statistics=["ecg_id"],
        )
        seconds = time.perf_counter() - t1
        if progress:
            rate = f" ({len(in_ids) / seconds:,.0f} ECGs/s)" if seconds > 0 else ""
            print(f"features: {len(in_ids):,} ECGs in {seconds:.1f} s{rate}", file=sys.stderr, flush=True)
        rows = ShardRows(target, "ecg_id")  # reads the ecg_id column back: every ECG present once
        if len(rows) != len(in_ids) or not np.array_equal(np.sort(rows.keys), np.sort(in_ids)):
            missing = np.setdiff1d(in_ids, rows.keys)[:5].tolist()
            raise RuntimeError(
                f"{target}: wrote features of {len(rows)} ECGs, the shards hold {len(in_ids)} (missing e.g. "
                f"{missing}); nothing committed"
            )
        files = [
            {"name": PurePosixPath(p).name, "rows": pq.read_metadata(out_fs.open_input_file(p)).num_rows}
            for p in rows.files
        ]
        meta = {
            "format": FORMAT,
            "key": key,
            "key_inputs": inputs,
            "encoder": {
                **asdict(cfg.encoder),
                "seed": cfg.seed,
            },
            "d_enc": d_enc,
            "n_tokens": n_tokens,
            "n_samples": n_samples,
            "n_ecgs": int(len(rows)),
            "tokens": tokens,
            "columns": [f.name for f in feature_schema(d_enc, n_tokens, tokens)],
            "row_group_rows": group_rows,
            "files": files,
            "prepared_dir": cfg.data.prepared_dir,
            "plan": asdict(plan),
            "timings_s": {"key": round(t_key, 3), "encode_and_write": round(seconds, 3)},
            "ecgs_per_s": round(len(rows) / seconds, 1) if seconds > 0 else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": versions(),
        }
        storage.write_text(storage.join(target, META_FILE), json.dumps(meta, indent=2) + "\n")  # the commit
        if local:
            _move_into_place(target, location, rebuild)
    except BaseException:
        if local:
            storage.delete_dir(target)
        raise
    finally:
        ctx.enable_progress_bars = old_bars
    final = read_meta(location)
    return {**final, "location": location, "computed": final["created"] == meta["created"]}


def _move_into_place(staging: str, location: str, replace: bool) -> None:
    """Rename the committed staging folder to its key's folder. A folder already there without
    features.json is a half-written one (removed); a complete one is kept unless `replace` (another
    process finished the same key first: ours is dropped)."""
    import os
    import shutil

    if storage.is_dir(location):
        if read_meta(location) is not None and not replace:
            shutil.rmtree(staging)
            return
        old = f"{staging}.old"
        os.rename(location, old)
        os.rename(staging, location)
        shutil.rmtree(old)
        return
    os.rename(staging, location)


def ensure_features(cfg: Config, progress: bool = True) -> str:
    """The location of complete features for the run's key, computed first when missing (train, eval and
    the demo call it before they read features)."""
    return compute_features(cfg, progress=progress)["location"]


# ------------------------------------------------------------------------------------------- the reader


class FeatureStore:
    """Precomputed features by ecg_id, read lazily: the ecg_id column is read once, feature rows on demand
    one row group at a time through `ShardRows`' bounded LRU, never the whole set.

    `features(ecg_ids) -> (tokens (B, N, D_enc) | None, pooled (B, D_enc))` as float32 CPU tensors, in the
    order of ecg_ids; tokens None when not stored (or `tokens=False` at open)."""

    def __init__(self, location: str, meta: dict, rows, read_tokens: bool):
        self.location, self.meta, self.rows = location, meta, rows
        self.read_tokens = read_tokens

    @classmethod
    def open(
        cls, location: str, key: str | None = None, tokens: bool | None = None, cache_mb: float = 64.0
    ) -> FeatureStore:
        """Open a complete features folder. key: refuse one computed for another key (StaleFeaturesError).
        tokens: True requires stored tokens, False never reads them, None reads them when stored."""
        from ecgray.data.shards import ShardRows

        location = str(location)
        meta = read_meta(location)
        if meta is None:
            state = "half-written (no features.json)" if storage.is_dir(location) else "no such folder"
            raise FileNotFoundError(
                f"{location}: not complete features ({state}); compute them with `{rebuild_command()}`"
            )
        if meta["format"] != FORMAT:
            raise ValueError(f"{location}: features format {meta['format']}, this ecgray reads {FORMAT}")
        if key is not None:
            check_key(meta, location, key)
        if tokens and not meta["tokens"]:
            raise ValueError(
                f"{location}: stored without encoder tokens (pooled only), but tokens are asked for "
                f"(model.mapper=qformer reads them): compute them with `{rebuild_command()}` under that config"
            )
        rows = ShardRows(location, "ecg_id", cache_mb=cache_mb)
        listed = sorted(f["name"] for f in meta["files"])
        present = sorted(PurePosixPath(p).name for p in rows.files)
        if listed != present or len(rows) != meta["n_ecgs"]:
            raise ValueError(
                f"{location}: holds {len(present)} part files / {len(rows)} rows, features.json lists "
                f"{len(listed)} / {meta['n_ecgs']} (extra {sorted(set(present) - set(listed))[:3]}, missing "
                f"{sorted(set(listed) - set(present))[:3]}): an interrupted or concurrent write; recompute "
                f"with `{rebuild_command()} --rebuild`"
            )
        return cls(
            location, meta, rows, meta["tokens"] if tokens is None else bool(tokens and meta["tokens"])
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, ecg_id) -> bool:
        return int(ecg_id) in self.rows

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def d_enc(self) -> int:
        return int(self.meta["d_enc"])

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def has_tokens(self) -> bool:
        return bool(self.meta["tokens"])

    @property
    def ecg_ids(self):
        return self.rows.keys.copy()

    def features(self, ecg_ids):
        """-> (tokens (B, N, D_enc) float32 | None, pooled (B, D_enc) float32); an unknown id: KeyError."""
        import torch

        ids = np.atleast_1d(np.asarray([int(i) for i in np.atleast_1d(ecg_ids)], dtype=np.int64))
        columns = ["pooled", "tokens"] if self.read_tokens else ["pooled"]
        table = self.rows.read(ids, columns)
        pooled = _values(table.column("pooled")).reshape(len(ids), self.d_enc)  # (B, D_enc)
        tokens = None
        if self.read_tokens:
            tokens = torch.from_numpy(
                _values(table.column("tokens")).reshape(len(ids), self.n_tokens, self.d_enc)
            )
        return tokens, torch.from_numpy(pooled)


def _values(column) -> np.ndarray:
    """A (chunked) nested fixed_size_list<float32> column -> its flat float32 values (one copy)."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    while pa.types.is_fixed_size_list(column.type):
        column = column.flatten()
    return np.array(column.to_numpy(zero_copy_only=False), dtype=np.float32)


def open_features(cfg: Config, cache_mb: float = 64.0) -> FeatureStore:
    """The run's features (key from its encoder and data; tokens read iff its mapper needs them); missing
    ones raise FileNotFoundError naming the command (`ensure_features` computes them instead)."""
    location = features_location(cfg)
    return FeatureStore.open(location, tokens=needs_tokens(cfg), cache_mb=cache_mb)


def pooled_stats(
    location: str, prepared_dir: str, source: str, split: str = "train", batch_size: int = 4096
) -> dict:
    """{"feature_mean", "feature_std"}: (D_enc,) float32 mean and std (population) per dim of the pooled
    features at `location` of the prepared ECGs of ECG-QA split `split` from `source` (train: the patients
    of the meta-train side; these ECGs carry no labels). Streamed in batches of `batch_size` ECGs with
    float64 running sums (Chan's merge of mean and squared deviations), so memory holds one batch and the
    D_enc-sized sums. A std below 1 % of the median std (a dead dimension) is raised to it, so
    standardising never divides by ~0."""
    import torch

    from ecgray.data.shards import ECGStore

    store = FeatureStore.open(location, tokens=False)
    ecgs = ECGStore.open(prepared_dir)
    ids = store.ecg_ids  # in storage order: consecutive batches read consecutive row groups
    rows = ecgs.rows(ids)
    ids = ids[(ecgs.splits[rows] == split) & (ecgs.sources[rows] == source)]
    if len(ids) < 2:
        raise ValueError(
            f"{prepared_dir}: {len(ids)} ECG(s) of split {split!r} from source {source!r} have features at "
            f"{location}; the feature statistics need at least 2"
        )
    n = 0
    mean = torch.zeros(store.d_enc, dtype=torch.float64)  # running mean, (D_enc,)
    m2 = torch.zeros(store.d_enc, dtype=torch.float64)  # running sum of squared deviations, (D_enc,)
    for i in range(0, len(ids), batch_size):
        x = store.features(ids[i : i + batch_size])[1].double()  # (b, D_enc)
        b, batch_mean = x.shape[0], x.mean(0)
        delta = batch_mean - mean
        mean = mean + delta * (b / (n + b))
        m2 = m2 + (x - batch_mean).square().sum(0) + delta.square() * (n * b / (n + b))
        n += b
    std = (m2 / n).sqrt()
    std = std.clamp_min(0.01 * float(std.median()))
    if not (std > 0).all():
        raise ValueError(
            f"{location}: the pooled features of {n} {split} ECGs are all equal; nothing to standardise"
        )
    return {"feature_mean": mean.float(), "feature_std": std.float()}


# ----------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ecgray.cli import add_config_arguments

    parser.add_argument(
        "--actors", type=int, metavar="N", help="encoding actors (default: one per GPU, or one per 4 CPUs)"
    )
    parser.add_argument(
        "--batch-size", type=int, metavar="B", help="ECGs per encoder call (default 256 GPU, 32 CPU)"
    )
    parser.add_argument(
        "--tokens",
        action="store_true",
        help="store the encoder tokens too (default: only when model.mapper=qformer)",
    )
    parser.add_argument("--rebuild", action="store_true", help="recompute even when complete features exist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ecgray.cli import config_from_args

    cfg = config_from_args(args)
    try:
        report = compute_features(
            cfg,
            progress=not args.no_progress,
            tokens=True if args.tokens else None,
            actors=args.actors,
            batch_size=args.batch_size,
            rebuild=args.rebuild,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"ecgray features: {err}", file=sys.stderr)
        return 1
    shape = f"tokens {report['n_tokens']} x {report['d_enc']} + pooled" if report["tokens"] else "pooled only"
    how = (
        f"computed in {report['timings_s']['encode_and_write']:.1f} s, {report['ecgs_per_s']} ECGs/s on "
        f"{report['plan']['actors']} {report['plan']['device']} actor(s)"
        if report["computed"]
        else "already complete, reused"
    )
    print(
        f"features of {report['n_ecgs']} ECGs (D_enc {report['d_enc']}, {shape}) -> {report['location']} "
        f"(key {report['key']}; {how})"
    )
    return 0


if __name__ == "__main__":
    from ecgray.cli import main

    sys.exit(main(["features", *sys.argv[1:]]))
