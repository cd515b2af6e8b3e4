"""Reading `ecgray prepare`'s Parquet shards back with pyarrow alone (no Ray): ECGStore and read_qa.

`signal` is stored as fixed_size_list<fixed_size_list<float32>[T]>[12] (the [12, T] shape lives in the type),
`lead_mask` as fixed_size_list<bool>[12].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ECG_COLUMNS = [
    "ecg_id",
    "source",
    "patient_id",
    "fs",
    "signal",
    "lead_mask",
    "split",
    "nan_count",
    "metadata",
]
QA_COLUMNS = [
    "sample_id",
    "template_id",
    "question_id",
    "question_type",
    "attribute_type",
    "question",
    "answer",
    "ecg_id",
    "attribute",
    "source",
    "variant",
    "split",
]


def ecg_schema(n_samples: int):
    """Arrow schema of one `ecgs/` shard for windows of n_samples."""
    import pyarrow as pa

    return pa.schema(
        [
            ("ecg_id", pa.int64()),
            ("source", pa.string()),
            ("patient_id", pa.int64()),
            ("fs", pa.int32()),
            ("signal", pa.list_(pa.list_(pa.float32(), n_samples), 12)),  # [12, T]
            ("lead_mask", pa.list_(pa.bool_(), 12)),
            ("split", pa.string()),
            ("nan_count", pa.int32()),
            ("metadata", pa.string()),
        ]
    )


def qa_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("sample_id", pa.int64()),
            ("template_id", pa.int32()),
            ("question_id", pa.int32()),
            ("question_type", pa.string()),
            ("attribute_type", pa.string()),
            ("question", pa.string()),
            ("answer", pa.list_(pa.string())),
            ("ecg_id", pa.list_(pa.int64())),
            ("attribute", pa.list_(pa.string())),
            ("source", pa.string()),
            ("variant", pa.string()),
            ("split", pa.string()),
        ]
    )


def signals_to_arrow(signals: np.ndarray):
    """float32 (B, 12, T) -> the `signal` column's array."""
    import pyarrow as pa

    b, leads, t = signals.shape
    flat = pa.array(np.ascontiguousarray(signals, dtype=np.float32).reshape(-1))  # (B * 12 * T,)
    return pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(flat, t), leads)


