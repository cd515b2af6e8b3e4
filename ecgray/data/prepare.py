"""`ecgray prepare`: read every ECG that ECG-QA refers to once, in parallel (Ray Data), into Parquet shards.

    ecgray prepare --ptbxl DIR --ecgqa DIR --out DIR|URI [--mimic DIR] [--strict] [--config F] [--set k=v ...]

Output (docs/architecture.md): `ecgs/part-NNNNN.parquet` (one row per ECG, canonical float32 [12, T] window,
row groups of ECG_ROW_GROUP_ROWS rows), `qa/{source}-{variant}-{split}.parquet` (one row per ECG-QA sample)
and `report.json`.

The Ray Data workers write the ECG shards themselves (`write_shard`: one task per shard, reading
data.read_batch_size records at a time) and send the driver only one small status row per record
(STATUS_COLUMNS): no signal reaches the driver, whose memory holds a few ints and strings per record.

Everything is written into a staging location first; the output is replaced only once the new one is
complete, so a failed run leaves the previous output as it was:
- a local path: staging is a temporary sibling directory, swapped in by renames (atomic per rename);
- a URI (object stores have no rename): staging is `<out>/_staging-<id>/` (invisible to readers, which list
  `ecgs/` and `qa/` only); at the end the old `report.json` is deleted first, then the rest of the old
  output, the staged files are moved in (server-side copies), and `report.json` is written LAST as the commit
  marker. Readers treat a folder without report.json as not prepared: until the marker is written (and if
  a commit is interrupted) the folder reads as not prepared, never as a mix of two runs passed off as one;
  a re-run replaces it.
Inputs (--ptbxl, --mimic, --ecgqa) are local paths; on a multi-node cluster, inputs and a local --out must
be on a file system every node sees (a URI --out needs nothing shared).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ecgray import storage
from ecgray.config import LEAD_NAMES, DataConfig
from ecgray.data import ecgqa
from ecgray.data.shards import ecg_schema, qa_schema, signals_to_arrow

PTBXL_METADATA = [
    "age",
    "sex",
    "height",
    "weight",
    "scp_codes",
    "heart_axis",
    "infarction_stadium1",
    "infarction_stadium2",
    "baseline_drift",
    "static_noise",
    "burst_noise",
    "electrodes_problems",
    "extra_beats",
    "pacemaker",
    "strat_fold",
    "device",
    "recording_date",
]
MIMIC_METADATA = ["subject_id", "ecg_time"]
MAX_LISTED = 20
ECG_ROW_GROUP_ROWS = 64
"""Rows per Parquet row group of an `ecgs/` shard: a reader fetches one ECG by decoding one group of at most
this many (64 x 12 x 2,500 float32 = 7.7 MB at 500 Hz, 5 s)."""
STATUS_COLUMNS = ["source", "ecg_id", "path", "error", "error_kind", "reader", "nan_count", "split", "shard"]
"""What a Ray Data task sends back to the driver for each record (no signal)."""
SHARDS_PER_CPU = 4
"""At least this many shards (tasks) per CPU of the cluster when the records allow: a slow or busy worker
then holds up a quarter of its share, not all of it."""
STAGING_PREFIX = "_staging-"
"""Name prefix of the staging folder inside a URI output."""
OWN_NAMES = ("ecgs", "qa", "report.json")
"""What `ecgray prepare` writes in its output folder."""


class PrepareError(RuntimeError):
    """`ecgray prepare` cannot produce its output; the message names the inputs at fault."""


# ---------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ecgray.cli import add_config_arguments

    local = "a local path (on a multi-node cluster: on a file system every node sees)"
    parser.add_argument(
        "--ptbxl",
        metavar="DIR",
        help=f"PTB-XL root (ptbxl_database.csv, records500/), {local}; default data.ptbxl_dir",
    )
    parser.add_argument(
        "--ecgqa",
        metavar="DIR",
        help="ECG-QA root holding ptbxl/ and/or mimic-iv-ecg/, or one of those two folders (then only that "
        f"version), {local}; default data.ecgqa_dir",
    )
    parser.add_argument(
        "--mimic",
        metavar="DIR",
        help=f"MIMIC-IV-ECG root (record_list.csv, files/), {local}; default data.mimic_dir",
    )
    parser.add_argument(
        "--out",
        metavar="DIR|URI",
        help="output folder: a local path or a URI (s3://bucket/prefix, gs://..., file:///...); the old "
        "output is replaced only once the new one is complete; with a URI, report.json is written last and "
        "a folder without it is not prepared; default data.prepared_dir",
    )
    parser.add_argument(
        "--strict", action="store_true", help="fail (exit 1) when any referenced record is missing or corrupt"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ecgray.cli import config_from_args

    cfg = config_from_args(args)
    data = replace(
        cfg.data,
        ptbxl_dir=storage.resolve(args.ptbxl) if args.ptbxl else cfg.data.ptbxl_dir,
        ecgqa_dir=storage.resolve(args.ecgqa) if args.ecgqa else cfg.data.ecgqa_dir,
        mimic_dir=storage.resolve(args.mimic) if args.mimic else cfg.data.mimic_dir,
        prepared_dir=storage.resolve(args.out) if args.out else cfg.data.prepared_dir,
    )
    try:
        report = prepare(data, data.prepared_dir, strict=args.strict, progress=not args.no_progress)
    except (PrepareError, OSError, ValueError) as err:  # OSError: FileNotFoundError, a store refusing
        print(f"ecgray prepare: {err}", file=sys.stderr)
        return 1
    rec = report["records"]
    print(
        f"prepared {rec['read']} ECGs ({rec['failed']} missing or corrupt, listed in report.json) and "
        f"{report['qa']['rows']} QA rows -> {report['inputs']['out']} "
        f"({report['timings_s']['read']:.1f} s reading, {report['records_per_s']:.0f} records/s)"
    )
    for source, why in report["skipped_sources"].items():
        print(f"skipped {source}: {why}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# Collecting what to read


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _ecg_splits(samples: list[dict], tsv: dict[int, str], source: str) -> dict[int, str]:
    """ecg_id -> ECG-QA split: from *_ecgs.tsv, else from the split of the samples that refer to it."""
    seen: dict[int, set[str]] = {}
    for s in samples:
        for i in s["ecg_id"]:
            seen.setdefault(i, set()).add(s["split"])
    out = {}
    for ecg_id, splits in seen.items():
        if ecg_id in tsv:
            out[ecg_id] = tsv[ecg_id]
        elif len(splits) == 1:
            out[ecg_id] = next(iter(splits))
        else:
            raise PrepareError(
                f"{source} ecg_id {ecg_id}: not in *_ecgs.tsv and referred to by samples of splits {sorted(splits)}"
            )
    return out


class Collected(NamedTuple):
    samples: list[dict]
    """ECG-QA samples of every source whose records were given."""
    items: list[dict]
    """ECGs to read: {source, ecg_id, path, patient_id, split, metadata (JSON)}."""
    failures: list[dict]
    """Referenced ECGs without metadata: {source, ecg_id, path None, kind, reason}."""
    skipped: dict[str, str]
    """source -> why its ECG-QA version was not prepared."""
    noise_unparsed: int
    """PTB-XL rows with noise-cell tokens that are not leads."""


def _listing(folder: Path, limit: int = 12) -> str:
    """'a/, b.csv, ...' of what is directly in folder (folders marked with /), or 'nothing'."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "nothing"


