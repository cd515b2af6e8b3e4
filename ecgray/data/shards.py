"""Reading `ecgray prepare`'s Parquet shards back with pyarrow alone (no Ray), from a path or a URI:
ShardRows (rows by key, read lazily), ECGStore and read_qa.

`signal` is stored as fixed_size_list<fixed_size_list<float32>[T]>[12] (the [12, T] shape lives in the type),
`lead_mask` as fixed_size_list<bool>[12].
"""

from __future__ import annotations

from collections import OrderedDict
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


def _shard_files(prepared_dir: str | Path, kind: str) -> list[str]:
    """The Parquet files of `prepared_dir/kind` (a path or URI), as paths inside its filesystem."""
    from ecgray import storage

    folder = storage.join(str(prepared_dir), kind)
    files = storage.list_files(folder, ".parquet")
    if not files:
        raise FileNotFoundError(f"{folder}: no Parquet shards (run `ecgray prepare` to write {kind}/)")
    return files


class KeyIndex:
    """Positions of int64 keys in an array, by binary search over one sorted copy (no dict per key).
    Duplicated keys are refused; `what` names the keys' home in the errors."""

    def __init__(self, keys: np.ndarray, name: str, what: str):
        self.name, self.what = name, what
        self._order = np.argsort(keys, kind="stable")
        self._sorted = np.asarray(keys, dtype=np.int64)[self._order]
        if len(self._sorted) > 1 and (dup := self._sorted[1:][self._sorted[1:] == self._sorted[:-1]]).size:
            raise ValueError(f"{what} hold duplicated {name} {np.unique(dup)[:5].tolist()}")

    def __contains__(self, key) -> bool:
        i = np.searchsorted(self._sorted, int(key))
        return bool(i < len(self._sorted) and self._sorted[i] == int(key))

    def positions(self, keys) -> np.ndarray:
        """Positions of keys in the original array; an unknown key raises KeyError naming it."""
        keys = np.atleast_1d(np.asarray(keys, dtype=np.int64))
        i = np.minimum(np.searchsorted(self._sorted, keys), max(len(self._sorted) - 1, 0))
        bad = self._sorted[i] != keys if len(self._sorted) else np.ones(len(keys), bool)
        if bad.any():
            raise KeyError(
                f"{self.name} {int(keys[bad][0])} is not in {self.what} ({len(self._sorted)} rows)"
            )
        return self._order[i]


