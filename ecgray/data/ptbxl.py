"""PTB-XL metadata and WFDB records (wfdb reference path + fast numpy path), MIMIC-IV-ECG record lists.

`read_record` uses wfdb.rdsamp (the reference). `read_record_fast` parses one header per record layout with
wfdb and reads the .dat with numpy (~25x faster: wfdb's header parsing dominates its cost); both return the
same float64 (T, C) array in physical units with NaN at invalid samples.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecgray.config import LEAD_NAMES, DataConfig
from ecgray.data.signals import Canonical, SignalError, to_canonical

NOISE_COLUMNS = ["baseline_drift", "static_noise", "burst_noise", "electrodes_problems"]
REQUIRED_COLUMNS = ["ecg_id", "patient_id", "scp_codes"]
MIMIC_RECORD_COLUMNS = ["subject_id", "study_id", "file_name", "ecg_time", "path"]


class RecordError(ValueError):
    """A WFDB record that is missing (`missing=True`) or cannot be read; the message names the record."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


# ---------------------------------------------------------------------------------------------------------
# ptbxl_database.csv


# Words of the PTB-XL annotators (German and English) meaning "the whole record", and severity words
# ("light", "medium", "strong", "stage") that carry no lead.
_WHOLE_RECORD = re.compile(r"\b(alles|alle|abl|noisy|recording|noise|drift|elektroden|vertauscht)\b")
_SEVERITY = re.compile(r"\b(leicht|mittel|starke|stark|stufe)\b")
_LEAD = r"(avr|avl|avf|iii|ii|i|v[1-6])"
_ITEM = re.compile(rf"{_LEAD}(?:-(?:{_LEAD}|([1-6])))?")
_CANON = [name.lower() for name in LEAD_NAMES]