def _not_ecgqa(folder: Path) -> str:
    """Why folder is no ECG-QA root nor version folder: what is there, what to pass."""
    names = {p.name for p in folder.iterdir()}
    if "ptbxl_database.csv" in names:
        hint = " It looks like the PTB-XL data set: pass it as --ptbxl."
    elif "record_list.csv" in names:
        hint = " It looks like the MIMIC-IV-ECG data set: pass it as --mimic."
    elif ecgqa.is_version_dir(folder):
        hint = (
            f" It holds an ECG-QA version's files, but under the name {folder.name!r}: ECG-QA v1.0.2 names "
            f"them {' and '.join(repr(v) for v in ecgqa.SOURCES.values())}, which tells PTB-XL from MIMIC; "
            "rename it."
        )
    elif names & set(ecgqa.SPLITS) and folder.name in ecgqa.VARIANTS:
        hint = f" It is a {folder.name}/ folder inside a version folder: pass {folder.parent}."
    else:
        inner = [
            p
            for p in sorted(folder.iterdir())
            if p.is_dir() and any(ecgqa.is_version_dir(p / v) for v in ecgqa.SOURCES.values())
        ]
        hint = f" {inner[0]} is an ECG-QA root: pass it." if inner else ""
    return (
        f"ECG-QA folder {folder} (--ecgqa): found {_listing(folder)}; expected the ECG-QA root (holding "
        f"ptbxl/ and/or mimic-iv-ecg/) or one of those two folders (holding template/, paraphrased/, "
        f"answers.csv, *_ecgs.tsv).{hint}"
    )


