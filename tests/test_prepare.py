"""`ecgray prepare` end to end on a small fixture tree (WFDB records written here + a small ECG-QA), and the
shards read back through ECGStore / read_qa."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ecgray.config import LEAD_NAMES, DataConfig
from ecgray.data.prepare import PrepareError, collect, prepare, read_batch, shard_size
from ecgray.data.ptbxl import record_path
from ecgray.data.shards import ECGStore, read_qa

MIMIC_ORDER = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]
CFG = dict(fs=100, window_s=2.0, read_batch_size=2, shard_rows=2)  # tiny windows: (12, 200)


def _wrsamp(path: Path, x: np.ndarray, names: list[str], fs: int) -> None:
    import wfdb

    path.parent.mkdir(parents=True, exist_ok=True)
    c = len(names)
    wfdb.wrsamp(
        path.name,
        fs=fs,
        units=["mV"] * c,
        sig_name=names,
        p_signal=x,
        fmt=["16"] * c,
        adc_gain=[1000.0] * c,
        baseline=[0] * c,
        write_dir=str(path.parent),
    )


def lead_values(ecg_id: int, names: list[str], t: int) -> np.ndarray:
    """(t, C): channel named L holds ecg_id + (canonical index of L) / 100, so placement is checkable."""
    lower = [n.lower() for n in LEAD_NAMES]
    row = [ecg_id + lower.index(n.lower()) / 100 if n.lower() in lower else -1.0 for n in names]
    return np.tile(np.asarray(row), (t, 1))


def sample(sample_id, ecg_ids, qtype="single-verify", template=1, answer=("yes",)):
    return {
        "template_id": template,
        "question_id": template * 10,
        "sample_id": sample_id,
        "question_type": qtype,
        "attribute_type": "scp_code",
        "question": f"q{sample_id}?",
        "answer": list(answer),
        "ecg_id": ecg_ids,
        "attribute": None if qtype.startswith("comparison") else ["x"],
    }


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """PTB-XL ids 1-5 and 7 (5 has no record, 7 a truncated .dat), 6 absent from the database; MIMIC studies
    40000001-2; ECG-QA for both."""
    root = tmp_path_factory.mktemp("prep")
    ptb, qa, mimic = root / "ptbxl", root / "ecgqa", root / "mimic"
    ptb.mkdir()
    rows = ["ecg_id,patient_id,age,sex,scp_codes,heart_axis,static_noise,strat_fold"]
    for i in (1, 2, 3, 4, 5, 7):
        rows.append(f'{i},{100 + i}.0,{50 + i},1,"{{\'NORM\': 100.0}}",MID," , I-AVF,  ",{i}')
    (ptb / "ptbxl_database.csv").write_text("\n".join(rows) + "\n")
    _wrsamp(record_path(ptb, 1), lead_values(1, LEAD_NAMES, 500), LEAD_NAMES, 100)
    names2 = [n.lower() for n in LEAD_NAMES] + ["vx", "vy", "vz"]  # lower case + Frank leads
    _wrsamp(record_path(ptb, 2), lead_values(2, names2, 500), names2, 100)
    x3 = lead_values(3, LEAD_NAMES, 2000)
    x3[100:104, 3] = np.nan  # 4 NaN samples in aVR
    _wrsamp(record_path(ptb, 3), x3, LEAD_NAMES, 400)
    _wrsamp(
        record_path(ptb, 4), lead_values(4, ["I", "II", "V1"], 1000), ["I", "II", "V1"], 500
    )  # missing leads
    _wrsamp(record_path(ptb, 7), lead_values(7, LEAD_NAMES, 500), LEAD_NAMES, 100)
    with open(str(record_path(ptb, 7)) + ".dat", "r+b") as f:
        f.truncate(5000)
    # 5: in the database, no record on disk; 6: referenced, not in the database
    v = qa / "ptbxl"
    for variant in ("template", "paraphrased"):
        (v / variant / "train").mkdir(parents=True)
        (v / variant / "test").mkdir(parents=True)
        train = [
            sample(0, [1]),
            sample(1, [2], answer=("no",)),
            sample(2, [3]),
            sample(3, [5]),
            sample(4, [6]),
            sample(5, [7]),
        ]
        test = [sample(10, [4, 1], "comparison_irrelevant-query", 69, ("qrs duration",))]
        (v / variant / "train" / "0.json").write_text(json.dumps(train))
        (v / variant / "test" / "10.json").write_text(json.dumps(test))
    (v / "train_ecgs.tsv").write_text("0\t1\n1\t2\n2\t3\n3\t5\n4\t6\n5\t7\n")
    (v / "test_ecgs.tsv").write_text("0\t4\n")
    m = qa / "mimic-iv-ecg" / "template" / "test"
    m.mkdir(parents=True)
    (m / "20.json").write_text(
        json.dumps([sample(20, [40000001, 40000002], "comparison_irrelevant-query", 68)])
    )
    mimic.mkdir()
    (mimic / "record_list.csv").write_text(
        "subject_id,study_id,file_name,ecg_time,path\n"
        "7,40000001,40000001,2150-01-01 10:00:00,files/p1000/p7/s40000001/40000001\n"
        "8,40000002,40000002,2150-01-02 10:00:00,files/p1000/p8/s40000002/40000002\n"
    )
    for study in (40000001, 40000002):
        _wrsamp(
            mimic / f"files/p1000/p{study - 39999994}/s{study}/{study}",
            lead_values(7, MIMIC_ORDER, 1000),
            MIMIC_ORDER,
            500,
        )
    return root


def cfg_for(tree: Path, **kw) -> DataConfig:
    return DataConfig(ptbxl_dir=str(tree / "ptbxl"), ecgqa_dir=str(tree / "ecgqa"), **{**CFG, **kw})


def test_collect_lists_ids_without_metadata_and_skips_sources_without_records(tree):
    samples, items, failures, skipped, _ = collect(cfg_for(tree))
    assert [i["ecg_id"] for i in items] == [1, 2, 3, 4, 5, 7]
    assert [(f["ecg_id"], f["reason"]) for f in failures] == [(6, "not in ptbxl_database.csv")]
    assert "mimic" in skipped and "--mimic" in skipped["mimic"]
    assert len(samples) == 14  # 7 samples x 2 variants, PTB-XL only
    assert {i["ecg_id"]: i["split"] for i in items} == {
        1: "train",
        2: "train",
        3: "train",
        4: "test",
        5: "train",
        7: "train",
    }
    assert json.loads(items[0]["metadata"])["static_noise"] == LEAD_NAMES[:6]


def test_read_batch_without_ray(tree):
    _, items, _, _, _ = collect(cfg_for(tree))
    batch = {
        k: np.asarray([it[k] for it in items], dtype=object if k != "ecg_id" else np.int64) for k in items[0]
    }
    table = read_batch(batch, asdict(cfg_for(tree)))
    rows = table.select(["ecg_id", "error", "error_kind", "nan_count"]).to_pylist()
    assert [r["error"] is None for r in rows] == [True, True, True, True, False, False]
    assert rows[4]["error_kind"] == "missing" and "00005_hr.hea not found" in rows[4]["error"]
    assert rows[5]["error_kind"] == "corrupt" and "00007_hr.dat is truncated (5000 bytes" in rows[5]["error"]
    assert rows[2]["nan_count"] == 4


@pytest.mark.slow
def test_prepare_end_to_end(tree, ray_session, tmp_path):
    out = tmp_path / "prepared"
    cfg = cfg_for(tree, mimic_dir=str(tree / "mimic"))
    report = prepare(cfg, out, progress=False)
    assert report["records"]["read"] == 6 and report["records"]["failed"] == 3
    assert report["records"]["referenced"] == 9 and report["records"]["by_reader"] == {"fast": 6}
    assert {(f["ecg_id"], f["kind"]) for f in report["failures"]} == {
        (5, "missing"),
        (6, "missing"),
        (7, "corrupt"),
    }
    assert report["nan"] == {
        "policy": "interpolate",
        "records_with_nan": 1,
        "nan_samples": 4,
        "per_record": {"ptbxl/3": 4},
    }
    # samples 3, 4 and 5 need the failed ECGs 5, 6 and 7, in both variants
    assert report["qa"]["dropped_missing_ecg"] == 6 and report["qa"]["rows"] == 9
    assert report["qa"]["by"]["ptbxl/paraphrased/train/single-verify"] == 3
    assert report["qa"]["by"]["mimic/template/test/comparison_irrelevant-query"] == 1
    assert json.loads((out / "report.json").read_text())["records"] == report["records"]
    # 8 records on 4 CPUs: one record a shard (below data.shard_rows=2); no file for the 2 failed ones
    assert report["records"]["shard_rows"] == 1 and report["records"]["shards"] == 6
    assert sorted(p.name for p in (out / "ecgs").iterdir()) == [f"part-{i:05d}.parquet" for i in range(6)]

    # shards read back with pyarrow alone
    table = pq.read_table(out / "ecgs")
    assert (
        table.column("signal").type.list_size == 12
        and table.column("signal").type.value_type.list_size == 200
    )
    store = ECGStore.open(out)
    assert sorted(store.ecg_ids.tolist()) == [1, 2, 3, 4, 40000001, 40000002]
    x = store.signals([2, 1, 40000001])
    assert x.shape == (3, 12, 200) and x.dtype == np.float32 and x.flags.c_contiguous
    expect = np.arange(12) / 100
    assert np.allclose(x[0, :, 0], 2 + expect, atol=1e-3)  # lower-case names, vx/vy/vz dropped
    assert np.allclose(x[1, :, 50], 1 + expect, atol=1e-3)
    assert np.allclose(x[2, :, 7], 7 + expect, atol=1e-3)  # MIMIC order: aVF/aVL back in place
    assert np.allclose(store.signals([3])[0, 3, :], 3.03, atol=1e-3)  # 400 Hz resampled, NaN interpolated
    assert store.lead_mask([4])[0].tolist() == [n in ("I", "II", "V1") for n in LEAD_NAMES]
    assert store.patient_ids([1, 4, 40000002]).tolist() == [101, 104, 8]
    assert store.split([1, 4]) == ["train", "test"]
    with pytest.raises(KeyError, match="ecg_id 5 is not in the prepared ECGs"):
        store.signals([1, 5])
    meta = json.loads(table["metadata"][table["ecg_id"].to_pylist().index(1)].as_py())
    assert meta["age"] == 51 and meta["scp_codes"] == {"NORM": 100.0} and meta["heart_axis"] == "MID"

    qa = read_qa(out, source="ptbxl", variant="template")
    assert sorted(r["sample_id"] for r in qa) == [0, 1, 2, 10]
    comparison = [r for r in qa if r["sample_id"] == 10][0]
    assert (
        comparison["ecg_id"] == [4, 1] and comparison["attribute"] is None and comparison["split"] == "test"
    )
    assert len(read_qa(out, question_types=["single-verify"])) == 6
    assert len(read_qa(out, source="mimic")) == 1

    # re-run: the same shards, the output replaced whole, no temporary directories left behind
    first = {p.name: pq.read_table(p) for p in (out / "ecgs").iterdir()}
    prepare(cfg, out, progress=False)
    second = {p.name: pq.read_table(p) for p in (out / "ecgs").iterdir()}
    assert first.keys() == second.keys() and all(first[k].equals(second[k]) for k in first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


@pytest.mark.slow
def test_prepare_strict_fails_and_leaves_nothing(tree, ray_session, tmp_path):
    out = tmp_path / "prepared"
    with pytest.raises(
        PrepareError,
        match=r"--strict: 3 records missing or corrupt: .*00005_hr.hea not found.*"
        r"not in ptbxl_database.csv.*00007_hr.dat is truncated",
    ):
        prepare(cfg_for(tree), out, strict=True, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_strict_exit_code_and_message(tree, ray_session, tmp_path, capsys):
    from ecgray.cli import main

    args = [
        "prepare",
        "--ptbxl",
        str(tree / "ptbxl"),
        "--ecgqa",
        str(tree / "ecgqa"),
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
        "--set",
        "data.fs=100",
        "data.window_s=2.0",
    ]
    assert main(args + ["--strict"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("ecgray prepare: --strict: 3 records missing or corrupt: record ")
        and "00005_hr" in err
    )
    assert not (tmp_path / "o").exists()
    assert main(args) == 0
    assert "prepared 4 ECGs (3 missing or corrupt" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "report.json").read_text())["config"]["fs"] == 100


def test_refuses_to_replace_a_foreign_directory(tree, tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(PrepareError, match="is not a prepared directory"):
        prepare(cfg_for(tree), tmp_path / "home", progress=False)
    assert (tmp_path / "home" / "notes.txt").read_text() == "mine"


def test_help_works(capsys):
    from ecgray.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--help"])
    assert exit_info.value.code == 0 and "--strict" in capsys.readouterr().out


@pytest.mark.parametrize("ecgqa_dir", ["ecgqa", "ecgqa/ptbxl"])
def test_collect_on_the_real_ecgqa_samples(shared_data, tmp_path, ecgqa_dir):
    """The real ECG-QA layout, given as its root (the MIMIC version then skipped: no --mimic) or as its
    ptbxl/ folder (PTB-XL only)."""
    (tmp_path / "ptbxl").mkdir()
    (tmp_path / "ptbxl" / "ptbxl_database.csv").write_bytes(
        (shared_data / "ptbxl" / "ptbxl_database_subset.csv").read_bytes()
    )
    cfg = DataConfig(ptbxl_dir=str(tmp_path / "ptbxl"), ecgqa_dir=str(shared_data / ecgqa_dir))
    samples, items, failures, skipped, unparsed = collect(cfg)
    assert len(samples) == 2 * (10_000 + 2146) and unparsed == 2
    assert list(skipped) == (["mimic"] if ecgqa_dir == "ecgqa" else [])
    # 6,018 distinct ECGs referenced; 2,355 of them are among the 8,988 database rows of the sample
    assert len(items) == 2355 and len(failures) == 6018 - 2355
    assert {f["reason"] for f in failures} == {"not in ptbxl_database.csv"}
    assert {i["split"] for i in items} == {"train", "test"}
    item = next(i for i in items if i["ecg_id"] == 8)
    assert item["path"].endswith("records500/00000/00008_hr") and item["patient_id"] == 11275
    meta = json.loads(item["metadata"])
    assert (
        meta["baseline_drift"] == ["II", "aVF"]
        and meta["height"] is None
        and meta["scp_codes"]["IMI"] == 35.0
    )


def test_ecgstore_and_read_qa_on_hand_written_shards(tmp_path):
    import pyarrow as pa

    from ecgray.data.shards import ecg_schema, qa_schema, signals_to_arrow

    (tmp_path / "ecgs").mkdir()
    (tmp_path / "qa").mkdir()
    x = np.arange(3 * 12 * 4, dtype=np.float32).reshape(3, 12, 4)  # (B, 12, T)
    mask = np.ones((3, 12), dtype=bool)
    mask[1, 5] = False
    for part, rows in enumerate([[0, 1], [2]]):
        table = pa.table(
            {
                "ecg_id": pa.array([10 + r for r in rows], pa.int64()),
                "source": ["ptbxl"] * len(rows),
                "patient_id": pa.array([100 + r for r in rows], pa.int64()),
                "fs": pa.array([500] * len(rows), pa.int32()),
                "signal": signals_to_arrow(x[rows]),
                "lead_mask": pa.FixedSizeListArray.from_arrays(pa.array(mask[rows].reshape(-1)), 12),
                "split": ["train"] * len(rows),
                "nan_count": pa.array([0] * len(rows), pa.int32()),
                "metadata": ["{}"] * len(rows),
            },
            schema=ecg_schema(4),
        )
        pq.write_table(table, tmp_path / "ecgs" / f"part-{part:05d}.parquet")
    store = ECGStore.open(tmp_path)
    assert store.ecg_ids.tolist() == [10, 11, 12] and store.n_samples == 4 and len(store) == 3
    assert np.array_equal(store.signals([12, 10]), x[[2, 0]])
    assert store.lead_mask([11])[0, 5] == False and store.lead_mask([11]).sum() == 11  # noqa: E712
    assert store.patient_ids([11]).tolist() == [101]
    with pytest.raises(KeyError, match="ecg_id 99 is not in the prepared ECGs"):
        store.lead_mask([10, 99])
    rows = [
        {
            "sample_id": i,
            "template_id": 1,
            "question_id": 2,
            "question_type": qt,
            "attribute_type": "noise",
            "question": "q",
            "answer": ["no"],
            "ecg_id": [10] if qt.startswith("single") else [10, 11],
            "attribute": ["x"] if qt.startswith("single") else None,
            "source": "ptbxl",
            "variant": v,
            "split": "train",
        }
        for i, (qt, v) in enumerate(
            [
                ("single-verify", "template"),
                ("single-query", "template"),
                ("comparison_irrelevant-query", "paraphrased"),
            ]
        )
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=qa_schema()), tmp_path / "qa" / "x.parquet")
    assert read_qa(tmp_path, ecg_splits=False) == rows
    # by default each row also names the ECG-QA split of each of its ECGs (the patient split checks both)
    assert read_qa(tmp_path) == [{**r, "ecg_split": ["train"] * len(r["ecg_id"])} for r in rows]
    assert [r["sample_id"] for r in read_qa(tmp_path, variant="template", question_types="single-query")] == [
        1
    ]
    assert read_qa(tmp_path, source="mimic") == []
    with pytest.raises(FileNotFoundError, match="run `ecgray prepare`"):
        ECGStore.open(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"fs": 20}, r"data.fs=20: expected 50-10000 Hz"),
        ({"read_batch_size": 0}, r"data.read_batch_size=0: expected >= 1"),
        ({"leads": ["I", "V7"]}, r"data.leads=\['I', 'V7'\]: expected names among"),
    ],
)
def test_config_values_checked_before_any_work(tree, tmp_path, change, message):
    with pytest.raises(PrepareError, match=message):
        prepare(cfg_for(tree, **change), tmp_path / "o", progress=False)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Shards written by the Ray Data workers; the driver sees status rows only


def _files(root: Path) -> dict[str, bytes]:
    """relative path -> bytes of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_shard_writes_small_row_groups_and_returns_status_only(tree, tmp_path, monkeypatch):
    """One worker task, run here without Ray: 3 records read at a time, row groups of 2 (the constant
    lowered), the 2 failed records left out of the file and reported in the status rows."""
    import ecgray.data.prepare as prep

    monkeypatch.setattr(prep, "ECG_ROW_GROUP_ROWS", 2)
    cfg = cfg_for(tree, read_batch_size=3)
    items = collect(cfg).items  # ecg_ids 1, 2, 3, 4, 5 (missing), 7 (corrupt)
    batch = {"shard": np.array([7]), "items": np.array([json.dumps(items)], dtype=object)}
    status = prep.write_shard(batch, asdict(cfg), str(tmp_path))
    assert status.column_names == prep.STATUS_COLUMNS and "signal" not in status.column_names
    assert status.column("ecg_id").to_pylist() == [1, 2, 3, 4, 5, 7]
    assert status.column("error_kind").to_pylist() == [None] * 4 + ["missing", "corrupt"]
    assert set(status.column("shard").to_pylist()) == {7}
    meta = pq.read_metadata(tmp_path / "ecgs" / "task-00007.parquet")
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [2, 2]
    table = pq.read_table(tmp_path / "ecgs" / "task-00007.parquet")
    assert (
        table.column("ecg_id").to_pylist() == [1, 2, 3, 4]
        and table.schema.field("signal").type.list_size == 12
    )
    # a shard whose records all failed writes no file
    failed = {"shard": np.array([8]), "items": np.array([json.dumps(items[4:])], dtype=object)}
    assert prep.write_shard(failed, asdict(cfg), str(tmp_path)).num_rows == 2
    assert sorted(p.name for p in (tmp_path / "ecgs").iterdir()) == ["task-00007.parquet"]


