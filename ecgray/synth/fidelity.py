"""Does the signal carry its labels? Generated records are measured blind to their labels and the
measurements compared with the labels: heart-rate class, PR > 200 ms in 1st-degree AV block, QRS >= 120 ms
in complete bundle branch blocks, RR irregularity in atrial fibrillation, frontal axis from leads I / aVF.

R peaks, rate and RR come from neurokit2 (`nk.ecg_clean` + `nk.ecg_peaks`, as in `nk.ecg_process`).
Intervals come from a multi-lead median beat (spatial velocity for QRS onset / offset, P onset in II / aVF /
V1), because neurokit2's single-lead `ecg_delineate` onsets / offsets are too loose for a 200 / 120 ms
threshold; its dwt PR and QRS are also returned (`nk_pr_ms`, `nk_qrs_ms`) so the bench can show both.
neurokit2 is a dev dependency."""

from __future__ import annotations

import warnings

import numpy as np

from ecgray.synth import vocab
from ecgray.synth.labels import axis_answer

SINUS = {"SR", "SBRAD", "STACH", "SARRH"}
NOT_SINUS = {"AFIB", "AFLT", "SVTAC", "PSVT", "PACE", "3AVB", "2AVB", "BIGU", "TRIGU", "SVARR"}
INDEPENDENT = [0, 1, 6, 7, 8, 9, 10, 11]  # I, II, V1-V6: the 8 linearly independent leads


def _median_beat(x: np.ndarray, r: np.ndarray, fs: int, pre: float = 0.45, post: float = 0.6):
    """Median over regular beats (RR within 20 % of the median) of (W, 12) windows around R peaks."""
    a, b = int(pre * fs), int(post * fs)
    rr = np.diff(r)
    med = np.median(rr)
    keep = [
        r[i]
        for i in range(1, len(r))
        if abs(rr[i - 1] - med) < 0.2 * med and r[i] - a >= 0 and r[i] + b < len(x)
    ]
    if len(keep) < 3:
        return None, a
    return np.median(np.stack([x[k - a : k + b] for k in keep]), 0), a  # (W, 12)


def _intervals(m: np.ndarray, a: int, fs: int, rr_s: float) -> tuple[float, float, int, int]:
    """QRS duration and PR interval (ms) of a median beat; QRS onset / offset sample indices."""
    sv = np.abs(np.diff(m[:, INDEPENDENT], axis=0)).sum(1)  # spatial velocity
    sv = np.convolve(sv, np.ones(5) / 5, mode="same")
    lo, hi = a - int(0.12 * fs), a + int(0.12 * fs)
    peak = lo + int(np.argmax(sv[lo:hi]))
    th = 0.2 * sv[peak]
    gap = int(0.04 * fs)  # the slow humps of wide complexes dip below the threshold for up to ~40 ms
    on = peak
    while on > gap and (sv[on - gap : on] > th).any():
        on -= 1
    off = peak
    while off < len(sv) - gap and (sv[off : off + gap] > th).any():
        off += 1
    qrs = (off - on) / fs * 1000
    pv = np.abs(np.diff(m[:, [1, 5, 6]], axis=0)).sum(1)  # II, aVF, V1: where P waves show
    pv = np.convolve(pv, np.ones(9) / 9, mode="same")
    # P search window stops short of the previous beat's T wave at fast rates
    w0, w1 = max(0, on - int(min(0.32, 0.42 * rr_s) * fs)), on - int(0.03 * fs)
    seg = pv[w0:w1]
    base = np.median(pv[max(0, w0 - int(0.05 * fs)) : w0 + 10]) if w0 > 10 else np.percentile(seg, 10)
    pk = seg.max() if len(seg) else 0.0
    if pk < 2.5 * max(base, 1e-6):
        return qrs, np.nan, on, off
    k = int(np.argmax(seg))
    while k > 0 and seg[k] > base + 0.1 * (pk - base):
        k -= 1
    return qrs, (on - (w0 + k)) / fs * 1000, on, off


