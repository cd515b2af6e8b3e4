"""Turn any ECG into the encoder's input: leads by name -> canonical order, resample, fixed window, NaN policy.

Pure numpy/scipy, shared by `ecgray prepare` (WFDB records) and the serving layer (ECGs posted over HTTP).
Input is a (T, C) array with one name per channel, as wfdb returns it; output is float32 (12, T) in the
canonical order I, II, III, aVR, aVL, aVF, V1-V6 plus a lead mask. Leads are matched by name,
case-insensitively (PTB-XL metadata writes "AVF", other files "avf"), never by position: MIMIC-IV-ECG stores
aVF before aVL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from ecgray.config import LEAD_NAMES, DataConfig

MIN_FS = 50.0
MAX_FS = 10000.0
_LEAD_INDEX = {name.lower(): i for i, name in enumerate(LEAD_NAMES)}


class SignalError(ValueError):
    """An ECG that cannot be turned into the encoder's input; the message names the record and the fault."""


@dataclass
class Canonical:
    """One ECG in the encoder's layout."""

    signal: np.ndarray
    """float32 (12, n_samples), canonical lead order, mV; masked leads are zeros."""
    lead_mask: np.ndarray
    """bool (12,): True where the lead was recorded, finite and selected by `cfg.leads`."""
    nan_count: int
    """NaN samples found in the record's selected leads (before the NaN policy was applied)."""
    dropped: list[str] = field(default_factory=list)
    """Channels that are not one of the 12 leads (vx, vy, vz, ...), dropped."""


def lead_index(name: str) -> int | None:
    """Canonical position of a lead name (case-insensitive), or None for a non-lead channel."""
    return _LEAD_INDEX.get(str(name).strip().lower())


def _where(record: str | None) -> str:
    return f"record {record}" if record else "ECG"


def check_fs(fs: float, record: str | None = None) -> float:
    """A sampling rate as float; absurd or non-finite rates raise SignalError."""
    try:
        fs = float(fs)
    except (TypeError, ValueError):
        raise SignalError(f"{_where(record)}: sampling rate {fs!r} is not a number") from None
    if not np.isfinite(fs) or not MIN_FS <= fs <= MAX_FS:
        raise SignalError(
            f"{_where(record)}: sampling rate {fs} Hz is outside the plausible range {MIN_FS:g}-{MAX_FS:g} Hz"
        )
    return fs


def resample(x: np.ndarray, fs: float, target_fs: float, record: str | None = None) -> np.ndarray:
    """Polyphase resampling along axis 0 from fs to target_fs (x: (T, C) float)."""
    if fs == target_fs:
        return x
    src = Fraction(fs).limit_denominator(1000)
    if abs(float(src) - fs) > 1e-6 * fs:
        raise SignalError(f"{_where(record)}: sampling rate {fs} Hz is not a ratio of small integers")
    ratio = Fraction(target_fs).limit_denominator(1000) / src
    from scipy.signal import resample_poly

    # padtype="line": extend the edges along their trend instead of with zeros, so a record does not ring
    # at its start (the window most often taken).
    return resample_poly(x, ratio.numerator, ratio.denominator, axis=0, padtype="line")


def _apply_nan_policy(x: np.ndarray, names: list[str], policy: str, record: str | None) -> np.ndarray:
    """x: (T, 12) with NaN where samples are missing; returns a finite copy (all-NaN leads become zeros)."""
    nan = np.isnan(x)
    if not nan.any():
        return x
    if policy == "reject":
        bad = [f"{names[j]} ({int(nan[:, j].sum())})" for j in range(x.shape[1]) if nan[:, j].any()]
        raise SignalError(
            f"{_where(record)}: {int(nan.sum())} NaN samples in leads {', '.join(bad)} (nan_policy=reject)"
        )
    x = x.copy()
    if policy == "zero":
        x[nan] = 0.0
        return x
    if policy != "interpolate":
        raise SignalError(f"nan_policy {policy!r}: expected reject, interpolate or zero")
    t = np.arange(x.shape[0])
    for j in range(x.shape[1]):
        bad = nan[:, j]
        if bad.all():
            x[:, j] = 0.0  # nothing to interpolate from: the lead is masked by the caller
        elif bad.any():
            # Linear between the neighbouring valid samples; constant beyond the first / last valid one.
            x[bad, j] = np.interp(t[bad], t[~bad], x[~bad, j])
    return x