def test_shard_size_keeps_every_cpu_busy_and_caps_at_shard_rows():
    cfg = DataConfig(shard_rows=1024)
    # 16 CPUs: at least 4 shards each while the records allow, never more than data.shard_rows ECGs a shard
    assert [shard_size(n, cfg, 16) for n in (1, 100, 16_000, 100_000)] == [1, 2, 250, 1024]
    assert shard_size(10, DataConfig(shard_rows=2), 1) == 2


@pytest.mark.slow
def test_driver_receives_status_rows_not_signals(tree, ray_session, tmp_path, monkeypatch):
    """Every table that reaches the driver is the small status of each record: no signal column, and far
    fewer bytes than the records' signals (12 x 200 float32 = 9,600 bytes each here)."""
    import ecgray.data.prepare as prep

    received = []
    pipeline = prep.write_ecgs

    def counted(*args, **kwargs):
        for table in pipeline(*args, **kwargs):
            received.append((table.column_names, table.num_rows, table.nbytes))
            yield table

    monkeypatch.setattr(prep, "write_ecgs", counted)
    report = prepare(cfg_for(tree, mimic_dir=str(tree / "mimic")), tmp_path / "out", progress=False)
    assert report["records"]["read"] == 6
    assert sum(rows for _, rows, _ in received) == 8  # every record read once, its status back
    assert all(names == prep.STATUS_COLUMNS for names, _, _ in received)
    signal_bytes = 8 * 12 * 200 * 4
    assert sum(nbytes for _, _, nbytes in received) < signal_bytes / 8
    assert pq.read_table(tmp_path / "out" / "ecgs").num_rows == 6