def collect(cfg: DataConfig) -> Collected:
    """The ECG-QA samples and every ECG they refer to, once, with its record path, patient and split.

    `cfg.ecgqa_dir` is the ECG-QA root or one of its version folders (`ptbxl/`, `mimic-iv-ecg/`: then only
    that source); every input is a local path."""
    from ecgray.data import ptbxl

    for flag, value in [("--ptbxl", cfg.ptbxl_dir), ("--ecgqa", cfg.ecgqa_dir), ("--mimic", cfg.mimic_dir)]:
        if value is not None and storage.is_uri(value):
            raise PrepareError(
                f"{flag} {value}: inputs are read as local paths (on a cluster: a file system every node "
                "sees), not URIs; copy the data set to disk and pass its folder"
            )
    if cfg.ecgqa_dir is None:
        raise PrepareError("no ECG-QA directory: pass --ecgqa DIR (or set data.ecgqa_dir)")
    root = Path(cfg.ecgqa_dir)
    if not root.is_dir():
        raise PrepareError(
            f"ECG-QA folder {root} (--ecgqa): not found; expected the ECG-QA root (holding ptbxl/ and/or "
            "mimic-iv-ecg/) or one of those two folders"
        )
    versions = {s: ecgqa.version_dir(root, s) for s in ecgqa.SOURCES}
    versions = {s: v for s, v in versions.items() if v.is_dir() and ecgqa.is_version_dir(v)}
    if not versions:
        raise PrepareError(_not_ecgqa(root))
    samples: list[dict] = []
    items: list[dict] = []
    failures: list[dict] = []
    skipped: dict[str, str] = {}
    unparsed = 0
    for source, records_dir, flag in [
        ("ptbxl", cfg.ptbxl_dir, "--ptbxl"),
        ("mimic", cfg.mimic_dir, "--mimic"),
    ]:
        if source not in versions:
            continue
        vdir = versions[source]
        if records_dir is None:
            skipped[source] = f"{vdir} is present but no {flag} DIR was given"
            continue
        source_samples = [
            s
            for variant in ecgqa.VARIANTS
            for split in ecgqa.SPLITS
            for s in ecgqa.read_split(root, source, variant, split)
        ]
        if not source_samples:
            raise PrepareError(
                f"ECG-QA version folder {vdir}: no samples in {{template,paraphrased}}/{{train,valid,test}}/"
                f"*.json (found {_listing(vdir)})"
            )
        samples += source_samples
        splits = _ecg_splits(source_samples, ecgqa.read_split_ecgs(root, source), source)
        if source == "ptbxl":
            db = ptbxl.read_database(records_dir)
            unparsed += sum(bool(u) for u in db["noise_unparsed"])
            columns = [c for c in PTBXL_METADATA if c in db.columns]
            wanted = db.loc[db.index.isin(list(splits)), ["patient_id", *columns]]
            rows = dict(zip(wanted.index, wanted.to_dict("records"), strict=True))  # ecg_id -> row
            for ecg_id in sorted(splits):
                if ecg_id not in rows:
                    failures.append(_failure(source, ecg_id, None, "missing", "not in ptbxl_database.csv"))
                    continue
                meta = rows[ecg_id]
                items.append(
                    _item(
                        source,
                        ecg_id,
                        ptbxl.record_path(records_dir, ecg_id, cfg.record_fs),
                        meta.pop("patient_id"),
                        splits[ecg_id],
                        meta,
                    )
                )
        else:
            records = ptbxl.read_mimic_record_list(records_dir)
            wanted = records.loc[records.index.isin(list(splits)), MIMIC_METADATA]
            rows = dict(zip(wanted.index, wanted.to_dict("records"), strict=True))  # study_id -> row
            for ecg_id in sorted(splits):
                if ecg_id not in rows:
                    failures.append(
                        _failure(source, ecg_id, None, "missing", "study_id not in record_list.csv")
                    )
                    continue
                meta = rows[ecg_id]
                items.append(
                    _item(
                        source,
                        ecg_id,
                        ptbxl.mimic_record_path(records_dir, records, ecg_id),
                        meta["subject_id"],
                        splits[ecg_id],
                        meta,
                    )
                )
    if not samples:
        raise PrepareError(
            f"nothing to prepare in {cfg.ecgqa_dir}: no ECG-QA samples of a source whose records were given"
            + (f" ({'; '.join(skipped.values())})" if skipped else "")
        )
    return Collected(samples, items, failures, skipped, unparsed)


