"""PTB-XL metadata (real sample rows), WFDB records through wfdb and the fast numpy path, MIMIC record lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ecgray.config import LEAD_NAMES, DataConfig
from ecgray.data.ptbxl import (
    HeaderCache,
    RecordError,
    mimic_record_path,
    parse_noise_leads,
    read_database,
    read_mimic_record_list,
    read_record,
    read_record_fast,
    read_statements,
    record_path,
)

ALL = list(LEAD_NAMES)
MIMIC_ORDER = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]


def write_record(
    path: Path, x: np.ndarray, names: list[str], fs: float, fmt: str = "16", gain=1000.0, base=0
):
    """A WFDB record via wfdb.wrsamp; x (T, C) in mV (NaN allowed)."""
    import wfdb

    path.parent.mkdir(parents=True, exist_ok=True)
    c = x.shape[1]
    wfdb.wrsamp(
        path.name,
        fs=fs,
        units=["mV"] * c,
        sig_name=names,
        p_signal=x,
        fmt=[fmt] * c,
        adc_gain=[gain] * c,
        baseline=[base] * c,
        write_dir=str(path.parent),
    )
    return path


def signal(t: int, c: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.5, (t, c)).round(3)


@pytest.mark.parametrize(
    "value, leads",
    [
        (" , I-V1,  ", ALL[:7]),
        (" , II,AVF", ["II", "aVF"]),
        ("v1-6,  ", ALL[6:]),
        (" , V5,6", ["V5", "V6"]),
        ("v4,6", ["V4", "V6"]),
        ("I - AVF", ALL[:6]),
        ("avl-iii", ["III", "aVR", "aVL"]),
        (" , I,II,AVR,AVL.AVF,V1,  ", ["I", "II", "aVR", "aVL", "aVF", "V1"]),
        (" , alles,  ", ALL),
        (" , noisy recording,", ALL),
        (" , mittel,  ", ALL),
        ("V4 stark", ["V4"]),
        ("AVR;V5", ["aVR", "V5"]),
        ("V1V6", ["V1", "V6"]),
        (float("nan"), []),
        (" ", []),
    ],
)
def test_parse_noise_leads(value, leads):
    assert parse_noise_leads(value) == (leads, [])


def test_parse_noise_leads_reports_what_it_does_not_understand():
    assert parse_noise_leads("3ES") == ([], ["3es"])
    assert parse_noise_leads("V7, V2") == (["V2"], ["v7"])


def test_read_database_real_rows(shared_data):
    db = read_database(shared_data / "ptbxl" / "ptbxl_database_subset.csv")
    assert len(db) == 8988 and "Unnamed: 0" not in db.columns
    assert db["patient_id"].dtype == np.int64
    row = db.loc[1]
    assert row["patient_id"] == 15709 and row["strat_fold"] == 3
    assert row["scp_codes"] == {"NORM": 100.0, "LVOLT": 0.0, "SR": 0.0}
    assert row["static_noise"] == ALL[:7] and row["baseline_drift"] == []
    assert set(db["heart_axis"].dropna()) == {"MID", "LAD", "ALAD", "RAD", "ARAD", "AXL", "AXR", "SAG"}
    assert "infarction_stadium1" in db.columns and "infarction_stadium2" in db.columns
    # every real noise cell parses, except the two tokens that are not leads at all
    unparsed = [u for u in db["noise_unparsed"] if u]
    assert sorted(map(str, unparsed)) == ["{'baseline_drift': ['v7']}", "{'static_noise': ['3es']}"]
    assert sum(len(v) > 0 for v in db["static_noise"]) == 1400


def test_read_database_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ptbxl_database.csv"):
        read_database(tmp_path)
    (tmp_path / "ptbxl_database.csv").write_text(
        "ecg_id,patient_id,scp_codes\n1,5.0,\"{'NORM': 100.0}\"\n2,6.0,NORM\n"
    )
    with pytest.raises(ValueError, match=r"ecg_id 2: scp_codes: 'NORM' is not a Python literal"):
        read_database(tmp_path)
    (tmp_path / "ptbxl_database.csv").write_text("ecg_id,scp_codes\n1,{}\n")
    with pytest.raises(ValueError, match=r"missing columns \['patient_id'\]"):
        read_database(tmp_path)


def test_read_statements(tmp_path):
    (tmp_path / "scp_statements.csv").write_text(
        ",description,diagnostic,form,rhythm,diagnostic_class\nNORM,normal ECG,1.0,,,NORM\nSR,sinus rhythm,,,1.0,\n"
    )
    st = read_statements(tmp_path)
    assert st.index.tolist() == ["NORM", "SR"] and st.loc["NORM", "diagnostic_class"] == "NORM"


def test_record_path():
    assert record_path("/p", 1) == Path("/p/records500/00000/00001_hr")
    assert record_path("/p", 21837) == Path("/p/records500/21000/21837_hr")
    assert record_path("/p", 999, fs=100) == Path("/p/records100/00000/00999_lr")


@pytest.mark.parametrize(
    "names, fs",
    [
        (ALL, 500),  # PTB-XL
        ([n.lower() for n in ALL] + ["vx", "vy", "vz"], 1000),  # lower case + Frank leads
        (MIMIC_ORDER, 500),  # aVF before aVL
        (["I", "II", "V1"], 100),
        (["MLII", "V5"], 360),
    ],
)
def test_fast_path_matches_wfdb(tmp_path, names, fs):
    x = signal(int(fs * 6), len(names))
    x[7, 0] = np.nan  # an invalid sample: NaN on both paths
    path = write_record(tmp_path / "rec", x, names, fs)
    ref = read_record(path)
    fast = read_record_fast(path, HeaderCache())
    assert fast.sig_names == ref.sig_names == names and fast.fs == ref.fs == fs
    assert fast.signal.dtype == ref.signal.dtype == np.float64
    assert np.array_equal(fast.signal, ref.signal, equal_nan=True)
    assert np.isnan(fast.signal[7, 0]) and np.isnan(fast.signal).sum() == 1
    cfg = DataConfig(fs=500, window_s=5.0)
    a, b = read_record(path, cfg), read_record_fast(path, HeaderCache(), cfg)
    assert np.array_equal(a.signal, b.signal) and np.array_equal(a.lead_mask, b.lead_mask)
    assert a.nan_count == b.nan_count == (1 if names[0].lower() in {n.lower() for n in ALL} else 0)


def test_mimic_order_lands_by_name(tmp_path):
    x = np.tile(np.arange(1, 13, dtype=float) / 10, (5000, 1))  # channel c holds (c+1)/10
    path = write_record(tmp_path / "m", x, MIMIC_ORDER, 500)
    out = read_record_fast(path, HeaderCache(), DataConfig())
    assert out.signal[LEAD_NAMES.index("aVL"), 0] == pytest.approx(0.6)  # stored 6th
    assert out.signal[LEAD_NAMES.index("aVF"), 0] == pytest.approx(0.5)  # stored 5th


def test_header_cache_parses_one_header_per_layout(tmp_path):
    cache = HeaderCache()
    for i in range(3):
        read_record_fast(write_record(tmp_path / f"a{i}", signal(1000, 12, i), ALL, 500), cache)
    read_record_fast(write_record(tmp_path / "b", signal(1000, 3), ["I", "II", "III"], 500), cache)
    assert cache.parsed == 2 and cache.fast_reads == 4 and cache.wfdb_reads == 0


def test_other_formats_read_through_wfdb_and_counted(tmp_path):
    path = write_record(
        tmp_path / "mit", signal(3600, 2), ["MLII", "V5"], 360, fmt="212", gain=200, base=1024
    )
    cache = HeaderCache()
    rec = read_record_fast(path, cache)
    assert np.array_equal(rec.signal, read_record(path).signal) and cache.wfdb_reads == 1


def test_truncated_and_missing_records_name_the_record(tmp_path):
    path = write_record(tmp_path / "00042_hr", signal(5000, 12), ALL, 500)
    with open(str(path) + ".dat", "r+b") as f:
        f.truncate(1001)
    with pytest.raises(RecordError, match=r"00042_hr: 00042_hr.dat is truncated \(1001 bytes"):
        read_record_fast(path, HeaderCache())
    with pytest.raises(RecordError, match=r"record .*00042_hr: wfdb could not read it"):
        read_record(path)
    with pytest.raises(RecordError, match=r"00043_hr: 00043_hr.hea not found"):
        read_record_fast(tmp_path / "00043_hr", HeaderCache())
    (tmp_path / "00042_hr.dat").unlink()
    with pytest.raises(RecordError, match=r"00042_hr: 00042_hr.dat not found"):
        read_record_fast(path, HeaderCache())
    with pytest.raises(RecordError, match=r"00042_hr: 00042_hr.dat not found"):
        read_record(path)


def test_mimic_record_list(tmp_path):
    (tmp_path / "record_list.csv").write_text(
        "subject_id,study_id,file_name,ecg_time,path\n"
        "10000032,40689238,40689238,2180-07-23 08:44:00,files/p1000/p10000032/s40689238/40689238\n"
    )
    rl = read_mimic_record_list(tmp_path)
    assert rl.loc[40689238, "subject_id"] == 10000032
    assert mimic_record_path(tmp_path, rl, 40689238) == tmp_path / "files/p1000/p10000032/s40689238/40689238"
    with pytest.raises(KeyError, match="study_id 1: not in record_list.csv"):
        mimic_record_path(tmp_path, rl, 1)


def test_multi_segment_record_read_through_wfdb(tmp_path):
    import wfdb

    for name, seed in (("seg1", 1), ("seg2", 2)):
        write_record(tmp_path / name, signal(1000, 2, seed), ["I", "II"], 500)
    # a multi-segment header: record name/segments, then one line per segment
    (tmp_path / "multi.hea").write_text("multi/3 2 500 3000\nseg1 1000\nseg2 1000\nseg1 1000\n")
    cache = HeaderCache()
    rec = read_record_fast(tmp_path / "multi", cache)
    assert rec.signal.shape == (3000, 2) and cache.wfdb_reads == 1
    assert np.array_equal(rec.signal, wfdb.rdsamp(str(tmp_path / "multi"))[0], equal_nan=True)
