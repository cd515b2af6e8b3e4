"""Cardiac-dipole ECG model (ECGSYN family): each wave of each beat is a Gaussian in time carrying a 3-D
dipole vector (Frank x = left, y = inferior, z = posterior); the dipole is projected to the 12 leads with a
Dower-like matrix. Labels act on wave timings and vectors (see `ecgray.synth.labels.record_spec`).

Vectorised over beats and waves: every Gaussian is evaluated on its own fixed-size window and scattered into
the (T, 3) dipole with bincount, then one (T, 3) @ (3, 12) projection gives the leads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Dower's inverse transform, Frank XYZ -> I, II, V1..V6 (rows); III, aVR, aVL, aVF follow from Einthoven
# and Goldberger so the limb leads are exactly consistent.
_DOWER = np.array(
    [
        [0.632, -0.235, 0.059],  # I
        [0.235, 1.066, -0.132],  # II
        [-0.515, 0.157, -0.917],  # V1
        [0.044, 0.164, -1.387],  # V2
        [0.882, 0.098, -1.277],  # V3
        [1.213, 0.127, -0.601],  # V4
        [1.125, 0.127, -0.086],  # V5
        [0.831, 0.076, 0.230],  # V6
    ]
)


def lead_matrix(limb: np.ndarray | None = None, chest: np.ndarray | None = None) -> np.ndarray:
    """(12, 3) projection in PTB-XL lead order from rows for I, II (limb, (2, 3)) and V1..V6 (chest, (6, 3))."""
    limb = _DOWER[:2] if limb is None else limb
    chest = _DOWER[2:] if chest is None else chest
    lead_i, lead_ii = limb
    rows = [
        lead_i,
        lead_ii,
        lead_ii - lead_i,  # III
        -(lead_i + lead_ii) / 2,  # aVR
        lead_i - lead_ii / 2,  # aVL
        lead_ii - lead_i / 2,  # aVF
    ]
    return np.vstack([np.array(rows), chest])


LEAD_MATRIX = lead_matrix()
# (12, 8): I, II, V1..V6 -> all 12 leads
_INDEPENDENT_TO_12 = np.zeros((12, 8))
_INDEPENDENT_TO_12[:6, :2] = [[1, 0], [0, 1], [-1, 1], [-0.5, -0.5], [1, -0.5], [-0.5, 1]]
_INDEPENDENT_TO_12[6:, 2:] = np.eye(6)
LEAD_I, LEAD_AVF = LEAD_MATRIX[0], LEAD_MATRIX[5]

# Wave slots of a ventricular event (QRS onset at t = 0). Unused slots carry zero amplitude.
V_WAVES = ["q", "qmi", "r", "r2", "s", "x1", "x2", "st", "t", "t2", "spike"]  # qmi: infarct Q (not rotated)
N_V = len(V_WAVES)
GAUSS_HALF_WIDTH = 2.5  # a wave spans centre +- 2.5 sigma: the model's own onset / offset


@dataclass
class Beat:
    """Wave layout of one kind of ventricular event: centres and sigmas (s) and dipole vectors (N_V, 3)."""

    centre: np.ndarray
    sigma: np.ndarray
    vec: np.ndarray


@dataclass
class RecordSpec:
    """Everything the signal model needs for one 10 s record (times in seconds, vectors in mV-ish units)."""

    rhythm: str = "sinus"  # sinus | afib | aflut | svt | paced | avb3
    hr: float = 70.0
    sinus_arrhythmia: float = 0.0  # relative RR modulation depth by respiration
    rr_jitter: float = 0.015
    p_dur: float = 0.10
    pr: float = 0.16
    p_vec: np.ndarray = field(default_factory=lambda: np.array([0.07, 0.10, -0.01]))
    p_vec2: np.ndarray | None = None  # second P hump (left atrial enlargement)
    normal: Beat | None = None  # conducted QRS-T
    ectopic_v: Beat | None = None  # premature ventricular complex
    n_pvc: int = 0
    n_pac: int = 0
    bigeminy: bool = False
    flutter_rate: float = 300.0  # atrial rate (bpm) for flutter
    flutter_ratio: int = 2
    f_amp: float = 0.0  # fibrillatory wave amplitude
    atrial_rate: float = 80.0  # independent P rate for complete AV block
    lead_gain: np.ndarray = field(default_factory=lambda: np.ones(12))
    matrix: np.ndarray = field(default_factory=lambda: LEAD_MATRIX.copy())
    noise: dict[str, list[int]] = field(default_factory=dict)  # noise type -> lead indices
    ambient: float = 0.012  # white noise sigma (mV) everywhere
    wander: float = 0.04  # respiratory baseline wander (mV) everywhere
    powerline_hz: float = 50.0


def beat_timing(centre: np.ndarray, sigma: np.ndarray, vec: np.ndarray) -> tuple[float, float]:
    """QRS onset and offset (s) of a beat: the extent of its q..x2 waves that carry any amplitude."""
    idx = [V_WAVES.index(w) for w in ("q", "qmi", "r", "r2", "s", "x1", "x2")]
    live = [i for i in idx if np.abs(vec[i]).sum() > 1e-9]
    on = min(centre[i] - GAUSS_HALF_WIDTH * sigma[i] for i in live)
    off = max(centre[i] + GAUSS_HALF_WIDTH * sigma[i] for i in live)
    return on, off


def _rr_series(spec: RecordSpec, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Ventricular event times (s) covering [-1.5, seconds + 1] so edge beats are complete."""
    mean_rr = 60.0 / spec.hr
    n = int((seconds + 3.0) / (0.6 * mean_rr)) + 4
    if spec.rhythm == "afib":
        # irregularly irregular: log-normal RR, no memory
        rr = mean_rr * rng.lognormal(0.0, 0.22, n)
        rr = np.clip(rr, 0.3, 2.2)
    elif spec.rhythm == "aflut":
        rr = np.full(n, 60.0 / spec.flutter_rate * spec.flutter_ratio)
    else:
        phase = rng.uniform(0, 2 * np.pi)
        k = np.arange(n)
        resp = spec.sinus_arrhythmia * np.sin(2 * np.pi * k * mean_rr / rng.uniform(3.5, 5.0) + phase)
        rr = mean_rr * (1.0 + resp + rng.normal(0.0, spec.rr_jitter, n))
    return np.cumsum(rr) - 1.5


