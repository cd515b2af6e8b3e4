"""`ecgray prepare`: read every ECG that ECG-QA refers to once, in parallel (Ray Data), into Parquet shards.

    ecgray prepare --ptbxl DIR --ecgqa DIR --out DIR [--mimic DIR] [--strict] [--config F] [--set k=v ...]

Output (docs/architecture.md): `ecgs/part-NNNNN.parquet` (one row per ECG, canonical float32 [12, T] window),
`qa/{source}-{variant}-{split}.parquet` (one row per ECG-QA sample) and `report.json`. Everything is written
into a temporary sibling directory that replaces the output only once complete, so a failed or interrupted
run never leaves a half-written directory and a re-run replaces the previous output whole.
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


class PrepareError(RuntimeError):
    """`ecgray prepare` cannot produce its output; the message names the inputs at fault."""


# ---------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ecgray.cli import add_config_arguments

    parser.add_argument(
        "--ptbxl", metavar="DIR", help="PTB-XL root (ptbxl_database.csv, records500/); default data.ptbxl_dir"
    )
    parser.add_argument(
        "--ecgqa",
        metavar="DIR",
        help="ECG-QA root holding ptbxl/ and/or mimic-iv-ecg/; default data.ecgqa_dir",
    )
    parser.add_argument(
        "--mimic", metavar="DIR", help="MIMIC-IV-ECG root (record_list.csv, files/); default data.mimic_dir"
    )
    parser.add_argument("--out", metavar="DIR", help="output directory; default data.prepared_dir")
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
        ptbxl_dir=args.ptbxl or cfg.data.ptbxl_dir,
        ecgqa_dir=args.ecgqa or cfg.data.ecgqa_dir,
        mimic_dir=args.mimic or cfg.data.mimic_dir,
        prepared_dir=args.out or cfg.data.prepared_dir,
    )
    try:
        report = prepare(data, data.prepared_dir, strict=args.strict, progress=not args.no_progress)
    except (PrepareError, FileNotFoundError, ValueError) as err:
        print(f"ecgray prepare: {err}", file=sys.stderr)
        return 1
    rec = report["records"]
    print(
        f"prepared {rec['read']} ECGs ({rec['failed']} missing or corrupt, listed in report.json) and "
        f"{report['qa']['rows']} QA rows -> {data.prepared_dir} "
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


def collect(cfg: DataConfig) -> Collected:
    """The ECG-QA samples and every ECG they refer to, once, with its record path, patient and split."""
    from ecgray.data import ptbxl

    if cfg.ecgqa_dir is None:
        raise PrepareError("no ECG-QA directory: pass --ecgqa DIR (or set data.ecgqa_dir)")
    if not Path(cfg.ecgqa_dir).is_dir():
        raise PrepareError(f"ECG-QA directory {cfg.ecgqa_dir}: not found")
    samples: list[dict] = []
    items: list[dict] = []
    failures: list[dict] = []
    skipped: dict[str, str] = {}
    unparsed = 0
    for source, records_dir, flag in [
        ("ptbxl", cfg.ptbxl_dir, "--ptbxl"),
        ("mimic", cfg.mimic_dir, "--mimic"),
    ]:
        vdir = ecgqa.version_dir(cfg.ecgqa_dir, source)
        if not vdir.is_dir():
            continue
        if records_dir is None:
            skipped[source] = f"{vdir} is present but no {flag} DIR was given"
            continue
        source_samples = [
            s
            for variant in ecgqa.VARIANTS
            for split in ecgqa.SPLITS
            for s in ecgqa.read_split(cfg.ecgqa_dir, source, variant, split)
        ]
        samples += source_samples
        splits = _ecg_splits(source_samples, ecgqa.read_split_ecgs(cfg.ecgqa_dir, source), source)
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
# Reading (runs inside Ray Data tasks)


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


def ensure_ray() -> None:
    """Start a local Ray unless one is running (a cluster joined with `ray.init` first is used as is)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)


def read_ecgs(items: list[dict], cfg: DataConfig) -> Iterator:
    """The Ray Data pipeline: items -> pyarrow tables of `read_batch` output, in item order.

    `ray.data.from_items(items).map_batches(read_batch)`: cfg.read_batch_size records per task, one header
    parse per layout and task. Starts a local Ray only when none is running.
    """
    import ray

    if not items:
        return
    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    old = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    # Order preserved: shards come out the same on every run. Our own tqdm bar counts records instead.
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False
    try:
        n_blocks = max(1, math.ceil(len(items) / cfg.read_batch_size))
        ds = ray.data.from_items(items, override_num_blocks=n_blocks).map_batches(
            read_batch, fn_kwargs={"cfg": asdict(cfg)}, batch_size=cfg.read_batch_size, batch_format="numpy"
        )
        yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = old


# ---------------------------------------------------------------------------------------------------------
# Writing


