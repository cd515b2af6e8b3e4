"""Label sets and physiology: real PTB-XL label co-occurrence -> patients and recordings -> `RecordSpec`.

Label sets are drawn from `ptbxl_label_rows.csv.gz` (the label columns of the 8,988 real PTB-XL rows in
shared/data/ptbxl/ptbxl_database_subset.csv, PTB-XL v1.0.3, CC BY 4.0; rebuilt by `build_label_table`), so
statements, heart axis, infarction stage, noise leads and extra beats co-occur as in the real database.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from ecgray.synth import vocab
from ecgray.synth.signal import (
    GAUSS_HALF_WIDTH,
    LEAD_MATRIX,
    N_V,
    V_WAVES,
    Beat,
    RecordSpec,
    beat_timing,
    lead_matrix,
)

LABEL_TABLE = Path(__file__).parent / "assets" / "ptbxl_label_rows.csv.gz"
LABEL_COLUMNS = [
    "patient_id", "age", "sex", "height", "weight", "scp_codes", "heart_axis", "infarction_stadium1",
    "infarction_stadium2", "baseline_drift", "static_noise", "burst_noise", "electrodes_problems",
    "extra_beats", "pacemaker",
]  # fmt: skip


def build_label_table(subset_csv: str | Path, out: str | Path = LABEL_TABLE) -> Path:
    """Extract the label columns of real PTB-XL rows into the packaged table (run once; tested for drift)."""
    df = pd.read_csv(subset_csv, index_col=0)
    missing = [c for c in LABEL_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{subset_csv}: missing PTB-XL columns {missing}")
    df[LABEL_COLUMNS].to_csv(out, index=False, compression={"method": "gzip", "mtime": 0})
    return Path(out)


@lru_cache(maxsize=1)
def label_rows() -> pd.DataFrame:
    if not LABEL_TABLE.is_file():
        raise FileNotFoundError(
            f"{LABEL_TABLE}: packaged label table missing (rebuild with build_label_table)"
        )
    df = pd.read_csv(LABEL_TABLE)
    df["codes"] = [ast.literal_eval(s) for s in df["scp_codes"]]
    return df


# --- territories: unit vectors (Frank x left, y inferior, z posterior) of the myocardium each label names ---
def _unit(*v):
    v = np.array(v, dtype=float)
    return v / np.linalg.norm(v)


TERRITORY = {
    "inferior": _unit(0, 1, 0), "anterior": _unit(0.2, 0, -1), "anteroseptal": _unit(-0.3, 0, -1),
    "lateral": _unit(1, -0.3, 0), "anterolateral": _unit(0.8, 0, -0.7), "inferolateral": _unit(0.7, 0.7, 0),
    "posterior": _unit(0, 0, 1), "inferoposterior": _unit(0, 0.7, 0.7), "inferoposterolateral": _unit(0.5, 0.6, 0.5),
}  # fmt: skip
MI_TERRITORY = {"IMI": "inferior", "AMI": "anterior", "ASMI": "anteroseptal", "LMI": "lateral", "ALMI": "anterolateral",
                "ILMI": "inferolateral", "PMI": "posterior", "IPMI": "inferoposterior", "IPLMI": "inferoposterolateral"}  # fmt: skip
ISC_TERRITORY = {"ISCAN": "anterior", "ISCAL": "anterolateral", "ISCAS": "anteroseptal", "ISCIN": "inferior",
                 "ISCIL": "inferolateral", "ISCLA": "lateral"}  # fmt: skip
INJ_TERRITORY = {"INJAL": "anterolateral", "INJAS": "anteroseptal", "INJIN": "inferior", "INJIL": "inferolateral",
                 "INJLA": "lateral"}  # fmt: skip
LATERAL_STT = _unit(0.9, 0.4, -0.1)  # where non-specific ST-T changes show: I, II, aVL, V4-V6


@dataclass
class Patient:
    """Traits that persist across a patient's recordings (body habitus, electrode placement, baseline timings)."""

    gain: float
    r_vec: np.ndarray
    t_scale: float
    matrix: np.ndarray
    lead_gain: np.ndarray
    hr: float
    p_dur: float
    pr: float
    qrs: float
    qtc: float