class ShardRows:
    """The rows of the Parquet files under a folder (a path or URI), found by an int64 key without holding
    them: the key column (and `meta_columns`) of every file is read once; other columns are read on demand,
    one row group at a time, through an LRU of decoded row groups bounded by `cache_mb`. Memory is
    O(rows) for the key index and O(cache_mb) for the data, whatever the files hold."""

    def __init__(self, location: str | Path, key: str = "ecg_id", meta_columns=(), cache_mb: float = 64.0):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from ecgray import storage

        self.location, self.key = str(location), key
        self._fs, _ = storage.filesystem(self.location)
        self.files = storage.list_files(self.location, ".parquet")
        if not self.files:
            raise FileNotFoundError(f"{self.location}: no Parquet shards")
        self._handles: dict[int, pq.ParquetFile] = {}
        keys, file_of, group_of, offset_of, metas = [], [], [], [], []
        for f in range(len(self.files)):
            pf = self.parquet_file(f)
            if key not in pf.schema_arrow.names:
                raise ValueError(f"{self.files[f]}: no {key!r} column (columns {pf.schema_arrow.names})")
            table = pf.read(columns=[key, *meta_columns])
            keys.append(table.column(key).to_numpy())
            metas.append(table.select(list(meta_columns)))
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                file_of.append(np.full(n, f, dtype=np.int32))
                group_of.append(np.full(n, g, dtype=np.int32))
                offset_of.append(np.arange(n, dtype=np.int32))
        self.keys = np.concatenate(keys).astype(np.int64)  # (N,) in file order
        self.meta = pa.concat_tables(metas) if meta_columns else None
        self._file_of = np.concatenate(file_of)
        self._group_of = np.concatenate(group_of)
        self._offset_of = np.concatenate(offset_of)
        self._index = KeyIndex(self.keys, key, self.location)
        self._cache_bytes = int(cache_mb * 2**20)
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._cached = 0
        self.groups_read = 0
        """Row groups decoded so far (a bench / test reads it)."""

    def parquet_file(self, f: int):
        import pyarrow.parquet as pq

        if f not in self._handles:
            self._handles[f] = pq.ParquetFile(self._fs.open_input_file(self.files[f]))
        return self._handles[f]

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key) -> bool:
        return key in self._index

    def positions(self, keys) -> np.ndarray:
        """Row positions (file order) of keys; an unknown key raises KeyError naming it."""
        return self._index.positions(keys)

    def _group(self, f: int, g: int, columns: tuple):
        entry = (f, g, columns)
        if entry in self._cache:
            self._cache.move_to_end(entry)
            return self._cache[entry]
        table = self.parquet_file(f).read_row_group(g, columns=list(columns))
        self.groups_read += 1
        self._cache[entry] = table
        self._cached += table.nbytes
        while self._cached > self._cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.nbytes
        return table

    def read(self, keys, columns: list[str]):
        """pyarrow Table of `columns` for `keys`, in the order of keys (repeats allowed)."""
        import pyarrow as pa

        pos = self.positions(keys)
        parts, order = [], []
        where = np.stack([self._file_of[pos], self._group_of[pos]], axis=1)
        for f, g in np.unique(where, axis=0):
            sel = np.flatnonzero((where[:, 0] == f) & (where[:, 1] == g))
            group = self._group(int(f), int(g), tuple(columns))
            parts.append(group.take(pa.array(self._offset_of[pos[sel]])))
            order.append(sel)
        table = (
            pa.concat_tables(parts)
            if parts
            else self.parquet_file(0).schema_arrow.empty_table().select(columns)
        )
        if not parts:
            return table
        inverse = np.empty(len(pos), dtype=np.int64)
        inverse[np.concatenate(order)] = np.arange(len(pos))
        return table.take(pa.array(inverse))