def _item(source, ecg_id, path, patient_id, split, metadata) -> dict:
    return {
        "source": source,
        "ecg_id": int(ecg_id),
        "path": str(path),
        "patient_id": int(patient_id),
        "split": split,
        "metadata": json.dumps(_jsonable(metadata), sort_keys=True),
    }


def _failure(source, ecg_id, path, kind, reason) -> dict:
    return {"source": source, "ecg_id": int(ecg_id), "path": path, "kind": kind, "reason": reason}


# ---------------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------------
# Reading and writing ECG shards (runs inside Ray Data tasks)


def read_batch(batch: dict[str, np.ndarray], cfg: dict):
    """A batch of items -> a pyarrow table of canonical ECGs; failed records get `error` and zero signals."""
    import pyarrow as pa

    from ecgray.data.ptbxl import HeaderCache, RecordError, read_record_fast
    from ecgray.data.signals import SignalError

    cfg = DataConfig(**cfg)
    cache = HeaderCache()
    n, t = len(batch["ecg_id"]), cfg.n_samples
    signals = np.zeros((n, len(LEAD_NAMES), t), dtype=np.float32)  # (B, 12, T)
    masks = np.zeros((n, len(LEAD_NAMES)), dtype=bool)
    nan_count = np.zeros(n, dtype=np.int32)
    errors: list[str | None] = [None] * n
    kinds: list[str | None] = [None] * n
    readers: list[str | None] = [None] * n
    for i in range(n):
        path = str(batch["path"][i])
        wfdb_reads = cache.wfdb_reads
        try:
            ecg = read_record_fast(path, cache, cfg)
        except RecordError as err:
            errors[i], kinds[i] = str(err), "missing" if err.missing else "corrupt"
            continue
        except (SignalError, OSError) as err:
            errors[i], kinds[i] = (
                (str(err) if isinstance(err, SignalError) else f"record {path}: {err}"),
                "corrupt",
            )
            continue
        signals[i], masks[i], nan_count[i] = ecg.signal, ecg.lead_mask, ecg.nan_count
        readers[i] = "wfdb" if cache.wfdb_reads > wfdb_reads else "fast"
    return pa.table(
        {
            "ecg_id": pa.array(batch["ecg_id"], pa.int64()),
            "source": pa.array(batch["source"].tolist(), pa.string()),
            "patient_id": pa.array(batch["patient_id"], pa.int64()),
            "fs": pa.array(np.full(n, cfg.fs, dtype=np.int32)),
            "signal": signals_to_arrow(signals),
            "lead_mask": pa.FixedSizeListArray.from_arrays(pa.array(masks.reshape(-1)), len(LEAD_NAMES)),
            "split": pa.array(batch["split"].tolist(), pa.string()),
            "nan_count": pa.array(nan_count),
            "metadata": pa.array(batch["metadata"].tolist(), pa.string()),
            "path": pa.array(batch["path"].tolist(), pa.string()),
            "error": pa.array(errors, pa.string()),
            "error_kind": pa.array(kinds, pa.string()),
            "reader": pa.array(readers, pa.string()),
        }
    )