@pytest.mark.slow
def test_uri_output_round_trips_through_a_file_uri(tree, ray_session, tmp_path):
    """--out as a file:// URI takes the object-store path (staging inside, report.json last): the same
    shards as a local output, read back with pyarrow through the URI's filesystem; re-runs replace it."""
    import pyarrow.fs as pafs

    cfg = cfg_for(tree, mimic_dir=str(tree / "mimic"))
    local = prepare(cfg, tmp_path / "local", progress=False)
    uri = f"file://{tmp_path}/bucket/prepared/"
    report = prepare(cfg, uri, progress=False)
    out = tmp_path / "bucket" / "prepared"
    assert report["inputs"]["out"] == f"file://{out}" and report["commit"] == "report.json written last"
    assert sorted(p.name for p in out.iterdir()) == ["ecgs", "qa", "report.json"]  # no staging left
    assert json.loads((out / "report.json").read_text())["records"] == report["records"] == local["records"]
    fs, path = pafs.FileSystem.from_uri(uri)
    for kind in ("ecgs", "qa"):
        names = sorted(p.name for p in (tmp_path / "local" / kind).iterdir())
        assert sorted(p.name for p in (out / kind).iterdir()) == names
        for name in names:
            back = pq.read_table(f"{path.rstrip('/')}/{kind}/{name}", filesystem=fs)
            assert back.equals(pq.read_table(tmp_path / "local" / kind / name)), name
    ecgs = pq.read_table(f"{path.rstrip('/')}/ecgs", filesystem=fs)
    assert sorted(ecgs.column("ecg_id").to_pylist()) == [1, 2, 3, 4, 40000001, 40000002]
    meta = pq.read_metadata(out / "ecgs" / "part-00000.parquet")
    assert all(meta.row_group(g).num_rows <= 64 for g in range(meta.num_row_groups))
    # a re-run replaces the output whole (what later stages derived from the old shards goes too)
    first = _files(out)
    (out / "features").mkdir()
    (out / "features" / "part-0.parquet").write_bytes(b"derived from the old shards")
    prepare(cfg, uri, progress=False)
    again = _files(out)
    assert first.keys() == again.keys()
    assert all(first[k] == again[k] for k in first if k.endswith(".parquet"))
    # --strict into a new URI: an error, and nothing written (not even the folder)
    with pytest.raises(PrepareError, match="--strict: 3 records missing or corrupt"):
        prepare(cfg, f"file://{tmp_path}/bucket/strict", strict=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "bucket").iterdir()) == ["prepared"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["path", "uri"])