class _ShardWriter:
    """Buffers rows and writes `part-NNNNN.parquet` files of `rows` rows each."""

    def __init__(self, folder: Path, schema, rows: int):
        self.folder, self.schema, self.rows = folder, schema, rows
        self.buffer: list = []
        self.buffered = 0
        self.files = 0
        folder.mkdir(parents=True)

    def add(self, table) -> None:
        import pyarrow as pa

        self.buffer.append(table.select(self.schema.names).cast(self.schema))
        self.buffered += table.num_rows
        while self.buffered >= self.rows:
            merged = pa.concat_tables(self.buffer)
            self._write(merged.slice(0, self.rows))
            rest = merged.slice(self.rows)
            self.buffer, self.buffered = [rest], rest.num_rows

    def close(self) -> None:
        import pyarrow as pa

        if self.buffered:
            self._write(pa.concat_tables(self.buffer))
        self.buffer, self.buffered = [], 0

    def _write(self, table) -> None:
        import pyarrow.parquet as pq

        pq.write_table(table, self.folder / f"part-{self.files:05d}.parquet")
        self.files += 1


def _replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished tmp dir in place of out; the old output is removed only after the swap."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


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

    Missing or corrupt records are listed in the report and left out (with the QA samples that need them);
    `strict=True` raises PrepareError naming them instead, and nothing is written.
    """
    import pyarrow as pa
    from tqdm import tqdm

    from ecgray.config import versions

    t0 = time.perf_counter()
    check_config(cfg)
    out = Path(out_dir).resolve()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").is_file())):
        raise PrepareError(
            f"output {out} exists and is not a prepared directory (no report.json): not replacing it"
        )
    samples, items, failures, skipped, unparsed = collect(cfg)
    timings = {"collect": time.perf_counter() - t0}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        t1 = time.perf_counter()
        ensure_ray()
        timings["ray_init"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        writer = _ShardWriter(tmp / "ecgs", ecg_schema(cfg.n_samples), cfg.shard_rows)
        ok: set[tuple[str, int]] = set()
        nan_records: dict[str, int] = {}
        readers: Counter = Counter()
        splits: Counter = Counter()
        with tqdm(total=len(items), desc="reading ECGs", unit="rec", disable=not progress) as bar:
            for table in read_ecgs(items, cfg):
                cols = table.select(
                    ["source", "ecg_id", "path", "error", "error_kind", "reader", "nan_count", "split"]
                )
                good = []
                for r, row in enumerate(cols.to_pylist()):
                    if row["error"] is not None:
                        failures.append(
                            _failure(
                                row["source"], row["ecg_id"], row["path"], row["error_kind"], row["error"]
                            )
                        )
                        continue
                    good.append(r)
                    ok.add((row["source"], row["ecg_id"]))
                    readers[row["reader"]] += 1
                    splits[f"{row['source']}/{row['split']}"] += 1
                    if row["nan_count"]:
                        nan_records[f"{row['source']}/{row['ecg_id']}"] = row["nan_count"]
                writer.add(table.take(pa.array(good, pa.int64())))
                bar.update(table.num_rows)
        writer.close()
        timings["read"] = time.perf_counter() - t1
        failures.sort(key=lambda f: (f["source"], f["ecg_id"]))
        if strict and failures:
            listed = "; ".join(f["reason"] for f in failures[:MAX_LISTED])
            more = f" (and {len(failures) - MAX_LISTED} more)" if len(failures) > MAX_LISTED else ""
            raise PrepareError(f"--strict: {len(failures)} records missing or corrupt: {listed}{more}")

        t2 = time.perf_counter()
        qa_counts, dropped = _write_qa(tmp / "qa", samples, ok)
        timings["write_qa"] = time.perf_counter() - t2
        timings["total"] = time.perf_counter() - t0
        report = {
            "inputs": {
                "ptbxl": cfg.ptbxl_dir,
                "ecgqa": cfg.ecgqa_dir,
                "mimic": cfg.mimic_dir,
                "out": str(out),
            },
            "records": {
                "referenced": len(items) + sum(f["path"] is None for f in failures),
                "read": len(ok),
                "failed": len(failures),
                "missing": sum(f["kind"] == "missing" for f in failures),
                "corrupt": sum(f["kind"] == "corrupt" for f in failures),
                "by_reader": dict(readers),
                "by_split": dict(sorted(splits.items())),
                "shards": writer.files,
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
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "records_per_s": round(len(items) / timings["read"], 1) if timings["read"] > 0 else 0.0,
            "config": asdict(cfg),
            "versions": versions(),
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _write_qa(folder: Path, samples: list[dict], ok: set[tuple[str, int]]) -> tuple[dict[str, int], int]:
    """qa/{source}-{variant}-{split}.parquet of the samples whose ECGs were all read; -> (counts, dropped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
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
    for (source, variant, split), rows in sorted(groups.items()):
        table = pa.Table.from_pylist(rows, schema=schema)
        pq.write_table(table, folder / f"{source}-{variant}-{split}.parquet")
    return dict(sorted(counts.items())), dropped