def _events(spec: RecordSpec, seconds: float, rng: np.random.Generator):
    """Ventricular events (time, kind: 0 conducted, 1 PVC) and atrial events (P time, P vector scale)."""
    t = _rr_series(spec, seconds, rng)
    kind = np.zeros(len(t), dtype=int)
    mean_rr = float(np.median(np.diff(t)))
    inside = np.flatnonzero((t > 0.3) & (t < seconds - 0.6))
    p_scale = np.ones(len(t))  # 0: no P before this beat; <0 flags an ectopic atrial P
    if spec.bigeminy and len(inside) > 2:
        pvc_idx = inside[1::2]
    elif spec.n_pvc > 0 and len(inside) > 2:
        pvc_idx = rng.choice(inside[1:-1], size=min(spec.n_pvc, len(inside) - 2), replace=False)
    else:
        pvc_idx = np.array([], dtype=int)
    times = t.copy()
    for i in sorted(pvc_idx):
        # premature by ~40 %, full compensatory pause: the following sinus beat keeps its time
        times[i] = t[i - 1] + rng.uniform(0.5, 0.65) * (t[i] - t[i - 1])
        kind[i] = 1
        p_scale[i] = 0.0
    if spec.n_pac > 0:
        free = [i for i in inside[1:-1] if kind[i] == 0 and kind[i - 1] == 0 and kind[i + 1] == 0]
        if free:
            pac_idx = rng.choice(free, size=min(spec.n_pac, len(free)), replace=False)
            for i in sorted(pac_idx):
                shift = (1.0 - rng.uniform(0.65, 0.8)) * (t[i] - t[i - 1])
                times[i:] -= shift  # premature atrial beat resets the sinus node: the rhythm shifts
                p_scale[i] = -1.0
    if spec.rhythm in ("afib", "aflut", "svt"):
        p_scale[kind == 0] = 0.0
    if spec.rhythm == "paced":
        p_scale[:] = 0.0
    p_times = times - spec.pr
    if spec.rhythm == "avb3":
        # atria and ventricles beat independently
        n_p = int((seconds + 3.0) * spec.atrial_rate / 60.0) + 2
        p_times = np.cumsum(np.full(n_p, 60.0 / spec.atrial_rate) * (1 + rng.normal(0, 0.01, n_p))) - 1.5
        p_scale_out = np.ones(n_p)
        return times, kind, p_times, p_scale_out, mean_rr
    keep = p_scale != 0.0
    return times, kind, p_times[keep], p_scale[keep], mean_rr