class ECGStore:
    """The prepared ECGs by ecg_id: metadata (ids, lead masks, patients, sources, splits) in memory, signals
    read on demand from the `ecgs/` shards (`ShardRows`: only the row groups asked for, an LRU bounded in
    bytes), so a process's memory does not grow with the data set's signals. Built from arrays
    (`ECGStore(ids, signals, ...)`) it holds them in memory instead (tests, small benches).

    ECG ids are unique per source; a store holding both PTB-XL and MIMIC ids keys them by ecg_id alone
    (PTB-XL ids are < 100,000, MIMIC study ids are 8 digits), and refuses to open if they collide.
    """

    META = ["source", "patient_id", "fs", "lead_mask", "split"]
    features = None
    """The frozen encoder's precomputed outputs of these ECGs (an `ecgray.features.FeatureStore`),
    attached by train / eval: read instead of running the encoder on the signals (all leads only)."""

    def __init__(self, ecg_ids, signals, lead_mask, patient_ids, sources, splits, fs: int, n_samples=None):
        self._ids = np.asarray(ecg_ids, dtype=np.int64)
        self._signals = signals  # (N, 12, T) float32 array, or a ShardRows of the ecgs/ shards
        self._lead_mask = np.asarray(lead_mask, dtype=bool)  # (N, 12)
        self._patient_ids = np.asarray(patient_ids, dtype=np.int64)
        self.sources = np.asarray(sources)
        self.splits = np.asarray(splits)
        self.fs = fs
        self._n_samples = signals.shape[2] if n_samples is None else n_samples
        self._index = KeyIndex(self._ids, "ecg_id", "the prepared ECGs")

    @classmethod
    def open(cls, prepared_dir: str | Path, cache_mb: float = 64.0) -> ECGStore:
        """The metadata of `prepared_dir/ecgs/*.parquet` (a path or URI) now, signals when asked for."""

        from ecgray import storage

        folder = storage.join(str(prepared_dir), "ecgs")
        _shard_files(prepared_dir, "ecgs")  # the error that names `ecgray prepare`
        rows = ShardRows(folder, "ecg_id", cls.META, cache_mb)
        meta = rows.meta
        fs = set(meta.column("fs").to_pylist())
        if len(fs) > 1:
            raise ValueError(f"{folder}: shards mix sampling rates {sorted(fs)}")
        signal = [rows.parquet_file(f).schema_arrow.field("signal") for f in range(len(rows.files))]
        lengths = {field.type.value_type.list_size for field in signal}
        if len(lengths) > 1:
            raise ValueError(f"{folder}: shards hold windows of different lengths {sorted(lengths)} samples")
        mask = meta.column("lead_mask").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return cls(
            ecg_ids=rows.keys,
            signals=rows,
            lead_mask=mask.astype(bool).reshape(-1, 12),  # (N, 12)
            patient_ids=meta.column("patient_id").to_numpy(),
            sources=meta.column("source").to_pylist(),
            splits=meta.column("split").to_pylist(),
            fs=fs.pop() if fs else 0,
            n_samples=lengths.pop(),
        )

    @classmethod
    def load(cls, prepared_dir: str | Path) -> ECGStore:
        """`open`, with every signal read into one in-memory (N, 12, T) array (what encoder pretraining's
        random batches need; O(N) memory)."""
        lazy = cls.open(prepared_dir)
        return cls(
            lazy._ids, lazy.signals(lazy._ids), lazy._lead_mask, lazy._patient_ids, lazy.sources,
            lazy.splits, lazy.fs, lazy.n_samples,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, ecg_id) -> bool:
        return ecg_id in self._index

    @property
    def ecg_ids(self) -> np.ndarray:
        """All ecg_ids, in shard order (int64)."""
        return self._ids.copy()

    @property
    def n_samples(self) -> int:
        return self._n_samples

    def rows(self, ecg_ids) -> np.ndarray:
        """Row indices of ecg_ids; an unknown id raises KeyError naming it."""
        return self._index.positions(ecg_ids)

    def signals(self, ecg_ids) -> np.ndarray:
        """float32 (B, 12, T) for the given ids (a copy)."""
        rows = self.rows(ecg_ids)
        if isinstance(self._signals, np.ndarray):
            return self._signals[rows]
        column = self._signals.read(self._ids[rows], ["signal"]).column("signal")
        out = signals_from_arrow(column)
        return out if out.flags.writeable else out.copy()  # a view of Arrow's buffer is read-only

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
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ecgray import storage

    fs, _ = storage.filesystem(str(prepared_dir))
    files = _shard_files(prepared_dir, "qa")
    filters = []
    if source is not None:
        filters.append(("source", "=", source))
    if variant is not None:
        filters.append(("variant", "=", variant))
    if question_types is not None:
        question_types = [question_types] if isinstance(question_types, str) else question_types
        filters.append(("question_type", "in", list(question_types)))
    table = pq.read_table(files, filters=filters or None, schema=qa_schema(), filesystem=fs)
    rows = table.to_pylist()
    ecgs = storage.join(str(prepared_dir), "ecgs")
    if ecg_splits and storage.is_dir(ecgs) and rows:
        meta = pq.read_table(_shard_files(prepared_dir, "ecgs"), columns=["ecg_id", "split"], filesystem=fs)
        ids = meta.column("ecg_id").to_numpy()
        splits = np.asarray(meta.column("split").to_pylist(), dtype=object)
        # every row's ECG ids at once (flattened), then cut back into rows by their list lengths
        ecg_ids = table.column("ecg_id")
        want = pc.list_flatten(ecg_ids).to_numpy()
        lengths = pc.fill_null(pc.list_value_length(ecg_ids), 0).to_numpy()
        named = np.full(len(want), None, dtype=object)  # None: an ECG not in ecgs/
        if len(ids):
            order = np.argsort(ids, kind="stable")
            at = order[np.minimum(np.searchsorted(ids, want, sorter=order), len(ids) - 1)]
            found = ids[at] == want
            named[found] = splits[at[found]]
        named = named.tolist()
        ends = np.cumsum(lengths).tolist()
        for row, start, end in zip(rows, [0, *ends[:-1]], ends, strict=True):
            row["ecg_split"] = named[start:end]
    return rows