def sample_patient(rng: np.random.Generator) -> Patient:
    # electrode placement: chest leads rotated about the vertical axis, limb leads slightly scaled
    ang = np.radians(rng.normal(0, 7))
    rot_y = np.array([[np.cos(ang), 0, np.sin(ang)], [0, 1, 0], [-np.sin(ang), 0, np.cos(ang)]])
    limb = LEAD_MATRIX[:2] * rng.uniform(0.92, 1.08, (2, 1))
    chest = LEAD_MATRIX[6:] @ rot_y.T
    return Patient(
        gain=float(rng.lognormal(0.1, 0.28)),  # QRS voltage varies ~2x between people
        r_vec=np.array([0.9, 0.55, 0.35]) + rng.normal(0, 0.12, 3),
        t_scale=float(rng.lognormal(0, 0.2)),
        matrix=lead_matrix(limb, chest),
        lead_gain=np.concatenate([np.ones(6), rng.uniform(0.85, 1.15, 6)]),
        hr=float(rng.uniform(62, 95)),
        p_dur=float(rng.uniform(0.074, 0.118)),
        pr=float(rng.uniform(0.108, 0.185)),  # PR > 200 ms is left to the AV-block labels
        qrs=float(rng.uniform(0.066, 0.108)),
        qtc=float(rng.uniform(0.37, 0.445)),
    )


def axis_answer(heart_axis, codes: dict) -> str:
    """ECG-QA heart-axis answer of a record, with the fascicular blocks forcing their axis."""
    if "LAFB" in codes:
        return "left axis deviation"
    if "LPFB" in codes:
        return "right axis deviation"
    if isinstance(heart_axis, str) and heart_axis in vocab.AXIS_QA:
        return vocab.AXIS_QA[heart_axis]
    return "normal heart axis"


def extra_beat_kinds(extra_beats, codes: dict) -> list[str]:
    """ECG-QA extra-systole answers: from the extra_beats field, completed by the PVC / PAC / BIGU statements."""
    kinds = set()
    text = extra_beats.upper() if isinstance(extra_beats, str) else ""
    if "SVES" in text:
        kinds.add("supraventricular extrasystoles")
    if re.search(r"(?<!S)VES", text):
        kinds.add("ventricular extrasystoles")
    if re.search(r"\dES|^ES", text):
        kinds.add("extrasystoles")
    if "PVC" in codes or "BIGU" in codes:
        kinds.add("ventricular extrasystoles")
    if "PAC" in codes:
        kinds.add("supraventricular extrasystoles")
    return sorted(kinds)


def _rotz(deg: np.ndarray) -> np.ndarray:
    """(A, 3, 3) rotations about z (the frontal plane), positive towards inferior (+y)."""
    a = np.radians(deg)
    c, s = np.cos(a), np.sin(a)
    out = np.zeros((len(a), 3, 3))
    out[:, 0, 0], out[:, 0, 1], out[:, 1, 0], out[:, 1, 1], out[:, 2, 2] = c, -s, s, c, 1
    return out


def _solve_axis(rot_vec: np.ndarray, sig: np.ndarray, fixed_area: np.ndarray, target: float, matrix) -> float:
    """Rotation (deg) of the rotatable QRS components that puts the frontal axis (I / aVF areas) at target,
    and the remaining error (deg)."""
    phis = np.arange(-180.0, 180.0, 1.0)
    area = (rot_vec * sig[:, None]).sum(0)  # (3,)
    total = np.einsum("aij,j->ai", _rotz(phis), area) + fixed_area  # (A, 3)
    axis = np.degrees(np.arctan2(total @ matrix[5], total @ matrix[0]))
    err = np.abs((axis - target + 180.0) % 360.0 - 180.0)
    best = int(np.argmin(err + np.abs(phis) / 2000.0))
    return float(phis[best]), float(err[best])