def _batch_of(items: list[dict]) -> dict[str, np.ndarray]:
    """Items -> the column batch `read_batch` takes (as Ray Data hands it over)."""
    ints = ("ecg_id", "patient_id")
    return {k: np.asarray([it[k] for it in items], dtype=np.int64 if k in ints else object) for k in items[0]}


def task_file(staging: str, shard: int) -> str:
    """Where the task of shard number `shard` writes its ECGs (renamed part-NNNNN.parquet at the end)."""
    return storage.join(staging, "ecgs", f"task-{shard:05d}.parquet")


def write_shard(batch: dict[str, np.ndarray], cfg: dict, staging: str):
    """One Ray Data task: read one shard's records and write the good ones to `task_file(staging, shard)`.

    batch: one row, {"shard": [k], "items": [JSON list of items]}. Records are read data.read_batch_size at
    a time (`read_batch`) and written in row groups of ECG_ROW_GROUP_ROWS, so a task holds at most
    read_batch_size + ECG_ROW_GROUP_ROWS signals whatever the shard's size; no file when none was read.
    Returns only the records' status rows (STATUS_COLUMNS): the signals stay in the worker.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    data = DataConfig(**cfg)
    if len(batch["shard"]) != 1:
        raise ValueError(f"write_shard takes one shard per call, got {len(batch['shard'])}")
    shard = int(batch["shard"][0])
    items = json.loads(str(batch["items"][0]))
    schema = ecg_schema(data.n_samples)
    fs, path = storage.filesystem(task_file(staging, shard))
    writer, pending, statuses = None, None, []

    def write(group) -> None:
        nonlocal writer
        if writer is None:  # opened at the first good record: a shard of failures leaves no file
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            writer = pq.ParquetWriter(path, schema, filesystem=fs)
        writer.write_table(group, row_group_size=ECG_ROW_GROUP_ROWS)

    try:
        for start in range(0, len(items), data.read_batch_size):
            table = read_batch(_batch_of(items[start : start + data.read_batch_size]), cfg)
            status = table.select(STATUS_COLUMNS[:-1])
            statuses.append(status.append_column("shard", pa.array([shard] * len(table), pa.int32())))
            good = table.filter(pc.is_null(table.column("error"))).select(schema.names).cast(schema)
            pending = good if pending is None else pa.concat_tables([pending, good])
            while pending.num_rows >= ECG_ROW_GROUP_ROWS:
                write(pending.slice(0, ECG_ROW_GROUP_ROWS))
                pending = pending.slice(ECG_ROW_GROUP_ROWS)
        if pending is not None and pending.num_rows:
            write(pending)
    finally:
        if writer is not None:
            writer.close()
    return pa.concat_tables(statuses)


def ensure_ray() -> None:
    """Start a local Ray unless one is running (a cluster joined with `ray.init` first is used as is)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        from ecgray.logs import runtime_env

        ray.init(
            include_dashboard=False, log_to_driver=False, configure_logging=False, runtime_env=runtime_env()
        )


def shard_size(n_items: int, cfg: DataConfig, cpus: int) -> int:
    """ECGs per shard (= per Ray Data task): data.shard_rows, lowered so that every CPU gets
    SHARDS_PER_CPU shards when there are fewer than SHARDS_PER_CPU x cpus x data.shard_rows records."""
    return max(1, min(cfg.shard_rows, math.ceil(n_items / (SHARDS_PER_CPU * max(1, cpus)))))