def test_a_failure_in_the_middle_leaves_the_old_output_intact(tree, ray_session, tmp_path, monkeypatch, kind):
    """The workers have written every shard to staging when writing the QA tables fails: the old output is
    byte for byte as it was, and no staging is left behind."""
    import ecgray.data.prepare as prep

    out = tmp_path / "prepared"
    target = str(out) if kind == "path" else f"file://{out}"
    cfg = cfg_for(tree)
    prepare(cfg, target, progress=False)
    before = _files(out)
    staged = []

    def failing_write_qa(staging, samples, ok):
        staged.extend(sorted(p.name for p in (Path(staging.removeprefix("file://")) / "ecgs").iterdir()))
        raise OSError("disk full")

    monkeypatch.setattr(prep, "_write_qa", failing_write_qa)
    with pytest.raises(OSError, match="disk full"):
        prepare(cfg_for(tree, fs=200), target, progress=False)  # a different window: different shards
    assert staged and all(name.startswith("task-") for name in staged)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]
    assert sorted(p.name for p in out.iterdir()) == ["ecgs", "qa", "report.json"]


@pytest.mark.slow
def test_an_interrupted_uri_commit_reads_as_not_prepared_and_a_rerun_completes_it(
    tree, ray_session, tmp_path, monkeypatch, capsys
):
    from ecgray import storage

    out = tmp_path / "prepared"
    cfg = cfg_for(tree)
    prepare(cfg, f"file://{out}", progress=False)
    complete = _files(out)
    move, calls = storage.move, []

    def failing_move(source, destination):
        calls.append(destination)
        if len(calls) == 2:
            raise OSError("connection reset")
        move(source, destination)

    monkeypatch.setattr(storage, "move", failing_move)
    with pytest.raises(OSError, match="connection reset"):
        prepare(cfg, f"file://{out}", progress=False)
    assert not (out / "report.json").exists()  # not prepared: readers must not use it
    assert [p.name for p in out.iterdir() if p.name.startswith("_staging")] == []
    monkeypatch.setattr(storage, "move", move)
    (out / "_staging-deadbeef" / "ecgs").mkdir(parents=True)  # what a killed run leaves behind
    capsys.readouterr()
    prepare(cfg, f"file://{out}", progress=False)  # a folder holding only prepare's own names is replaced
    assert "holds the staging folders of interrupted runs (_staging-deadbeef)" in capsys.readouterr().err
    assert (out / "_staging-deadbeef").is_dir()  # maybe another run's: named, not deleted
    shutil.rmtree(out / "_staging-deadbeef")
    again = _files(out)
    assert again.keys() == complete.keys()
    assert all(again[k] == complete[k] for k in complete if k.endswith(".parquet"))