def _scatter(
    t0: np.ndarray, centre: np.ndarray, sigma: np.ndarray, vec: np.ndarray, fs: int, n: int
) -> np.ndarray:
    """Sum of Gaussians into a (n, 3) dipole. t0 (E,), centre/sigma (E, W), vec (E, W, 3)."""
    c = (t0[:, None] + centre).ravel()  # (E*W,)
    s = sigma.ravel()
    v = vec.reshape(-1, 3)
    live = (np.abs(v).sum(1) > 0) & (c > -1.0) & (c < n / fs + 1.0)
    c, s, v = c[live], s[live], v[live]
    half = int(np.ceil(4.0 * s.max() * fs)) if len(s) else 1
    offs = np.arange(-half, half + 1)  # (K,)
    idx = np.round(c * fs).astype(int)[:, None] + offs  # (G, K)
    g = np.exp(-0.5 * ((idx / fs - c[:, None]) / s[:, None]) ** 2)  # (G, K)
    ok = (idx >= 0) & (idx < n)
    flat_idx = idx[ok]
    out = np.empty((n, 3))
    for d in range(3):
        out[:, d] = np.bincount(flat_idx, weights=(g * v[:, d : d + 1])[ok], minlength=n)
    return out


def synthesize(
    spec: RecordSpec, fs: int = 500, seconds: float = 10.0, rng: np.random.Generator | None = None
):
    """One record: (signal float64 (T, 12) in mV, info dict with beat times and the measured RR)."""
    rng = np.random.default_rng() if rng is None else rng
    n = int(round(fs * seconds))
    times, kind, p_times, p_scale, _ = _events(spec, seconds, rng)
    e = len(times)
    beats = [spec.normal, spec.ectopic_v if spec.ectopic_v is not None else spec.normal]
    centre = np.stack([beats[k].centre for k in kind])  # (E, N_V)
    sigma = np.stack([beats[k].sigma for k in kind])
    # beat-to-beat variability: amplitude (respiration-like) and small timing jitter
    amp = 1.0 + 0.06 * np.sin(2 * np.pi * times / rng.uniform(3.5, 5.5)) + rng.normal(0, 0.03, e)
    vec = np.stack([beats[k].vec for k in kind]) * amp[:, None, None]  # (E, N_V, 3)
    centre = centre + rng.normal(0, 0.002, (e, 1))
    dipole = _scatter(times, centre, sigma, vec, fs, n)

    # atrial activity
    if len(p_times):
        n_p = len(p_times)
        pc = np.zeros((n_p, 2))
        ps = np.zeros((n_p, 2))
        pv = np.zeros((n_p, 2, 3))
        if spec.p_vec2 is None:
            pc[:, 0] = spec.p_dur / 2
            ps[:, 0] = spec.p_dur / (2 * GAUSS_HALF_WIDTH)
            ps[:, 1] = ps[:, 0]
            pv[:, 0] = spec.p_vec
        else:
            sd = spec.p_dur / 7.5  # two humps, each 2/3 of the P duration wide
            pc[:, 0], pc[:, 1] = GAUSS_HALF_WIDTH * sd, spec.p_dur - GAUSS_HALF_WIDTH * sd
            ps[:] = sd
            pv[:, 0], pv[:, 1] = spec.p_vec, spec.p_vec2
        ectopic = p_scale < 0
        # an ectopic atrial focus depolarises the atria from another direction: inverted in the inferior leads
        pv[ectopic] = pv[ectopic] * np.array([1.0, -0.8, 1.0])
        pv = pv * (1.0 + rng.normal(0, 0.04, (n_p, 1, 1)))
        dipole += _scatter(p_times, pc, ps, pv, fs, n)

    t = np.arange(n) / fs
    if spec.rhythm == "afib" and spec.f_amp > 0:
        f = np.zeros(n)
        for _ in range(3):
            hz = rng.uniform(4.5, 8.5)
            f += np.sin(
                2 * np.pi * hz * t + rng.uniform(0, 6.3) + 0.6 * np.sin(2 * np.pi * 0.3 * t)
            ) * rng.uniform(0.5, 1.0)
        dipole += spec.f_amp / 2.0 * f[:, None] * np.array([0.3, 0.6, -1.0])
    if spec.rhythm == "aflut":
        phase = (t * spec.flutter_rate / 60.0 + rng.uniform()) % 1.0
        # slow descent then a fast upstroke: the negative sawtooth of typical flutter in II, III, aVF
        saw = np.where(phase < 0.8, 1.0 - 2.0 * phase / 0.8, -1.0 + 2.0 * (phase - 0.8) / 0.2)
        dipole += 0.12 * saw[:, None] * np.array([0.1, 1.0, 0.3])

    signal = dipole @ spec.matrix.T * spec.lead_gain  # (T, 12)
    signal += _noise(spec, t, fs, rng)
    return signal, {
        "beat_times": times[(times >= 0) & (times < seconds)],
        "kind": kind[(times >= 0) & (times < seconds)],
    }