def write_ecgs(items: list[dict], cfg: DataConfig, staging: str, rows_per_shard: int) -> Iterator:
    """The Ray Data pipeline: shards of `rows_per_shard` items -> `write_shard` in the workers -> pyarrow
    tables of status rows (STATUS_COLUMNS, no signal) on the driver, as the tasks finish.

    Shard k holds items[k * rows_per_shard : (k + 1) * rows_per_shard] and is written to
    `task_file(staging, k)`: the same shards on every run, whatever order the tasks run in. Starts a local
    Ray only when none is running.
    """
    import ray

    if not items:
        return
    ensure_ray()
    shards = [
        {"shard": k, "items": json.dumps(items[start : start + rows_per_shard])}
        for k, start in enumerate(range(0, len(items), rows_per_shard))
    ]
    ctx = ray.data.DataContext.get_current()
    old = ctx.enable_progress_bars
    ctx.enable_progress_bars = False  # our own tqdm bar counts records instead
    try:
        ds = ray.data.from_items(shards, override_num_blocks=len(shards)).map_batches(
            write_shard,
            fn_kwargs={"cfg": asdict(cfg), "staging": staging},
            batch_size=1,  # one shard, one task, one file
            batch_format="numpy",
        )
        yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)
    finally:
        ctx.enable_progress_bars = old


# ---------------------------------------------------------------------------------------------------------
# Staging and committing the output


def _check_out(out: str) -> None:
    """Refuse to replace anything but an earlier output of `ecgray prepare`."""
    if storage.is_file(out):
        raise PrepareError(f"output {out} is a file, not a directory: not replacing it")
    names = storage.list_names(out)
    # report.json: a prepared folder; ecgs/ or qa/ without it: one whose URI commit was interrupted
    ours = set(OWN_NAMES) & set(names) or all(n.startswith(STAGING_PREFIX) for n in names)
    if not ours:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise PrepareError(
            f"output {out} exists and is not a prepared directory (no report.json, ecgs/ or qa/; holds "
            f"{shown}): not replacing it"
        )


def _staging(out: str) -> str:
    """A new, empty staging location for out: a temporary sibling directory of a local path; a
    `_staging-<id>` folder inside a URI (readers of ecgs/ and qa/ never see it)."""
    if storage.is_uri(out):
        return storage.join(out, f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}")
    parent = Path(out).parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{Path(out).name}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    return tmp


def _number_shards(staging: str, written: Counter) -> list[tuple[str, str]]:
    """Check every task file the workers reported against what the driver sees, and name them in shard
    order: -> [(task file, part-NNNNN.parquet name)]."""
    import pyarrow.parquet as pq

    out = []
    for k in sorted(written):
        location = task_file(staging, k)
        fs, path = storage.filesystem(location)
        rows = pq.read_metadata(path, filesystem=fs).num_rows if storage.is_file(location) else None
        if rows != written[k]:
            raise PrepareError(
                f"{location}: a Ray worker wrote {written[k]} ECGs there but the driver finds "
                f"{'no such file' if rows is None else f'{rows} rows'}; on a multi-node cluster, --out must "
                "be a URI (s3://...) or a file system every node shares"
            )
        out.append((location, f"part-{len(out):05d}.parquet"))
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished tmp dir in place of out; the old output is removed only after the swap."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def _commit_uri(staging: str, out: str, moves: list[tuple[str, str]], report_text: str) -> None:
    """Replace out's contents with the staged files (object stores have no rename): the old report.json
    goes first (from here on out reads as not prepared), then everything else of the old output (ecgs/, qa/
    and what later stages derived from them, e.g. features/: as the local swap does; staging folders stay);
    the staged files are moved in (server-side copies) and report.json, the commit marker, is written last."""
    storage.delete_file(storage.join(out, "report.json"))
    for name in storage.list_names(out):
        if not name.startswith(STAGING_PREFIX):
            location = storage.join(out, name)
            if storage.is_dir(location):
                storage.delete_dir(location)
            else:
                storage.delete_file(location)
    for source, relative in moves:
        storage.move(source, storage.join(out, relative))
    storage.write_text(storage.join(out, "report.json"), report_text)
    try:  # committed: what is left of the staging folder (empty folders) is invisible to readers
        storage.delete_dir(staging)
    except OSError as err:
        print(f"ecgray prepare: could not remove the empty staging folder {staging} ({err})", file=sys.stderr)
    stale = [n for n in storage.list_names(out) if n.startswith(STAGING_PREFIX)]
    if stale:
        print(
            f"ecgray prepare: {out} holds the staging folders of interrupted runs ({', '.join(stale)}); "
            "delete them when no other `ecgray prepare` writes there",
            file=sys.stderr,
        )


