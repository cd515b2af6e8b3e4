"""12-lead ECG figure in the standard layout: 3 x 4 panels of 2.5 s (I II III | aVR aVL aVF | V1-V3 | V4-V6)
plus a 10 s rhythm strip of lead II, on a millimetre grid at 25 mm/s and 10 mm/mV (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ecgray.synth.vocab import QA_LEAD_NAMES

LAYOUT = [["I", "aVR", "V1", "V4"], ["II", "aVL", "V2", "V5"], ["III", "aVF", "V3", "V6"]]
MM_PER_S, MM_PER_MV = 25.0, 10.0
ROW_MM = 30.0  # vertical space per row


def render_ecg(signal: np.ndarray, fs: int, path: str | Path, title: str = "") -> Path:
    """Draw a (T, 12) record in mV (PTB-XL lead order) to a PNG at path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if signal.ndim != 2 or signal.shape[1] != 12:
        raise ValueError(f"render_ecg: expected a (T, 12) signal, got shape {signal.shape}")
    seconds = signal.shape[0] / fs
    if seconds < 10.0 - 1e-6:
        raise ValueError(f"render_ecg: needs 10 s of signal, got {seconds:.2f} s at {fs} Hz")
    width_mm = 10.0 * MM_PER_S
    height_mm = 4 * ROW_MM
    fig = plt.figure(figsize=(width_mm / 25.4 * 1.2, height_mm / 25.4 * 1.2 + 0.4), dpi=110)
    ax = fig.add_axes([0.01, 0.01, 0.98, 0.98 - 0.4 / fig.get_figheight()])
    from matplotlib.collections import LineCollection

    for step, color, lw in ((1.0, "#f4c7c7", 0.3), (5.0, "#e88f8f", 0.6)):  # 1 mm and 5 mm grid
        xs, ys = np.arange(0, width_mm + 0.01, step), np.arange(0, height_mm + 0.01, step)
        segs = [[(x, 0), (x, height_mm)] for x in xs] + [[(0, y), (width_mm, y)] for y in ys]
        ax.add_collection(LineCollection(segs, colors=color, linewidths=lw, zorder=0))
    t_mm = np.arange(signal.shape[0]) / fs * MM_PER_S
    seg = int(2.5 * fs)
    for r, row in enumerate(LAYOUT):
        base = height_mm - (r + 0.5) * ROW_MM
        for c, lead in enumerate(row):
            j = QA_LEAD_NAMES.index(lead)
            sl = slice(c * seg, (c + 1) * seg)
            y = signal[sl, j] - np.median(signal[sl, j])
            ax.plot(t_mm[sl], base + y * MM_PER_MV, color="black", lw=0.6)
            ax.text(c * 62.5 + 1, base + 8, lead, fontsize=7)
            if c:
                ax.plot([c * 62.5, c * 62.5], [base - 3, base + 3], color="black", lw=0.6)
    base = 0.5 * ROW_MM
    y = signal[:, 1] - np.median(signal[:, 1])
    ax.plot(t_mm, base + y * MM_PER_MV, color="black", lw=0.6)
    ax.text(1, base + 8, "II", fontsize=7)
    ax.set_xlim(0, width_mm)
    ax.set_ylim(0, height_mm)
    ax.set_axis_off()
    fig.suptitle(title + "   (25 mm/s, 10 mm/mV)", fontsize=8, y=0.995)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def render_record(ptbxl_dir: str | Path, ecg_id: int, path: str | Path) -> Path:
    """Read record ecg_id (500 Hz) of a PTB-XL-layout folder and render it; the title lists its statements."""
    import ast

    import pandas as pd
    import wfdb

    ptbxl_dir = Path(ptbxl_dir)
    db = pd.read_csv(ptbxl_dir / "ptbxl_database.csv", index_col="ecg_id")
    if ecg_id not in db.index:
        raise ValueError(f"{ptbxl_dir / 'ptbxl_database.csv'}: no record with ecg_id {ecg_id}")
    row = db.loc[ecg_id]
    signal, fields = wfdb.rdsamp(str(ptbxl_dir / row["filename_hr"]))
    codes = ", ".join(ast.literal_eval(row["scp_codes"]))
    return render_ecg(signal, int(fields["fs"]), path, f"ecg_id {ecg_id}: {codes}; axis {row['heart_axis']}")