def to_canonical(
    signal: np.ndarray,
    sig_names: list[str],
    fs: float,
    cfg: DataConfig,
    record: str | None = None,
) -> Canonical:
    """(T, C) signal with channel names at fs Hz -> `Canonical` at cfg.fs, cfg.n_samples long.

    Leads are reordered by name; extra channels are dropped; missing leads, all-NaN leads and leads not in
    `cfg.leads` are zero-filled and masked; a duplicated lead, Inf, a bad shape, an absurd rate or a record
    shorter than the window raise `SignalError` naming `record`.
    """
    where = _where(record)
    x = np.asarray(signal)
    names = [str(n) for n in sig_names]
    if x.ndim != 2:
        raise SignalError(f"{where}: signal must be 2-D (T samples, C channels), got shape {x.shape}")
    if x.shape[1] != len(names):
        hint = " (transposed? expected (T, C))" if x.shape[0] == len(names) else ""
        raise SignalError(f"{where}: signal has shape {x.shape} but {len(names)} channel names {names}{hint}")
    if x.shape[0] == 0:
        raise SignalError(f"{where}: signal has no samples")
    if not np.issubdtype(x.dtype, np.number):
        raise SignalError(f"{where}: signal dtype {x.dtype} is not numeric")
    fs = check_fs(fs, record)
    selected = set()
    for lead in cfg.leads:
        j = lead_index(lead)
        if j is None:
            raise SignalError(f"cfg.leads: {lead!r} is not one of the 12 leads {LEAD_NAMES}")
        selected.add(j)

    # columns: canonical row -> input channel; channels that are not leads are dropped.
    columns: dict[int, int] = {}
    dropped = []
    for c, name in enumerate(names):
        j = lead_index(name)
        if j is None:
            dropped.append(name)
        elif j in columns:
            raise SignalError(
                f"{where}: lead {LEAD_NAMES[j]} appears twice (channels {names[columns[j]]!r} and {name!r})"
            )
        else:
            columns[j] = c

    if not columns:
        raise SignalError(
            f"{where}: no channel is one of the 12 leads (channels {names}, expected {LEAD_NAMES})"
        )

    x = x.astype(np.float64, copy=False)
    present = sorted(j for j in columns if j in selected)  # NaN, Inf and resampling only where it is used
    leads = x[:, [columns[j] for j in present]]  # (T, n_present) in canonical order
    inf = np.isinf(leads)
    if inf.any():
        bad = [LEAD_NAMES[present[k]] for k in range(len(present)) if inf[:, k].any()]
        raise SignalError(f"{where}: {int(inf.sum())} infinite samples in leads {', '.join(bad)}")
    nan_count = int(np.isnan(leads).sum())
    all_nan = np.isnan(leads).all(axis=0)
    leads = _apply_nan_policy(leads, [LEAD_NAMES[j] for j in present], cfg.nan_policy, record)

    leads = resample(leads, fs, float(cfg.fs), record)
    n = cfg.n_samples
    if leads.shape[0] < n:
        raise SignalError(
            f"{where}: {x.shape[0] / fs:.3f} s at {fs:g} Hz is shorter than the {cfg.window_s:g} s window "
            f"({leads.shape[0]} < {n} samples at {cfg.fs} Hz)"
        )
    start = 0 if cfg.window == "start" else (leads.shape[0] - n) // 2
    leads = leads[start : start + n]  # (n_samples, n_present)

    out = np.zeros((len(LEAD_NAMES), n), dtype=np.float32)
    mask = np.zeros(len(LEAD_NAMES), dtype=bool)
    for k, j in enumerate(present):
        if not all_nan[k]:
            out[j] = leads[:, k]
            mask[j] = True
    return Canonical(signal=out, lead_mask=mask, nan_count=nan_count, dropped=dropped)