def signals_from_arrow(column) -> np.ndarray:
    """The `signal` column (array or chunked) -> float32 (B, 12, T), one contiguous copy."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    t = column.type.value_type.list_size
    values = column.flatten().flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values, dtype=np.float32).reshape(len(column), 12, t)


def _shard_files(prepared_dir: str | Path, kind: str) -> list[Path]:
    folder = Path(prepared_dir) / kind
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{folder}: no Parquet shards (run `ecgray prepare` to write {kind}/)")
    return files


class ECGStore:
    """Every prepared ECG in memory: one contiguous float32 (N, 12, T) array and an ecg_id -> row index.

    ECG ids are unique per source; a store holding both PTB-XL and MIMIC ids keys them by ecg_id alone
    (PTB-XL ids are < 100,000, MIMIC study ids are 8 digits), and refuses to open if they collide.
    """

    def __init__(self, ecg_ids, signals, lead_mask, patient_ids, sources, splits, fs: int):
        self._ids = np.asarray(ecg_ids, dtype=np.int64)
        self._signals = signals  # (N, 12, T) float32
        self._lead_mask = lead_mask  # (N, 12) bool
        self._patient_ids = np.asarray(patient_ids, dtype=np.int64)
        self.sources = np.asarray(sources)
        self.splits = np.asarray(splits)
        self.fs = fs
        self._row = {int(i): r for r, i in enumerate(self._ids)}
        if len(self._row) != len(self._ids):
            ids, counts = np.unique(self._ids, return_counts=True)
            raise ValueError(f"ECG shards hold duplicated ecg_id {ids[counts > 1][:5].tolist()}")

    @classmethod
    def open(cls, prepared_dir: str | Path) -> ECGStore:
        """Load `prepared_dir/ecgs/*.parquet` once, shard by shard into one preallocated array."""
        import pyarrow.parquet as pq

        files = _shard_files(prepared_dir, "ecgs")
        meta = pq.read_table(files, columns=["ecg_id", "source", "patient_id", "fs", "lead_mask", "split"])
        fs = set(meta.column("fs").to_pylist())
        if len(fs) > 1:
            raise ValueError(f"{prepared_dir}/ecgs: shards mix sampling rates {sorted(fs)}")
        t = pq.read_schema(files[0]).field("signal").type.value_type.list_size
        signals = np.empty((meta.num_rows, 12, t), dtype=np.float32)  # (N, 12, T)
        row = 0
        for path in files:  # one shard in memory at a time besides the result
            shard = signals_from_arrow(pq.read_table(path, columns=["signal"]).column("signal"))
            if shard.shape[2] != t:
                raise ValueError(f"{path}: windows of {shard.shape[2]} samples, other shards have {t}")
            signals[row : row + len(shard)] = shard
            row += len(shard)
        mask = meta.column("lead_mask").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return cls(
            ecg_ids=meta.column("ecg_id").to_numpy(),
            signals=signals,
            lead_mask=mask.astype(bool).reshape(-1, 12),  # (N, 12)
            patient_ids=meta.column("patient_id").to_numpy(),
            sources=meta.column("source").to_pylist(),
            splits=meta.column("split").to_pylist(),
            fs=fs.pop() if fs else 0,
        )

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, ecg_id) -> bool:
        return int(ecg_id) in self._row

    @property
    def ecg_ids(self) -> np.ndarray:
        """All ecg_ids, in shard order (int64)."""
        return self._ids.copy()

    @property
    def n_samples(self) -> int:
        return self._signals.shape[2]

    def rows(self, ecg_ids) -> np.ndarray:
        """Row indices of ecg_ids; an unknown id raises KeyError naming it."""
        try:
            return np.fromiter((self._row[int(i)] for i in np.atleast_1d(ecg_ids)), dtype=np.int64)
        except KeyError as err:
            raise KeyError(f"ecg_id {err.args[0]} is not in the prepared ECGs ({len(self)} ECGs)") from None

    def signals(self, ecg_ids) -> np.ndarray:
        """float32 (B, 12, T) for the given ids (a copy)."""
        return self._signals[self.rows(ecg_ids)]

    def lead_mask(self, ecg_ids) -> np.ndarray:
        """bool (B, 12)."""
        return self._lead_mask[self.rows(ecg_ids)]

    def patient_ids(self, ecg_ids) -> np.ndarray:
        """int64 (B,)."""
        return self._patient_ids[self.rows(ecg_ids)]

    def split(self, ecg_ids) -> list[str]:
        """ECG-QA split (train/valid/test) of each id."""
        return self.splits[self.rows(ecg_ids)].tolist()


def read_qa(
    prepared_dir: str | Path, source=None, variant=None, question_types=None, ecg_splits: bool = True
) -> list[dict]:
    """QA rows (the `qa/` columns) as dicts, filtered by source, variant and question types (None = all).
    ecg_splits: also give each row `ecg_split`, the ECG-QA split of each of its ECGs (from `ecgs/`, where
    present), so a patient split can drop a sample whose ECGs lie in different splits
    (ecgray.data.episodes.straddles)."""
    import pyarrow.parquet as pq

    files = _shard_files(prepared_dir, "qa")
    filters = []
    if source is not None:
        filters.append(("source", "=", source))
    if variant is not None:
        filters.append(("variant", "=", variant))
    if question_types is not None:
        question_types = [question_types] if isinstance(question_types, str) else question_types
        filters.append(("question_type", "in", list(question_types)))
    table = pq.read_table(files, filters=filters or None, schema=qa_schema())
    rows = table.to_pylist()
    if ecg_splits and (Path(prepared_dir) / "ecgs").is_dir():
        meta = pq.read_table(_shard_files(prepared_dir, "ecgs"), columns=["ecg_id", "split"])
        split_of = dict(zip(meta.column("ecg_id").to_pylist(), meta.column("split").to_pylist(), strict=True))
        for row in rows:
            row["ecg_split"] = [split_of.get(i) for i in row["ecg_id"]]
    return rows
