"""ShardRows / ECGStore read rows lazily by key from Parquet shards at a path or a URI."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ecgray.data.shards import ECGStore, ShardRows, ecg_schema, signals_to_arrow


def write_ecgs(folder, n: int, t: int = 20, files: int = 3, row_group: int = 4, seed: int = 0):
    """n ECGs over `files` shards of row groups of `row_group` rows; -> (ids, signals, masks)."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(1000, 1000 + 3 * n, 3))[:n].astype(np.int64)  # unsorted, gapped
    signals = rng.standard_normal((n, 12, t)).astype(np.float32)
    masks = rng.random((n, 12)) > 0.2
    folder.mkdir(parents=True)
    for f, part in enumerate(np.array_split(np.arange(n), files)):
        table = pa.table(
            {
                "ecg_id": pa.array(ids[part]),
                "source": pa.array(["ptbxl"] * len(part)),
                "patient_id": pa.array(ids[part] // 2),
                "fs": pa.array([100] * len(part), pa.int32()),
                "signal": signals_to_arrow(signals[part]),
                "lead_mask": pa.FixedSizeListArray.from_arrays(pa.array(masks[part].reshape(-1)), 12),
                "split": pa.array(["train" if i % 2 else "test" for i in part]),
                "nan_count": pa.array([0] * len(part), pa.int32()),
                "metadata": pa.array(["{}"] * len(part)),
            },
            schema=ecg_schema(t),
        )
        pq.write_table(table, folder / f"part-{f:05d}.parquet", row_group_size=row_group)
    return ids, signals, masks


def test_shard_rows_reads_only_the_row_groups_asked_for(tmp_path):
    ids, signals, _ = write_ecgs(tmp_path / "ecgs", 30)
    rows = ShardRows(tmp_path / "ecgs")
    assert len(rows) == 30 and ids[7] in rows and 5 not in rows
    want = [ids[7], ids[0], ids[29], ids[7]]  # any order, repeats allowed
    table = rows.read(want, ["ecg_id", "signal"])
    assert table.column("ecg_id").to_pylist() == [int(i) for i in want]
    assert rows.groups_read <= 3  # rows 0, 7 and 29 lie in at most three row groups of 4
    with pytest.raises(KeyError, match="ecg_id 5 is not in"):
        rows.read([ids[0], 5], ["signal"])


def test_shard_rows_cache_is_bounded(tmp_path):
    ids, _, _ = write_ecgs(tmp_path / "ecgs", 40, t=200)
    rows = ShardRows(tmp_path / "ecgs", cache_mb=0.05)  # ~50 kB: about one row group of 4 x 12 x 200 float32
    for i in ids:
        rows.read([i], ["signal"])
    assert rows._cached <= max(rows._cache_bytes, max(t.nbytes for t in rows._cache.values()))
    assert len(rows._cache) <= 2


def test_ecg_store_reads_signals_lazily_and_matches_the_arrays(tmp_path):
    ids, signals, masks = write_ecgs(tmp_path / "ecgs", 25)
    store = ECGStore.open(tmp_path)
    assert len(store) == 25 and store.fs == 100 and store.n_samples == 20
    assert store._signals.groups_read == 0  # nothing but metadata read on open
    pick = [ids[3], ids[24], ids[3]]
    index = [3, 24, 3]
    np.testing.assert_array_equal(store.signals(pick), signals[index])  # stored bits, exactly
    np.testing.assert_array_equal(store.lead_mask(pick), masks[index])
    assert store.split(pick) == ["train" if i % 2 else "test" for i in index]
    with pytest.raises(KeyError, match="ecg_id 1 is not in the prepared ECGs"):
        store.signals([1])


def test_ecg_store_opens_a_file_uri(tmp_path):
    ids, signals, _ = write_ecgs(tmp_path / "ecgs", 10)
    store = ECGStore.open(f"file://{tmp_path}")
    np.testing.assert_array_equal(store.signals([ids[9]]), signals[[9]])


def test_ecg_store_refuses_duplicated_ids(tmp_path):
    write_ecgs(tmp_path / "a" / "ecgs", 6, seed=1)
    write_ecgs(tmp_path / "b", 6, seed=1)
    (tmp_path / "b" / "part-00000.parquet").rename(tmp_path / "a" / "ecgs" / "part-00009.parquet")
    with pytest.raises(ValueError, match="duplicated ecg_id"):
        ECGStore.open(tmp_path / "a")


def test_read_qa_names_the_split_of_each_ecg_of_a_row(tmp_path):
    from ecgray.data.shards import qa_schema, read_qa

    ids, _, _ = write_ecgs(tmp_path / "ecgs", 9, files=2)
    split_of = {int(i): "train" if k % 2 else "test" for k, i in enumerate(ids)}  # as write_ecgs writes it
    asked = [[int(ids[0])], [int(ids[3]), int(ids[4])], [7], [int(ids[8]), 7], [int(ids[5])]]  # 7: no ECG
    (tmp_path / "qa").mkdir()
    pq.write_table(
        pa.table(
            {
                "sample_id": list(range(len(asked))),
                "template_id": [1] * len(asked),
                "question_id": [1] * len(asked),
                "question_type": ["single-verify"] * len(asked),
                "attribute_type": ["scp_code"] * len(asked),
                "question": ["q"] * len(asked),
                "answer": [["yes"]] * len(asked),
                "ecg_id": asked,
                "attribute": [["a"]] * len(asked),
                "source": ["ptbxl"] * len(asked),
                "variant": ["paraphrased"] * len(asked),
                "split": ["test"] * len(asked),
            },
            schema=qa_schema(),
        ),
        tmp_path / "qa" / "part-00000.parquet",
    )
    rows = read_qa(tmp_path)
    assert [r["ecg_id"] for r in rows] == asked
    assert [r["ecg_split"] for r in rows] == [[split_of.get(i) for i in ecgs] for ecgs in asked]
    assert rows[2]["ecg_split"] == [None] and rows[1]["ecg_split"] == [
        split_of[int(ids[3])],
        split_of[int(ids[4])],
    ]
    assert "ecg_split" not in read_qa(tmp_path, ecg_splits=False)[0]