# ---------------------------------------------------------------------------------------------------------
# --ecgqa: the ECG-QA root or one of its version folders


def test_ecgqa_version_folder_is_accepted_for_its_own_source(tree):
    root = collect(cfg_for(tree, mimic_dir=str(tree / "mimic")))
    ptb = collect(
        DataConfig(ptbxl_dir=str(tree / "ptbxl"), mimic_dir=str(tree / "mimic"),
                   ecgqa_dir=str(tree / "ecgqa" / "ptbxl"), **CFG)
    )  # fmt: skip
    assert ptb.items == [i for i in root.items if i["source"] == "ptbxl"]
    assert ptb.samples == [s for s in root.samples if s["source"] == "ptbxl"] and len(ptb.samples) == 14
    assert ptb.skipped == {} and [f["ecg_id"] for f in ptb.failures] == [6]
    mimic = collect(DataConfig(mimic_dir=str(tree / "mimic"), ecgqa_dir=str(tree / "ecgqa" / "mimic-iv-ecg")))
    assert [i["ecg_id"] for i in mimic.items] == [40000001, 40000002] and len(mimic.samples) == 1
    # the version folder without its records: the skip reason names the flag to pass
    with pytest.raises(PrepareError, match=r"mimic-iv-ecg is present but no --mimic DIR was given"):
        collect(DataConfig(ptbxl_dir=str(tree / "ptbxl"), ecgqa_dir=str(tree / "ecgqa" / "mimic-iv-ecg")))