def parse_noise_leads(value) -> tuple[list[str], list[str]]:
    """One PTB-XL noise cell (" , I-V1,  ", " , II,AVF", "v1-6", "alles") -> (leads, tokens not understood).

    Ranges expand over the canonical order (I-V1 = I..aVF, V1; reversed ranges too); "v5,6" and "v1-6"
    continue the V leads; whole-record words ("alles", "noisy recording") and bare severities ("mittel")
    mean every lead. Leads come back in canonical order with canonical names; empty or NaN -> [].
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return [], []
    text = str(value).lower().replace("?", "").replace("v&", "v6")  # "V&": shifted 6 on a German keyboard
    whole = bool(_WHOLE_RECORD.search(text))
    severity = bool(_SEVERITY.search(text))
    text = _SEVERITY.sub(" ", _WHOLE_RECORD.sub(" ", text))
    leads: set[int] = set()
    unknown: list[str] = []
    last_v = False  # a bare digit after a V lead ("v5,6") is the next V lead
    for item in re.split(r"[,;.]", text):
        item = re.sub(r"\s*-\s*", "-", item.strip())
        for token in item.split():
            pos = 0
            while pos < len(token):
                m = _ITEM.match(token, pos)
                if m is None:
                    if token[pos].isdigit() and last_v and token[pos] in "123456":
                        leads.add(_CANON.index(f"v{token[pos]}"))
                        pos += 1
                        continue
                    unknown.append(token)
                    break
                a = _CANON.index(m.group(1))
                b = (
                    _CANON.index(m.group(2))
                    if m.group(2)
                    else (_CANON.index(f"v{m.group(3)}") if m.group(3) else a)
                )
                leads.update(range(min(a, b), max(a, b) + 1))
                last_v = m.group(0)[-1].isdigit() or m.group(0).startswith("v")
                pos = m.end()
    if whole or (severity and not leads):
        leads = set(range(len(LEAD_NAMES)))
    return [LEAD_NAMES[j] for j in sorted(leads)], unknown


def _literal(value, what: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError(f"{what}: {value!r} is not a Python literal") from None


def read_database(ptbxl_dir: str | Path):
    """ptbxl_database.csv (in the PTB-XL root, or a .csv path) -> DataFrame indexed by ecg_id.

    scp_codes become dicts (code -> likelihood), the noise columns lead lists (`noise_unparsed` keeps the
    tokens that were not understood, per column); patient_id becomes int64; heart_axis, infarction_stadium1/2,
    strat_fold and every other column are kept as read.
    """
    import pandas as pd

    path = Path(ptbxl_dir)
    path = path if path.suffix == ".csv" else path / "ptbxl_database.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"PTB-XL database {path}: not found (expected ptbxl_database.csv in the PTB-XL root)"
        )
    df = pd.read_csv(path)
    df = df.drop(columns=[c for c in df.columns if str(c).startswith("Unnamed:")])
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (has {list(df.columns)})")
    if df["ecg_id"].duplicated().any():
        dup = df.loc[df["ecg_id"].duplicated(), "ecg_id"].tolist()[:5]
        raise ValueError(f"{path}: duplicated ecg_id values {dup}")
    if df["patient_id"].isna().any():
        bad = df.loc[df["patient_id"].isna(), "ecg_id"].tolist()[:5]
        raise ValueError(f"{path}: patient_id missing for ecg_id {bad}")
    df["patient_id"] = df["patient_id"].astype("int64")
    codes = []
    for ecg_id, value in zip(df["ecg_id"], df["scp_codes"], strict=True):
        parsed = _literal(value, f"{path}: ecg_id {ecg_id}: scp_codes")
        if not isinstance(parsed, dict):
            raise ValueError(f"{path}: ecg_id {ecg_id}: scp_codes {value!r} is not a dict")
        codes.append(parsed)
    df["scp_codes"] = codes
    unparsed: list[dict[str, list[str]]] = [{} for _ in range(len(df))]
    for col in NOISE_COLUMNS:
        if col not in df.columns:
            continue
        leads = []
        for i, value in enumerate(df[col]):
            parsed, unknown = parse_noise_leads(value)
            leads.append(parsed)
            if unknown:
                unparsed[i][col] = unknown
        df[col] = leads
    df["noise_unparsed"] = unparsed
    return df.set_index("ecg_id", drop=False).rename_axis(index=None)


def read_statements(ptbxl_dir: str | Path):
    """scp_statements.csv -> DataFrame indexed by SCP code (description, diagnostic, form, rhythm, ...)."""
    import pandas as pd

    path = Path(ptbxl_dir) / "scp_statements.csv"
    if not path.is_file():
        raise FileNotFoundError(f"PTB-XL statements {path}: not found")
    df = pd.read_csv(path, index_col=0)
    df.index.name = "scp_code"
    return df


def record_path(root: str | Path, ecg_id: int, fs: int = 500) -> Path:
    """PTB-XL record path without extension: records500/00000/00001_hr or records100/00000/00001_lr."""
    if fs not in (500, 100):
        raise ValueError(f"PTB-XL records exist at 500 or 100 Hz, not {fs}")
    ecg_id = int(ecg_id)
    folder, suffix = ("records500", "hr") if fs == 500 else ("records100", "lr")
    return Path(root) / folder / f"{(ecg_id // 1000) * 1000:05d}" / f"{ecg_id:05d}_{suffix}"


# ---------------------------------------------------------------------------------------------------------
# WFDB records


@dataclass
class Record:
    """One WFDB record as read: float64 (T, C) in physical units (NaN at invalid samples)."""

    name: str
    signal: np.ndarray
    sig_names: list[str]
    fs: float

    def canonical(self, cfg: DataConfig) -> Canonical:
        return to_canonical(self.signal, self.sig_names, self.fs, cfg, record=self.name)


def _check_header(path: Path) -> None:
    if not Path(str(path) + ".hea").is_file():
        raise RecordError(f"record {path}: {path.name}.hea not found", missing=True)


def read_record(path: str | Path, cfg: DataConfig | None = None) -> Record | Canonical:
    """The reference reader (wfdb.rdsamp). With `cfg`, the canonical window instead of the raw record."""
    import wfdb

    path = Path(path)
    _check_header(path)
    try:
        signal, fields = wfdb.rdsamp(str(path))
    except FileNotFoundError as err:
        raise RecordError(
            f"record {path}: {Path(err.filename or '?').name} not found", missing=True
        ) from None
    except Exception as err:  # wfdb raises bare ValueError / IndexError on damaged files
        raise RecordError(f"record {path}: wfdb could not read it ({type(err).__name__}: {err})") from None
    rec = Record(str(path), signal, list(fields["sig_name"]), float(fields["fs"]))
    return rec if cfg is None else rec.canonical(cfg)


@dataclass
class _Layout:
    fs: float
    sig_names: list[str]
    gain: np.ndarray
    baseline: np.ndarray
    fast: bool
    """False when the record is not plain interleaved format 16 in one file (read with wfdb instead)."""


class HeaderCache:
    """Record layouts parsed by wfdb, keyed by the header lines minus the per-record fields."""

    def __init__(self) -> None:
        self.layouts: dict[tuple, _Layout] = {}
        self.parsed = 0
        self.fast_reads = 0
        self.wfdb_reads = 0


def _layout_key(header: str) -> tuple[tuple, int, list[str]]:
    """(layout key, sig_len, dat file names) from a header's text without parsing it fully."""
    lines = [ln for ln in header.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    rec = lines[0].split()
    if "/" in rec[0]:  # multi-segment: segment lines, not signal lines; wfdb reads it
        return ("multi-segment", tuple(lines)), -1, []
    n_sig = int(rec[1])
    fs = rec[2] if len(rec) > 2 else ""
    sig_len = int(rec[3]) if len(rec) > 3 else -1
    sigs = [ln.split() for ln in lines[1 : 1 + n_sig]]
    if len(sigs) != n_sig:
        raise ValueError(f"header declares {n_sig} signals but has {len(sigs)} signal lines")
    # Per signal every field but the file name, initial value and checksum (which differ per record).
    key = (n_sig, fs, tuple(tuple(s[1:5] + s[7:]) for s in sigs))
    return key, sig_len, [s[0] for s in sigs]


def read_record_fast(
    path: str | Path, header_cache: HeaderCache, cfg: DataConfig | None = None
) -> Record | Canonical:
    """Same output as `read_record`, with wfdb parsing one header per layout and numpy reading the .dat.

    A layout other than one format-16 file (e.g. format 212 of MIT-BIH) is read with wfdb and counted in
    `header_cache.wfdb_reads`.
    """
    path = Path(path)
    _check_header(path)
    header = Path(str(path) + ".hea").read_text(errors="replace")
    try:
        key, sig_len, files = _layout_key(header)
    except (ValueError, IndexError) as err:
        raise RecordError(f"record {path}: malformed header ({err})") from None
    layout = header_cache.layouts.get(key)
    if layout is None:
        layout = _parse_layout(path)
        header_cache.layouts[key] = layout
        header_cache.parsed += 1
    if not layout.fast or sig_len < 0:  # no signal length in the header: let wfdb work it out
        header_cache.wfdb_reads += 1
        return read_record(path, cfg)
    dat = path.parent / files[0]
    n_sig = len(layout.sig_names)
    expected = sig_len * n_sig * 2
    size = dat.stat().st_size if dat.is_file() else -1
    if size < 0:
        raise RecordError(f"record {path}: {dat.name} not found", missing=True)
    if size < expected:
        raise RecordError(
            f"record {path}: {dat.name} is truncated ({size} bytes, header needs {sig_len} x {n_sig} x 2 = {expected})"
        )
    digital = np.fromfile(dat, dtype="<i2", count=sig_len * n_sig).reshape(sig_len, n_sig)  # (T, C)
    signal = (digital - layout.baseline) / layout.gain  # float64, as wfdb's dac
    signal[digital == -32768] = np.nan  # format 16's invalid-sample value, NaN in wfdb too
    header_cache.fast_reads += 1
    rec = Record(str(path), signal, list(layout.sig_names), layout.fs)
    return rec if cfg is None else rec.canonical(cfg)


def _parse_layout(path: Path) -> _Layout:
    import wfdb

    try:
        h = wfdb.rdheader(str(path))
    except Exception as err:
        raise RecordError(
            f"record {path}: wfdb could not parse the header ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(h, wfdb.Record):  # a multi-segment record: wfdb assembles it
        return _Layout(fs=float(h.fs), sig_names=[], gain=np.zeros(0), baseline=np.zeros(0), fast=False)
    n = h.n_sig or 0
    fast = (
        n > 0
        and all(g for g in h.adc_gain)  # a zero gain means wfdb's default: leave it to wfdb
        and all(f == "16" for f in h.fmt)
        and len(set(h.file_name)) == 1
        and all(not b for b in (h.byte_offset or [None] * n))
        and all(not s for s in (h.skew or [None] * n))
        and all(s in (None, 1) for s in (h.samps_per_frame or [1] * n))
    )
    return _Layout(
        fs=float(h.fs),
        sig_names=list(h.sig_name or []),
        gain=np.asarray(h.adc_gain, dtype=np.float64) if n else np.zeros(0),
        baseline=np.asarray(h.baseline, dtype=np.float64) if n else np.zeros(0),
        fast=fast,
    )


# ---------------------------------------------------------------------------------------------------------
# MIMIC-IV-ECG


def read_mimic_record_list(mimic_dir: str | Path):
    """record_list.csv (subject_id, study_id, file_name, ecg_time, path) -> DataFrame indexed by study_id."""
    import pandas as pd

    path = Path(mimic_dir) / "record_list.csv"
    if not path.is_file():
        raise FileNotFoundError(f"MIMIC-IV-ECG record list {path}: not found")
    df = pd.read_csv(path)
    missing = [c for c in MIMIC_RECORD_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (has {list(df.columns)})")
    if df["study_id"].duplicated().any():
        raise ValueError(
            f"{path}: duplicated study_id {df.loc[df['study_id'].duplicated(), 'study_id'].tolist()[:5]}"
        )
    return df.set_index("study_id", drop=False).rename_axis(index=None)


def mimic_record_path(mimic_dir: str | Path, record_list, study_id: int) -> Path:
    """study_id -> record path without extension (files/pNNNN/pXXXXXXXX/sZZZZZZZZ/ZZZZZZZZ)."""
    study_id = int(study_id)
    if study_id not in record_list.index:
        raise KeyError(f"MIMIC-IV-ECG study_id {study_id}: not in record_list.csv")
    return Path(mimic_dir) / str(record_list.at[study_id, "path"])


__all__ = [
    "HeaderCache",
    "Record",
    "RecordError",
    "SignalError",
    "mimic_record_path",
    "parse_noise_leads",
    "read_database",
    "read_mimic_record_list",
    "read_record",
    "read_record_fast",
    "read_statements",
    "record_path",
]