def _phi(z: np.ndarray) -> np.ndarray:
    """Standard normal CDF."""
    from scipy.special import ndtr

    return ndtr(z)


def _slot(name: str) -> int:
    return V_WAVES.index(name)


def record_spec(codes: dict, row: dict, pat: Patient, rng: np.random.Generator) -> tuple[RecordSpec, dict]:
    """Labels of one recording -> (RecordSpec for the signal model, numeric features in ms)."""
    c = set(codes)
    spec = RecordSpec(matrix=pat.matrix, lead_gain=pat.lead_gain)
    # --- rhythm and rate ---
    if "PACE" in c:
        spec.rhythm, hr = "paced", rng.uniform(60, 75)
    elif "AFLT" in c:
        spec.rhythm = "aflut"
        spec.flutter_rate = rng.uniform(260, 320)
        spec.flutter_ratio = int(rng.choice([2, 3, 4], p=[0.5, 0.2, 0.3]))
        hr = spec.flutter_rate / spec.flutter_ratio
    elif "AFIB" in c:
        spec.rhythm, hr = "afib", rng.uniform(65, 125)
        spec.f_amp = rng.uniform(0.05, 0.12)
    elif c & {"SVTAC", "PSVT"}:
        spec.rhythm, hr = "svt", rng.uniform(150, 190)
    elif "3AVB" in c:
        spec.rhythm, hr = "avb3", rng.uniform(35, 45)
        spec.atrial_rate = rng.uniform(70, 90)
    else:
        if "SBRAD" in c:
            hr = rng.uniform(42, 56)
        elif "STACH" in c:
            hr = rng.uniform(104, 140)
        else:
            hr = float(np.clip(pat.hr + rng.normal(0, 4), 62, 97))
        if "SARRH" in c:
            spec.sinus_arrhythmia = rng.uniform(0.12, 0.18)
    spec.hr = hr
    rr = 60.0 / hr
    # --- atria ---
    spec.p_dur = pat.p_dur * rng.uniform(0.96, 1.04)
    p_amp = rng.uniform(0.8, 1.2)
    spec.p_vec = np.array([0.07, 0.10, -0.01]) * p_amp
    if "LAO/LAE" in c:
        spec.p_dur = rng.uniform(0.125, 0.145)
        spec.p_vec2 = (
            np.array([0.05, 0.03, 0.09]) * p_amp
        )  # posterior terminal force: negative end of P in V1
    if "RAO/RAE" in c:
        spec.p_vec = np.array([0.04, 0.24, -0.05]) * p_amp
    spec.pr = pat.pr * rng.uniform(0.96, 1.04)
    if c & {"1AVB", "LPR"}:
        spec.pr = rng.uniform(0.215, 0.32)
    if "WPW" in c:
        spec.pr = rng.uniform(0.09, 0.11)
    if hr > 100:  # AV conduction speeds up with the rate
        spec.pr *= 0.88
    spec.pr = max(spec.pr, spec.p_dur + 0.03)

    # --- ventricles: QRS shape by conduction ---
    g = pat.gain
    if c & {"LVH", "VCLVH", "HVOLT", "SEHYP"}:
        g *= rng.uniform(1.7, 2.2)
    if "LVOLT" in c:
        g = pat.gain * rng.uniform(0.28, 0.4) / max(pat.gain, 0.6)
    wide_lbbb = bool(c & {"CLBBB", "PACE"})
    if wide_lbbb:
        dq = rng.uniform(0.13, 0.17)
    elif "CRBBB" in c:
        dq = rng.uniform(0.125, 0.16)
    elif "IVCD" in c:
        dq = rng.uniform(0.112, 0.126)
    elif c & {"IRBBB", "ILBBB"}:
        dq = rng.uniform(0.10, 0.115)
    elif c & {"LAFB", "LPFB"}:
        dq = rng.uniform(0.09, 0.11)
    else:
        dq = pat.qrs * rng.uniform(0.97, 1.03) + (0.008 if c & {"LVH", "VCLVH"} else 0.0)
    centre = np.zeros(N_V)
    sigma = np.full(N_V, 0.01)
    vec = np.zeros((N_V, 3))
    rot = np.zeros(N_V, dtype=bool)  # components that follow the frontal axis rotation
    r_vec = pat.r_vec * g
    if wide_lbbb or "ILBBB" in c:
        # no septal q (septum activated from the left), broad notched R leftward-posterior, QS in V1
        k = 0.8 if "ILBBB" in c else 1.0
        for name, cen, sd, v in [
            ("q", 0.10, 0.05, np.array([0.12, 0.0, 0.05])),
            ("r", 0.36, 0.13, np.array([0.55, -0.05, 0.55])),
            ("r2", 0.68, 0.11, np.array([0.65, 0.05, 0.75])),
        ]:
            i = _slot(name)
            centre[i], sigma[i], vec[i], rot[i] = cen * dq, sd * dq, v * g * k, True
    else:
        for name, cen, sd, v in [
            ("q", 0.10, 0.04, np.array([-0.15, 0.05, -0.25]) * g),
            ("r", 0.42, 0.12, r_vec),
            ("s", 0.80, 0.08, np.array([-0.25, -0.25, 0.45]) * g),
        ]:
            i = _slot(name)
            centre[i], sigma[i], vec[i], rot[i] = cen * dq, sd * dq, v, True
        if c & {"CRBBB", "IRBBB"}:
            # normal activation compressed into the first 60 %, then slow right-anterior terminal forces:
            # R' in V1-V2, wide S in I, aVL, V5-V6
            k = 1.0 if "CRBBB" in c else 0.55
            for name, cen, sd in [("q", 0.06, 0.025), ("r", 0.25, 0.07), ("s", 0.47, 0.05)]:
                i = _slot(name)
                centre[i], sigma[i] = cen * dq, sd * dq
            i = _slot("x1")
            centre[i], sigma[i], vec[i], rot[i] = (
                0.78 * dq,
                0.088 * dq,
                np.array([-0.4, 0.0, -0.65]) * g * k,
                True,
            )
        if "IVCD" in c or "ABQRS" in c:
            i = _slot("r2")  # notch / slur on the down-stroke of R
            centre[i], sigma[i], vec[i], rot[i] = 0.6 * dq, 0.06 * dq, r_vec * rng.uniform(0.15, 0.3), True
        if "WPW" in c:
            i = _slot("x2")  # delta wave: slurred pre-excitation before the R upstroke
            centre[i], sigma[i], vec[i], rot[i] = 0.05 * dq, 0.1 * dq, r_vec * 0.25, True
    if c & {"RVH"}:
        vec[_slot("s")] += np.array([-0.5, 0.2, -0.5]) * g
    # --- myocardial infarction: Q waves away from the territory, R loss, stage-dependent ST-T ---
    st = np.zeros(3)
    # T follows QRS voltage (less than proportionally): low-voltage records get low T waves too
    t_vec = np.array([0.28, 0.22, -0.12]) * pat.t_scale * min(g, 1.5) ** (0.5 if g >= 1 else 1.0)
    mi = [MI_TERRITORY[k] for k in MI_TERRITORY if k in c]
    stage = row.get("infarction_stadium1")
    stage = stage if isinstance(stage, str) else ("unknown" if mi else None)
    qi = _slot("qmi")  # infarct Q waves stay where the territory is: not rotated with the axis
    for terr in mi + (["inferior"] if "QWAVE" in c and not mi else []):
        n = TERRITORY[terr]
        r_i = _slot("r")
        vec[r_i] -= 0.6 * max(vec[r_i] @ n, 0.0) * n
        if terr == "posterior":  # posterior MI is seen as its mirror image: tall R in V1-V2
            vec[r_i] -= 0.35 * g * n
        else:
            q_w = rng.uniform(0.35, 0.6) * g * max(pat.gain, 0.8)
            vec[qi] = vec[qi] - q_w * n
            sigma[qi], centre[qi] = 0.0088, GAUSS_HALF_WIDTH * 0.0088  # initial 40 ms forces
    for terr in mi:
        n = TERRITORY[terr]
        if stage in ("Stadium I", "Stadium I-II"):
            st += rng.uniform(0.12, 0.25) * n
            t_vec = t_vec + rng.uniform(0.15, 0.3) * n
        elif stage in ("Stadium II", "Stadium II-III"):
            st += rng.uniform(0.04, 0.1) * n
            t_vec = t_vec - rng.uniform(0.2, 0.35) * n
        else:  # old or unknown: Q waves remain, T flattened / inverted in the territory
            t_vec = t_vec - rng.uniform(0.05, 0.2) * n
    for code, terr in ISC_TERRITORY.items():
        if code in c:
            t_vec = t_vec - rng.uniform(0.2, 0.35) * TERRITORY[terr]
            st -= rng.uniform(0.02, 0.06) * TERRITORY[terr]
    for code, terr in INJ_TERRITORY.items():
        if code in c:
            st -= rng.uniform(0.1, 0.2) * TERRITORY[terr]
    if c & {"ISC_", "NST_", "STD_"}:
        st -= rng.uniform(0.06, 0.14) * LATERAL_STT
    if "ISC_" in c:
        t_vec = t_vec - rng.uniform(0.15, 0.3) * LATERAL_STT
    if "STE_" in c:
        st += rng.uniform(0.08, 0.16) * TERRITORY["anterior"]
    if c & {"NDT", "NT_", "TAB_"}:
        t_vec = t_vec * rng.uniform(0.3, 0.6) - rng.uniform(0.05, 0.15) * LATERAL_STT
    if "INVT" in c:
        t_vec = -t_vec * rng.uniform(0.5, 0.9)
    if "LOWT" in c:
        t_vec = t_vec * rng.uniform(0.15, 0.3)
    if c & {"LVH", "SEHYP"} and rng.uniform() < 0.5:  # strain pattern
        st -= 0.06 * LATERAL_STT
        t_vec = t_vec - 0.25 * LATERAL_STT
    if "DIG" in c and np.linalg.norm(t_vec) > 0:  # scooped ST depression along the T direction
        st -= rng.uniform(0.08, 0.14) * _unit(*t_vec)

    # --- repolarisation timing ---
    qtc = pat.qtc * rng.uniform(0.98, 1.02)
    if "LNGQT" in c:
        qtc = rng.uniform(0.47, 0.54)
    if "DIG" in c:
        qtc = rng.uniform(0.33, 0.36)
    qt = max(qtc * np.sqrt(rr), dq + 0.2)
    t_sd = 0.085 * qt
    centre[_slot("t")], sigma[_slot("t")] = qt - GAUSS_HALF_WIDTH * t_sd, t_sd
    st_start = dq
    st_len = centre[_slot("t")] - st_start
    centre[_slot("st")], sigma[_slot("st")], vec[_slot("st")] = st_start + 0.45 * st_len, st_len / 3.2, st
    # --- frontal axis: rotate the conduction components so the I / aVF areas point at the target ---
    answer = axis_answer(row.get("heart_axis"), codes)
    lo, hi = vocab.AXIS_TARGET_DEG[answer]
    if "LAFB" in c:
        lo, hi = -75.0, -48.0
    if "LPFB" in c:
        lo, hi = 105.0, 135.0
    target = rng.uniform(lo, hi)
    # area of every wave inside the QRS window (ST leaks in), as a measurement over onset..offset sees it
    w = sigma * (_phi((dq - centre) / sigma) - _phi((0.0 - centre) / sigma))
    for _ in range(4):
        fixed = ((vec * w[:, None])[~rot]).sum(0)
        phi, err = _solve_axis(vec[rot], w[rot], fixed, target, pat.matrix)
        if err < 10.0:
            break
        # the infarct Q forces alone would pull the axis out of its labelled class: weaken them
        vec[_slot("qmi")] *= 0.6
    rz = _rotz(np.array([phi]))[0]
    vec[rot] = vec[rot] @ rz.T
    vec[_slot("t")] = 0.0
    qrs_mean = (vec * sigma[:, None])[: _slot("st")].sum(0)
    if wide_lbbb or "CRBBB" in c:
        # secondary repolarisation change: T discordant to the terminal QRS forces
        term = vec[_slot("x1")] if "CRBBB" in c else qrs_mean
        t_vec = -0.45 * _unit(*term) * np.linalg.norm(t_vec) * 1.3 + 0.3 * t_vec
    else:
        t_vec = t_vec @ rz.T if abs(phi) < 90 else t_vec
    vec[_slot("t")] = t_vec

    if "PACE" in c:
        i = _slot("spike")
        centre[i], sigma[i], vec[i] = -0.004, 0.0012, np.array([0.4, 1.2, -0.8])
    spec.normal = Beat(centre=centre, sigma=sigma, vec=vec)

    # --- ectopy ---
    kinds = extra_beat_kinds(row.get("extra_beats"), codes)
    text = row.get("extra_beats") if isinstance(row.get("extra_beats"), str) else ""
    digits = [int(d) for d in re.findall(r"\d", text)]
    count = digits[0] if digits else int(rng.integers(1, 3))
    if "ventricular extrasystoles" in kinds or ("extrasystoles" in kinds and rng.uniform() < 0.5):
        spec.n_pvc = count
    if "supraventricular extrasystoles" in kinds or ("extrasystoles" in kinds and spec.n_pvc == 0):
        spec.n_pac = max(1, count if spec.n_pvc == 0 else 1)
    spec.bigeminy = "BIGU" in c
    if spec.n_pvc or spec.bigeminy:
        spec.ectopic_v = _ectopic_beat(g, qt, rng)
    if spec.rhythm in ("afib", "aflut", "svt", "paced"):
        spec.n_pac = 0

    # --- noise in named leads ---
    for name, col in vocab.NOISE_COLUMNS.items():
        leads = vocab.parse_leads(row.get(col))
        if leads:
            spec.noise[name] = [vocab.QA_LEAD_NAMES.index(x) for x in leads]
    spec.ambient = rng.uniform(0.006, 0.02)
    spec.wander = rng.uniform(0.02, 0.08)

    # --- numeric features from the model's own timings (ms) ---
    on, off = beat_timing(centre, sigma, vec)
    has_p = spec.rhythm in ("sinus", "avb3")
    feats = {
        "p duration": spec.p_dur * 1000 if has_p else np.nan,
        "pr interval": spec.pr * 1000 if spec.rhythm == "sinus" else np.nan,
        "qrs duration": (off - on) * 1000,
        "qt interval": (qt - on) * 1000,
        "rr interval": rr * 1000,
    }
    feats["qt corrected"] = feats["qt interval"] / np.sqrt(rr)
    return spec, feats


def _ectopic_beat(g: float, qt: float, rng: np.random.Generator) -> Beat:
    """A premature ventricular complex: wide, bizarre QRS from an ectopic focus, discordant T, no P."""
    centre = np.zeros(N_V)
    sigma = np.full(N_V, 0.01)
    vec = np.zeros((N_V, 3))
    dq = rng.uniform(0.14, 0.17)
    direction = _unit(*(rng.normal(0, 1, 3) + np.array([0.5, 0.8, 0.0])))
    for name, cen, sd, k in [("r", 0.4, 0.16, 1.4), ("r2", 0.72, 0.1, 0.5)]:
        i = _slot(name)
        centre[i], sigma[i], vec[i] = cen * dq, sd * dq, direction * g * k
    t_sd = 0.09 * qt
    i = _slot("t")
    centre[i], sigma[i], vec[i] = qt * 1.05 - GAUSS_HALF_WIDTH * t_sd, t_sd, -0.45 * direction * g
    return Beat(centre=centre, sigma=sigma, vec=vec)