def test_ecgqa_root_and_ptbxl_folder_of_the_synthetic_world_collect_the_same(tmp_path):
    """`ecgray synth` writes WORLD/ecgqa/ptbxl: --ecgqa WORLD/ecgqa and WORLD/ecgqa/ptbxl both work, and
    WORLD itself (the folder a user is likely to pass) is refused naming WORLD/ecgqa."""
    from ecgray.synth.world import generate_world

    world = tmp_path / "world"
    generate_world(world, 10, seed=0, progress=False)
    runs = [
        collect(DataConfig(ptbxl_dir=str(world / "ptbxl"), ecgqa_dir=str(world / q), record_fs=100))
        for q in ("ecgqa", "ecgqa/ptbxl")
    ]
    assert runs[0] == runs[1] and len(runs[0].samples) > 1000 and runs[0].items and not runs[0].failures
    with pytest.raises(
        PrepareError, match=rf"found ecgqa/, ptbxl/.*{re.escape(str(world / 'ecgqa'))} is an ECG-QA"
    ):
        collect(DataConfig(ptbxl_dir=str(world / "ptbxl"), ecgqa_dir=str(world), record_fs=100))


@pytest.mark.parametrize(
    "where, found, hint",
    [
        ("ecgqa/ptbxl/template", "found test/, train/", r"It is a template/ folder inside a version folder: "
         r"pass \S*ecgqa/ptbxl\."),
        ("ptbxl", "found ptbxl_database.csv, records500/", r"looks like the PTB-XL data set: pass it as --ptbxl"),
        ("renamed", "found paraphrased/, t", r"under the name 'renamed': ECG-QA v1.0.2 names them 'ptbxl' and "
         r"'mimic-iv-ecg'"),
        ("", "found ecgqa/, mimic/, ptbxl/", r"\S*/ecgqa is an ECG-QA root: pass it\.$"),
        ("empty", "found nothing", r"expected the ECG-QA root \(holding ptbxl/ and/or mimic-iv-ecg/\) or one of"),
    ],
)  # fmt: skip
def test_a_wrong_ecgqa_folder_names_what_was_found_and_what_to_pass(tree, tmp_path, where, found, hint):
    folder = tree / where
    if where == "renamed":
        folder = tmp_path / "renamed"
        shutil.copytree(tree / "ecgqa" / "ptbxl", folder)
    elif where == "empty":
        folder = tmp_path / "empty"
        folder.mkdir()
    with pytest.raises(PrepareError) as err:
        collect(DataConfig(ptbxl_dir=str(tree / "ptbxl"), ecgqa_dir=str(folder)))
    message = str(err.value)
    assert message.startswith(f"ECG-QA folder {folder} (--ecgqa): {found}"), message
    assert re.search(hint, message), message


def test_cli_wrong_ecgqa_folder_exits_1_before_any_reading(tree, tmp_path, capsys):
    from ecgray.cli import main

    code = main(["prepare", "--ptbxl", str(tree / "ptbxl"), "--ecgqa", str(tree / "ptbxl"),
                 "--out", str(tmp_path / "o"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"ecgray prepare: ECG-QA folder {tree / 'ptbxl'} (--ecgqa): found ")
    assert "pass it as --ptbxl" in err and not (tmp_path / "o").exists()


def test_inputs_given_as_uris_are_refused_by_name(tree, tmp_path):
    with pytest.raises(PrepareError, match=r"--ecgqa s3://b/ecgqa: inputs are read as local paths"):
        collect(DataConfig(ptbxl_dir=str(tree / "ptbxl"), ecgqa_dir="s3://b/ecgqa"))


def test_refuses_to_replace_a_foreign_uri_folder(tree, tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(
        PrepareError, match=r"is not a prepared directory \(no report.json, ecgs/ or qa/; holds notes.txt\)"
    ):
        prepare(cfg_for(tree), f"file://{tmp_path}/home", progress=False)
    assert (tmp_path / "home" / "notes.txt").read_text() == "mine"
