"""signals.to_canonical: leads by name, resampling, window, NaN policy, errors that name the fault."""

from __future__ import annotations

import numpy as np
import pytest

from ecgray.config import LEAD_NAMES, DataConfig
from ecgray.data.signals import SignalError, to_canonical


def cfg(**kw) -> DataConfig:
    # 100 Hz x 2 s keeps the arrays tiny.
    base = dict(fs=100, window_s=2.0)
    base.update(kw)
    return DataConfig(**base)


def ramp_record(names: list[str], fs: float = 100, seconds: float = 3.0) -> np.ndarray:
    """(T, C): channel c holds the constant (c + 1), so where each channel lands is visible."""
    t = int(round(fs * seconds))
    return np.tile(np.arange(1, len(names) + 1, dtype=np.float64), (t, 1))


def test_canonical_order_is_by_name_case_insensitive_and_extra_channels_dropped():
    # MIMIC order (aVF before aVL), mixed case, Frank leads appended.
    names = ["i", "II", "iii", "AVR", "avf", "aVL", "V1", "v2", "V3", "v4", "V5", "v6", "vx", "vy", "vz"]
    x = ramp_record(names)
    out = to_canonical(x, names, 100, cfg())
    assert out.signal.shape == (12, 200) and out.signal.dtype == np.float32
    assert out.lead_mask.all()
    # canonical row j must hold the channel whose name is LEAD_NAMES[j]
    lower = [n.lower() for n in names]
    for j, lead in enumerate(LEAD_NAMES):
        assert out.signal[j, 0] == lower.index(lead.lower()) + 1, lead
    assert out.dropped == ["vx", "vy", "vz"]
    assert out.nan_count == 0


def test_missing_leads_zero_filled_and_masked():
    names = ["I", "II", "V2"]
    out = to_canonical(ramp_record(names), names, 100, cfg())
    assert out.lead_mask.tolist() == [n in names for n in LEAD_NAMES]
    assert np.all(out.signal[~out.lead_mask] == 0)
    assert out.signal[LEAD_NAMES.index("V2"), 5] == 3


def test_leads_outside_cfg_leads_are_zeroed_and_masked():
    names = list(LEAD_NAMES)
    x = ramp_record(names)
    x[3, 7] = np.nan  # in V2, not selected: neither counted nor rejected
    out = to_canonical(x, names, 100, cfg(leads=["I", "avf"], nan_policy="reject"))
    assert np.flatnonzero(out.lead_mask).tolist() == [0, 5] and out.nan_count == 0
    assert np.count_nonzero(out.signal.any(axis=1)) == 2
    none = to_canonical(ramp_record(["V1"]), ["V1"], 100, cfg(leads=["I"]))  # the selected lead is absent
    assert not none.lead_mask.any() and not none.signal.any()


def test_no_lead_at_all_is_an_error():
    with pytest.raises(
        SignalError, match=r"record f: no channel is one of the 12 leads \(channels \['vx', 'vy'\]"
    ):
        to_canonical(ramp_record(["vx", "vy"]), ["vx", "vy"], 100, cfg(), record="f")


def test_duplicated_lead_rejected():
    with pytest.raises(SignalError, match=r"lead aVF appears twice"):
        to_canonical(ramp_record(["I", "aVF", "AVF"]), ["I", "aVF", "AVF"], 100, cfg(), record="r7")


@pytest.mark.parametrize("fs", [100, 360, 1000, 500, 257])
def test_resampling_rates_keep_a_sine(fs):
    t = np.arange(int(fs * 3)) / fs
    x = np.sin(2 * np.pi * 2.0 * t)[:, None]  # 2 Hz, well below every Nyquist
    out = to_canonical(x, ["II"], fs, cfg(fs=200))
    assert out.signal.shape == (12, 400)
    expect = np.sin(2 * np.pi * 2.0 * np.arange(400) / 200)
    # edges of polyphase filtering ring a little; the middle is exact to a few 1e-3
    assert np.abs(out.signal[1, 50:350] - expect[50:350]).max() < 5e-3


def test_window_start_and_center():
    x = np.arange(500, dtype=np.float64)[:, None]  # 5 s at 100 Hz
    start = to_canonical(x, ["I"], 100, cfg(window="start"))
    center = to_canonical(x, ["I"], 100, cfg(window="center"))
    assert start.signal[0, 0] == 0 and start.signal[0, -1] == 199
    assert center.signal[0, 0] == 150 and center.signal[0, -1] == 349


def test_short_record_names_duration():
    x = np.zeros((150, 1))
    with pytest.raises(
        SignalError, match=r"record short1: 1\.500 s at 100 Hz is shorter than the 2 s window"
    ):
        to_canonical(x, ["I"], 100, cfg(), record="short1")


def test_nan_policies_and_counts():
    x = np.tile(np.linspace(0, 1, 300), (2, 1)).T.copy()  # (300, 2) ramps
    x[10:13, 0] = np.nan
    x[:, 1] = np.nan  # a whole lead of NaN
    interp = to_canonical(x, ["I", "II"], 100, cfg(nan_policy="interpolate"))
    assert interp.nan_count == 303
    assert np.allclose(interp.signal[0, 9:14], np.linspace(0, 1, 300)[9:14], atol=1e-6)
    assert interp.lead_mask.tolist()[:2] == [True, False]  # the all-NaN lead is masked, zeros
    assert np.all(interp.signal[1] == 0)
    zero = to_canonical(x, ["I", "II"], 100, cfg(nan_policy="zero"))
    assert np.all(zero.signal[0, 10:13] == 0) and zero.nan_count == 303
    with pytest.raises(SignalError, match=r"record n1: 303 NaN samples in leads I \(3\), II \(300\)"):
        to_canonical(x, ["I", "II"], 100, cfg(nan_policy="reject"), record="n1")


@pytest.mark.parametrize("fs", [10, 20000, float("nan"), "fast"])
def test_absurd_sampling_rate(fs):
    with pytest.raises(SignalError, match=r"record r1: sampling rate"):
        to_canonical(np.zeros((1000, 1)), ["I"], fs, cfg(), record="r1")


def test_bad_shapes_and_inf():
    with pytest.raises(SignalError, match=r"must be 2-D"):
        to_canonical(np.zeros(300), ["I"], 100, cfg())
    with pytest.raises(SignalError, match=r"transposed"):
        to_canonical(np.zeros((2, 300)), ["I", "II"], 100, cfg())
    x = np.zeros((300, 2))
    x[4, 1] = np.inf
    with pytest.raises(SignalError, match=r"record q: 1 infinite samples in leads II"):
        to_canonical(x, ["I", "II"], 100, cfg(), record="q")
    with pytest.raises(SignalError, match=r"'V7' is not one of the 12 leads"):
        to_canonical(np.zeros((300, 1)), ["I"], 100, cfg(leads=["V7"]))


def test_resampling_keeps_a_dc_offset_at_the_edges():
    # zero padding would pull the first samples of a 7 mV offset towards 0
    out = to_canonical(np.full((1500, 1), 7.0), ["I"], 500, cfg(fs=100))
    assert np.allclose(out.signal[0], 7.0, atol=1e-5)