def measure(signal: np.ndarray, fs: int, with_nk_delineation: bool = False) -> dict:
    """Label-blind measurements of a (T, 12) record in mV: hr, rr_cv, pr_ms, qrs_ms, axis_deg (+ nk_*)."""
    import neurokit2 as nk

    out = {
        "hr": np.nan,
        "rr_cv": np.nan,
        "pr_ms": np.nan,
        "qrs_ms": np.nan,
        "axis_deg": np.nan,
        "nk_pr_ms": np.nan,
        "nk_qrs_ms": np.nan,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = np.stack([nk.ecg_clean(signal[:, j], sampling_rate=fs) for j in range(12)], 1)
        # R peaks on the spatial magnitude of the 5-30 Hz band (QRS energy, not T): no single lead's axis or
        # noise decides detection
        from scipy.signal import butter, sosfiltfilt

        band = sosfiltfilt(
            butter(3, [5.0, 30.0], btype="band", fs=fs, output="sos"), x[:, INDEPENDENT], axis=0
        )
        magnitude = np.sqrt((band**2).sum(1))
        # what nk.ecg_process does for peaks, without its quality step (which fails on records with < 2 beats)
        _, info = nk.ecg_peaks(nk.ecg_clean(magnitude, sampling_rate=fs), sampling_rate=fs)
        r = np.asarray(info["ECG_R_Peaks"], dtype=int)
        if len(r) < 5:
            return out
        rr = np.diff(r)[1:-1] / fs  # edge intervals suffer from the filters' start-up
        out["hr"] = 60.0 / float(np.median(rr))
        out["rr_cv"] = float(np.std(rr) / np.mean(rr))
        if with_nk_delineation:
            try:
                _, w = nk.ecg_delineate(x[:, 1], r, sampling_rate=fs, method="dwt")
                n = len(r)
                get = lambda k: np.asarray(w[k], float)[:n]  # noqa: E731
                out["nk_pr_ms"] = float(np.nanmedian(get("ECG_R_Onsets") - get("ECG_P_Onsets")) / fs * 1000)
                out["nk_qrs_ms"] = float(np.nanmedian(get("ECG_R_Offsets") - get("ECG_R_Onsets")) / fs * 1000)
            except (ValueError, KeyError, IndexError):
                pass  # neurokit2 could not delineate this record: its columns stay NaN
    m, a = _median_beat(x, r, fs)
    if m is None:
        return out
    out["qrs_ms"], out["pr_ms"], on, off = _intervals(m, a, fs, float(np.median(np.diff(r))) / fs)
    # net QRS area in I and aVF, beat by beat on the unfiltered signal (an area does not care about the few
    # samples of R-peak jitter that blur a median beat), against the PR-segment level just before onset
    pad = int(0.01 * fs)
    r_ok = r[(r - (a - on) - 3 * pad >= 0) & (r + (off - a) + pad < len(signal))]
    areas = []
    for rp in r_ok:
        s0, s1 = rp - (a - on) - pad, rp + (off - a) + pad
        base = signal[s0 - 2 * pad : s0, [0, 5]].mean(0)
        areas.append((signal[s0:s1, [0, 5]] - base).sum(0))
    area = np.median(np.array(areas), 0) if areas else (m[on:off, [0, 5]] - m[on, [0, 5]]).sum(0)
    out["axis_deg"] = float(np.degrees(np.arctan2(area[1], area[0])))
    out["beat"], out["qrs_on"], out["qrs_off"] = m, on, off  # (W, 12) median beat for further features
    return out


def checks(codes: dict, heart_axis, extra_beats, m: dict, prefix: str = "") -> dict[str, bool]:
    """Label-vs-measurement agreement for the checks that apply to this record (name -> agrees).
    `prefix="nk_"` checks neurokit2's own dwt PR / QRS instead of the multi-lead ones."""
    c = set(codes)
    out = {}
    sinus = bool(c & SINUS) and not (c & NOT_SINUS)
    ectopy = bool(c & {"PVC", "PAC", "SARRH", "BIGU"}) or isinstance(extra_beats, str)
    pr, qrs = m[prefix + "pr_ms"], m[prefix + "qrs_ms"]
    if not prefix and sinus and np.isfinite(m["hr"]) and not ectopy:
        want = "brady" if "SBRAD" in c else "tachy" if "STACH" in c else "normal"
        got = "brady" if m["hr"] < 60 else "tachy" if m["hr"] > 100 else "normal"
        out["heart-rate class"] = want == got
    if sinus and np.isfinite(pr):
        if c & {"1AVB", "LPR"}:
            out["PR > 200 ms (1AVB)"] = pr > 200
        elif "WPW" not in c:
            out["PR <= 200 ms (no AV block)"] = pr <= 200
    if np.isfinite(qrs) and not c & {"PACE", "WPW"}:
        if c & {"CLBBB", "CRBBB"}:
            out["QRS >= 120 ms (CLBBB/CRBBB)"] = qrs >= 120
        elif not c & {"IVCD", "ILBBB", "IRBBB", "LVH", "VCLVH", "HVOLT", "SEHYP"}:
            out["QRS < 120 ms (no block)"] = qrs < 120
    if not prefix and np.isfinite(m["rr_cv"]):
        if "AFIB" in c and "AFLT" not in c:
            out["RR irregular (AFIB)"] = m["rr_cv"] > 0.08
        elif sinus and not ectopy:
            out["RR regular (sinus)"] = m["rr_cv"] <= 0.08
    if not prefix and np.isfinite(m["axis_deg"]) and "PACE" not in c:
        out["axis class (I/aVF)"] = vocab.axis_class(m["axis_deg"]) == axis_answer(heart_axis, codes)
    return {prefix + k: v for k, v in out.items()}