def _discard(staging: str, out: str, out_existed: bool) -> None:
    """Remove a failed run's staging (and a URI output folder it created); the old output stays."""
    try:
        if storage.is_uri(out):
            storage.delete_dir(staging)
            if not out_existed and storage.is_dir(out) and not storage.list_names(out):
                storage.delete_dir(out)
        else:
            shutil.rmtree(staging, ignore_errors=True)
    except Exception as err:  # the run's own error is what the caller raises; name what is left behind
        print(f"ecgray prepare: could not remove the staging folder {staging} ({err})", file=sys.stderr)


def check_config(cfg: DataConfig) -> None:
    """Values the typed config cannot rule out; PrepareError names the dotted keys."""
    from ecgray.data.signals import MAX_FS, MIN_FS, lead_index

    problems = []
    if not MIN_FS <= cfg.fs <= MAX_FS:
        problems.append(f"data.fs={cfg.fs}: expected {MIN_FS:g}-{MAX_FS:g} Hz")
    if cfg.n_samples < 1:
        problems.append(f"data.window_s={cfg.window_s}: expected a window of at least one sample")
    if cfg.read_batch_size < 1:
        problems.append(f"data.read_batch_size={cfg.read_batch_size}: expected >= 1")
    if cfg.shard_rows < 1:
        problems.append(f"data.shard_rows={cfg.shard_rows}: expected >= 1")
    bad = [lead for lead in cfg.leads if lead_index(lead) is None]
    if bad or not cfg.leads:
        problems.append(f"data.leads={cfg.leads}: expected names among {LEAD_NAMES}")
    if problems:
        raise PrepareError("invalid data config: " + "; ".join(problems))