def _noise(spec: RecordSpec, t: np.ndarray, fs: int, rng: np.random.Generator) -> np.ndarray:
    """Ambient noise in every lead plus the labelled noise types in their named leads. (T, 12) mV."""
    n = len(t)
    # ambient noise on the 8 independent leads (I, II, V1-V6); the other limb leads follow Einthoven /
    # Goldberger as they do on a real recorder
    base = rng.normal(0.0, spec.ambient, (n, 8))
    resp = np.sin(2 * np.pi * rng.uniform(0.15, 0.35) * t + rng.uniform(0, 6.3))
    base += spec.wander * resp[:, None] * rng.uniform(0.3, 1.0, 8)  # respiratory baseline wander
    base += (
        rng.uniform(0.002, 0.008) * np.sin(2 * np.pi * spec.powerline_hz * t + rng.uniform(0, 6.3))[:, None]
    )
    out = base @ _INDEPENDENT_TO_12.T  # (T, 12)
    for kind, leads in spec.noise.items():
        if not leads:
            continue
        leads = np.asarray(leads)
        k = len(leads)
        if kind == "baseline drift":
            hz = rng.uniform(0.08, 0.5, (2, k))
            drift = sum(
                rng.uniform(0.25, 0.6, k) * np.sin(2 * np.pi * hz[j] * t[:, None] + rng.uniform(0, 6.3, k))
                for j in range(2)
            )
            out[:, leads] += drift + np.cumsum(rng.normal(0, 0.004, (n, k)), axis=0)
        elif kind == "static noise":
            out[:, leads] += rng.normal(0, rng.uniform(0.04, 0.08), (n, k))
            out[:, leads] += (
                rng.uniform(0.03, 0.07)
                * np.sin(2 * np.pi * spec.powerline_hz * t + rng.uniform(0, 6.3))[:, None]
            )
        elif kind == "burst noise":
            for _ in range(rng.integers(2, 5)):
                start = rng.integers(0, n - fs // 2)
                length = rng.integers(fs // 5, fs)
                seg = slice(start, min(n, start + length))
                m = seg.stop - seg.start
                env = np.hanning(m)[:, None]
                out[seg, leads] += env * rng.normal(0, rng.uniform(0.25, 0.6), (m, k))
        elif kind == "electrodes problems":
            # electrode pops: abrupt offsets decaying over ~1 s, plus a short loss of contact
            for _ in range(rng.integers(2, 4)):
                start = rng.integers(0, n - fs)
                tau = rng.uniform(0.3, 1.0) * fs
                step = rng.choice([-1, 1], k) * rng.uniform(0.6, 1.5, k)
                decay = np.exp(-np.arange(n - start) / tau)[:, None]
                out[start:, leads] += decay * step
            flat = rng.integers(0, n - fs // 2)
            out[flat : flat + fs // 4, leads] = rng.uniform(-0.05, 0.05)
        else:
            raise ValueError(
                f"noise type {kind!r}: expected one of baseline drift, static noise, burst noise, electrodes problems"
            )
    return out


def qrs_axis_deg(beat: Beat, matrix: np.ndarray = LEAD_MATRIX) -> float:
    """Frontal QRS axis of a beat from its net QRS areas in leads I and aVF (degrees)."""
    idx = [V_WAVES.index(w) for w in ("q", "qmi", "r", "r2", "s", "x1", "x2")]
    area = (beat.vec[idx] * beat.sigma[idx, None]).sum(0)  # (3,), proportional to integral
    return float(np.degrees(np.arctan2(area @ matrix[5], area @ matrix[0])))