def prepare(cfg: DataConfig, out_dir: str | Path, strict: bool = False, progress: bool = True) -> dict:
    """Read every ECG referred to by ECG-QA into `out_dir` (ecgs/, qa/, report.json); returns the report.

    out_dir is a local path or a URI. Missing or corrupt records are listed in the report and left out
    (with the QA samples that need them); `strict=True` raises PrepareError naming them instead, and
    nothing is written. The old output is replaced only once the new one is complete (module docstring).
    """
    from ecgray.config import versions
    from ecgray.logs import progress as progress_bar

    t0 = time.perf_counter()
    check_config(cfg)
    out = storage.resolve(out_dir)
    if storage.is_uri(out):
        base, _, query = out.partition("?")
        out = base.rstrip("/") + (f"?{query}" if query else "")
    _check_out(out)
    samples, items, failures, skipped, unparsed = collect(cfg)
    timings = {"collect": time.perf_counter() - t0}

    out_existed = storage.is_dir(out)
    staging = _staging(out)
    try:
        t1 = time.perf_counter()
        ensure_ray()
        timings["ray_init"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        import ray

        rows_per_shard = shard_size(len(items), cfg, int(ray.cluster_resources().get("CPU", 1)))
        ok: set[tuple[str, int]] = set()
        nan_records: dict[str, int] = {}
        readers: Counter = Counter()
        splits: Counter = Counter()
        written: Counter = Counter()  # shard -> ECGs its task wrote
        with progress_bar(total=len(items), desc="reading ECGs", unit="rec", disable=not progress) as bar:
            for table in write_ecgs(items, cfg, staging, rows_per_shard):
                for row in table.select(STATUS_COLUMNS).to_pylist():
                    if row["error"] is not None:
                        failures.append(
                            _failure(
                                row["source"], row["ecg_id"], row["path"], row["error_kind"], row["error"]
                            )
                        )
                        continue
                    ok.add((row["source"], row["ecg_id"]))
                    written[row["shard"]] += 1
                    readers[row["reader"]] += 1
                    splits[f"{row['source']}/{row['split']}"] += 1
                    if row["nan_count"]:
                        nan_records[f"{row['source']}/{row['ecg_id']}"] = row["nan_count"]
                bar.update(table.num_rows)
        timings["read"] = time.perf_counter() - t1
        failures.sort(key=lambda f: (f["source"], f["ecg_id"]))
        if strict and failures:
            listed = "; ".join(f["reason"] for f in failures[:MAX_LISTED])
            more = f" (and {len(failures) - MAX_LISTED} more)" if len(failures) > MAX_LISTED else ""
            raise PrepareError(f"--strict: {len(failures)} records missing or corrupt: {listed}{more}")
        shards = _number_shards(staging, written)

        t2 = time.perf_counter()
        qa_counts, dropped, qa_files = _write_qa(staging, samples, ok)
        timings["write_qa"] = time.perf_counter() - t2
        report = {
            "inputs": {"ptbxl": cfg.ptbxl_dir, "ecgqa": cfg.ecgqa_dir, "mimic": cfg.mimic_dir, "out": out},
            "records": {
                "referenced": len(items) + sum(f["path"] is None for f in failures),
                "read": len(ok),
                "failed": len(failures),
                "missing": sum(f["kind"] == "missing" for f in failures),
                "corrupt": sum(f["kind"] == "corrupt" for f in failures),
                "by_reader": dict(readers),
                "by_split": dict(sorted(splits.items())),
                "shards": len(shards),
                "shard_rows": rows_per_shard,
                "row_group_rows": ECG_ROW_GROUP_ROWS,
            },
            "failures": failures,
            "nan": {
                "policy": cfg.nan_policy,
                "records_with_nan": len(nan_records),
                "nan_samples": int(sum(nan_records.values())),
                "per_record": nan_records,
            },
            "qa": {"rows": sum(qa_counts.values()), "dropped_missing_ecg": dropped, "by": qa_counts},
            "skipped_sources": skipped,
            "noise_cells_unparsed": unparsed,
            "commit": "report.json written last" if storage.is_uri(out) else "directory rename",
            "timings_s": {},
            "records_per_s": round(len(items) / timings["read"], 1) if timings["read"] > 0 else 0.0,
            "config": asdict(cfg),
            "versions": versions(),
        }
        moves = [(src, f"ecgs/{name}") for src, name in shards] + qa_files
        if storage.is_uri(out):
            timings["total"] = time.perf_counter() - t0  # the commit itself comes after its marker is made
            report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
            _commit_uri(staging, out, moves, json.dumps(report, indent=2) + "\n")
        else:
            for src, name in shards:  # task-NNNNN -> part-NNNNN, inside the staging directory
                storage.move(src, storage.join(staging, "ecgs", name))
            timings["total"] = time.perf_counter() - t0
            report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
            storage.write_text(storage.join(staging, "report.json"), json.dumps(report, indent=2) + "\n")
            _replace_dir(Path(staging), Path(out))
    except BaseException:
        _discard(staging, out, out_existed)
        raise
    return report


def _write_qa(staging: str, samples: list[dict], ok: set[tuple[str, int]]):
    """staging/qa/{source}-{variant}-{split}.parquet of the samples whose ECGs were all read;
    -> (counts, dropped, [(file, its name relative to the output)])."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    groups: dict[tuple[str, str, str], list[dict]] = {}
    dropped = 0
    counts: Counter = Counter()
    for s in samples:
        if not all((s["source"], i) in ok for i in s["ecg_id"]):
            dropped += 1
            continue
        groups.setdefault((s["source"], s["variant"], s["split"]), []).append(s)
        counts[f"{s['source']}/{s['variant']}/{s['split']}/{s['question_type']}"] += 1
    schema = qa_schema()
    fs, folder = storage.filesystem(storage.join(staging, "qa"))
    fs.create_dir(folder, recursive=True)
    files = []
    for (source, variant, split), rows in sorted(groups.items()):
        name = f"{source}-{variant}-{split}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), f"{folder}/{name}", filesystem=fs)
        files.append((storage.join(staging, "qa", name), f"qa/{name}"))
    return dict(sorted(counts.items())), dropped, files
