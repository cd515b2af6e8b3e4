"""The synthetic world: real formats byte for byte, labels carried by the signal, class counts, speed."""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ecgray.synth import ecgqa as qa
from ecgray.synth import vocab
from ecgray.synth.labels import LABEL_TABLE, build_label_table, record_spec, sample_patient
from ecgray.synth.signal import synthesize
from ecgray.synth.world import generate_world, record_stem, to_100hz, write_wfdb

SMALL = 24  # patients in the module's small world


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_world(out, SMALL, seed=3, progress=False)
    return out


def _qa(world: Path, variant: str = "template", split: str | None = None) -> list[dict]:
    splits = [split] if split else ["train", "valid", "test"]
    return [
        s
        for sp in splits
        for f in sorted((world / "ecgqa/ptbxl" / variant / sp).glob("*.json"))
        for s in json.loads(f.read_text())
    ]


# --- formats -------------------------------------------------------------------------------------------


def test_wfdb_writer_is_byte_identical_to_wrsamp(tmp_path):
    import wfdb

    rng = np.random.default_rng(0)
    x = np.round(rng.normal(0, 0.4, (5000, 12)), 3)
    x[0, 3] = -2.5
    write_wfdb(tmp_path / "mine" / "00001_hr", x, 500)
    (tmp_path / "ref").mkdir()
    wfdb.wrsamp("00001_hr", fs=500, units=["mV"] * 12, sig_name=vocab.WFDB_LEAD_NAMES, p_signal=x, fmt=["16"] * 12,
                adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(tmp_path / "ref"))  # fmt: skip
    for ext in ("hea", "dat"):
        assert (tmp_path / "mine" / f"00001_hr.{ext}").read_bytes() == (
            tmp_path / "ref" / f"00001_hr.{ext}"
        ).read_bytes()
    sig, fields = wfdb.rdsamp(str(tmp_path / "mine" / "00001_hr"))
    assert (
        fields["fs"] == 500 and fields["units"] == ["mV"] * 12 and fields["sig_name"] == vocab.WFDB_LEAD_NAMES
    )
    np.testing.assert_allclose(sig, x, atol=5e-4)


def test_write_wfdb_rejects_out_of_range_signal(tmp_path):
    with pytest.raises(ValueError, match="16-bit range"):
        write_wfdb(tmp_path / "x", np.full((10, 12), 40.0), 500)


def test_ptbxl_database_has_the_real_columns_in_order(world, shared_data):
    real = pd.read_csv(shared_data / "ptbxl/ptbxl_database_subset.csv", index_col=0, nrows=3)
    ours = pd.read_csv(world / "ptbxl/ptbxl_database.csv")
    assert list(ours.columns) == [c for c in real.columns if c != "labels"]
    assert ours["ecg_id"].tolist() == list(range(1, len(ours) + 1))
    text = (world / "ptbxl/ptbxl_database.csv").read_text().splitlines()
    assert text[0].startswith(
        "ecg_id,patient_id,age,sex,height,weight,nurse,site,device,recording_date,report,scp_codes"
    )
    assert ours["patient_id"].dtype == float and ours["strat_fold"].between(1, 10).all()
    for value in ours["scp_codes"]:
        codes = ast.literal_eval(value)
        assert isinstance(codes, dict) and codes and set(codes) <= set(vocab.SCP_STATEMENTS)
        assert all(isinstance(v, float) for v in codes.values())
    assert (ours["filename_hr"] == [record_stem(i, 500) for i in ours["ecg_id"]]).all()
    # several recordings per patient, dates increasing within a patient
    per_patient = ours.groupby("patient_id")["ecg_id"].count()
    assert per_patient.max() >= 2 and per_patient.sum() == len(ours)


def test_scp_statements_71_rows_real_columns(world):
    st = pd.read_csv(world / "ptbxl/scp_statements.csv", index_col=0)
    assert len(st) == 71
    assert list(st.columns)[:6] == [
        "description",
        "diagnostic",
        "form",
        "rhythm",
        "diagnostic_class",
        "diagnostic_subclass",
    ]
    assert st["diagnostic"].sum() == 44 and st["form"].sum() == 19 and st["rhythm"].sum() == 12
    assert set(st["diagnostic_class"].dropna()) == {"NORM", "MI", "STTC", "CD", "HYP"}


def test_records_500_and_100_hz_ptbxl_headers(world):
    import wfdb

    db = pd.read_csv(world / "ptbxl/ptbxl_database.csv", index_col="ecg_id")
    no_limb_noise = [
        e for e in db.index if not any(vocab.parse_leads(db.loc[e, c]) for c in vocab.NOISE_COLUMNS.values())
    ]
    for ecg_id in no_limb_noise[:3]:
        hi, fh = wfdb.rdsamp(str(world / "ptbxl" / db.loc[ecg_id, "filename_hr"]))
        lo, fl = wfdb.rdsamp(str(world / "ptbxl" / db.loc[ecg_id, "filename_lr"]))
        assert hi.shape == (5000, 12) and lo.shape == (1000, 12) and fh["fs"] == 500 and fl["fs"] == 100
        assert fh["sig_name"] == ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]
        np.testing.assert_allclose(to_100hz(hi), lo, atol=1e-3)
        # Einthoven: III = II - I, aVR = -(I + II) / 2 (up to quantisation) where no lead-specific noise is labelled
        np.testing.assert_allclose(hi[:, 2], hi[:, 1] - hi[:, 0], atol=3e-3)
        np.testing.assert_allclose(hi[:, 3], -(hi[:, 0] + hi[:, 1]) / 2, atol=3e-3)
        header = (world / "ptbxl" / (db.loc[ecg_id, "filename_hr"] + ".hea")).read_text().splitlines()
        assert header[0].endswith(" 12 500 5000") and " 16 1000.0(0)/mV 16 0 " in header[1]


def test_real_readers_read_the_world(world):
    from ecgray.config import DataConfig
    from ecgray.data import ecgqa, ptbxl

    db = ptbxl.read_database(world / "ptbxl")
    assert db["patient_id"].dtype == "int64" and len(db) >= SMALL
    assert not any(db["noise_unparsed"].map(bool) & db["static_noise"].map(bool) & False)
    st = ptbxl.read_statements(world / "ptbxl")
    assert len(st) == 71
    cache = ptbxl.HeaderCache()
    first = int(db.index[0])
    rec = ptbxl.read_record_fast(ptbxl.record_path(world / "ptbxl", first), cache)
    ref = ptbxl.read_record(ptbxl.record_path(world / "ptbxl", first))
    np.testing.assert_array_equal(rec.signal, ref.signal)
    canon = ptbxl.read_record(ptbxl.record_path(world / "ptbxl", first), DataConfig())
    assert canon is not None
    splits = ecgqa.read_split_ecgs(world / "ecgqa", "ptbxl")
    assert set(splits) == set(db.index)
    answers = ecgqa.read_answers(world / "ecgqa", "ptbxl")
    assert len(answers) == 104
    for variant in ("template", "paraphrased"):
        samples = ecgqa.read_split(world / "ecgqa", "ptbxl", variant, "train")
        assert samples and all(set(s["ecg_id"]) <= set(db.index) for s in samples)


def test_ecgqa_layout_vocabulary_and_admissible_answers(world, shared_data):
    root = world / "ecgqa/ptbxl"
    for name in ("answers.csv", "answers_for_each_template.csv"):
        assert (root / name).read_bytes() == (shared_data / "ecgqa/ptbxl" / name).read_bytes()
    adm = qa.admissible()
    samples = _qa(world)
    for s in samples:
        assert set(s["answer"]) <= set(adm[s["template_id"]]), s
        assert s["question_type"] == qa.TEMPLATES[s["template_id"]][0]
        assert (s["attribute"] is None) == s["question_type"].startswith("comparison")
        assert len(s["ecg_id"]) == (1 if s["question_type"].startswith("single") else 2)
    assert {s["question_type"] for s in samples} == set(qa.QUESTION_TYPES_ALL)
    assert {s["attribute_type"] for s in samples} == {
        "scp_code",
        "noise",
        "stage_of_infarction",
        "extra_systole",
        "heart_axis",
        "numeric_feature",
    }
    # the real sample's field order
    real = json.loads((shared_data / "ecgqa/ptbxl/template/train/120000.json").read_text())[0]
    assert list(samples[0]) == list(real)


def test_paraphrased_same_samples_reworded(world):
    t, p = _qa(world, "template", "train"), _qa(world, "paraphrased", "train")
    assert len(t) == len(p)
    assert all(
        a["sample_id"] == b["sample_id"]
        and a["answer"] == b["answer"]
        and a["question_id"] == b["question_id"]
        for a, b in zip(t, p, strict=False)
    )
    assert np.mean([a["question"] != b["question"] for a, b in zip(t, p, strict=False)]) > 0.95
    wordings = defaultdict(set)
    for s in p:
        wordings[s["template_id"]].add(s["question"].split(" ")[0])
    assert sum(len(v) >= 2 for v in wordings.values()) >= 40  # several wordings per question


def test_splits_patient_disjoint_and_consecutive_pairs(world):
    db = pd.read_csv(world / "ptbxl/ptbxl_database.csv", index_col="ecg_id")
    patient = db["patient_id"].to_dict()
    split_patients = {}
    for split in ("train", "valid", "test"):
        lines = (world / f"ecgqa/ptbxl/{split}_ecgs.tsv").read_text().splitlines()
        ids = [int(line.split("\t")[1]) for line in lines]
        assert [int(line.split("\t")[0]) for line in lines] == list(range(len(ids)))
        split_patients[split] = {patient[i] for i in ids}
        for s in _qa(world, split=split):
            assert {patient[i] for i in s["ecg_id"]} <= split_patients[split]
            if s["question_type"].startswith("comparison_consecutive"):
                a, b = s["ecg_id"]
                assert patient[a] == patient[b] and a < b
            if s["question_type"].startswith("comparison_irrelevant"):
                a, b = s["ecg_id"]
                assert patient[a] != patient[b]
    assert not (split_patients["train"] & split_patients["valid"]) and not (
        split_patients["train"] & split_patients["test"]
    )


def test_answers_follow_the_metadata(world):
    db = pd.read_csv(world / "ptbxl/ptbxl_database.csv", index_col="ecg_id")
    feats = pd.read_csv(world / "ptbxl/synth_features.csv", index_col="ecg_id")
    codes_of = {e: ast.literal_eval(v) for e, v in db["scp_codes"].items()}
    for s in _qa(world):
        if s["template_id"] not in (10, 27, 41):
            continue
        e = s["ecg_id"][0]
        codes = codes_of[e]
        if s["template_id"] == 10:  # rhythm query
            want = sorted(vocab.QA_RHYTHM[c] for c in codes if c in vocab.QA_RHYTHM) or ["none"]
            assert s["answer"] == want
        if s["template_id"] == 27:
            leads = vocab.parse_leads(db.loc[e, vocab.NOISE_COLUMNS[s["attribute"][0]]])
            assert s["answer"] == (["yes"] if leads else ["no"])
        if s["template_id"] == 41:
            col = s["attribute"][0].replace(" ", "_") + "_ms"
            assert s["answer"] == [vocab.range_class(s["attribute"][0], feats.loc[e, col])]


def test_same_seed_identical_files_other_seed_differs(tmp_path):
    def digest(root: Path) -> str:
        h = hashlib.sha256()
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
        return h.hexdigest()

    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        generate_world(tmp_path / name, 10, seed, progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_packaged_label_table_matches_the_real_rows(shared_data, tmp_path):
    rebuilt = build_label_table(shared_data / "ptbxl/ptbxl_database_subset.csv", tmp_path / "rows.csv.gz")
    assert gzip.decompress(rebuilt.read_bytes()) == gzip.decompress(LABEL_TABLE.read_bytes())


def test_parse_leads():
    assert vocab.parse_leads(" , I-V1,  ") == ["I", "II", "III", "aVR", "aVL", "aVF", "V1"]
    assert vocab.parse_leads(" , II,AVF") == ["II", "aVF"]
    assert vocab.parse_leads("v6") == ["V6"] and vocab.parse_leads("V1???") == ["V1"]
    assert vocab.parse_leads("alles") == vocab.QA_LEAD_NAMES == vocab.parse_leads(" , mittel,  ")
    assert vocab.parse_leads(float("nan")) == [] and vocab.parse_leads(None) == []


# --- the signal carries the labels (model level, fast) ---------------------------------------------------


def _record(codes: dict, seed: int = 0, **row):
    rng = np.random.default_rng(seed)
    pat = sample_patient(rng)
    row = {"heart_axis": np.nan, "infarction_stadium1": np.nan, "extra_beats": np.nan, **row}
    spec, feats = record_spec(codes, row, pat, rng)
    x, info = synthesize(spec, 500, 10.0, rng)
    return x, feats, info, pat


def test_intervals_follow_conduction_labels():
    for seed in range(5):
        assert _record({"SR": 0.0, "NORM": 100.0}, seed)[1]["qrs duration"] < 120
        assert _record({"CLBBB": 100.0, "SR": 0.0}, seed)[1]["qrs duration"] >= 120
        assert _record({"CRBBB": 100.0, "SR": 0.0}, seed)[1]["qrs duration"] >= 120
        assert _record({"1AVB": 100.0, "SR": 0.0}, seed)[1]["pr interval"] > 200
        assert 350 < _record({"SR": 0.0}, seed)[1]["qt corrected"] < 460
        assert _record({"LNGQT": 100.0, "SR": 0.0}, seed)[1]["qt corrected"] > 460
        assert _record({"SBRAD": 0.0}, seed)[1]["rr interval"] > 1000
        assert _record({"STACH": 0.0}, seed)[1]["rr interval"] < 600


def test_af_is_irregular_without_p_and_sinus_is_regular():
    _, feats, info, _ = _record({"AFIB": 100.0}, 1)
    rr = np.diff(info["beat_times"])
    assert np.std(rr) / np.mean(rr) > 0.12 and np.isnan(feats["p duration"])
    _, _, info, _ = _record({"SR": 0.0}, 1)
    rr = np.diff(info["beat_times"])
    assert np.std(rr) / np.mean(rr) < 0.05


def _median_beat(x, info, lead):
    idx = (info["beat_times"] * 500).astype(int)
    idx = idx[(idx > 300) & (idx < 5000 - 400)]
    return np.median(np.stack([x[i - 300 : i + 400, lead] for i in idx]), 0)  # QRS onset at 300


def test_mi_territory_q_waves_and_st_in_the_right_leads():
    names = vocab.QA_LEAD_NAMES
    mi, _, info_mi, _ = _record({"IMI": 100.0, "SR": 0.0}, 2, infarction_stadium1="Stadium I")
    ref, _, info_ref, _ = _record({"SR": 0.0}, 2)

    def q_and_st(x, info, lead):
        beat = _median_beat(x, info, names.index(lead))
        base = beat[280]  # PR segment
        return beat[300:325].min() - base, beat[300 + 70 : 300 + 130].mean() - base  # first 50 ms; ST

    for lead in ("II", "III", "aVF"):  # inferior: deeper Q, ST elevation
        q_mi, st_mi = q_and_st(mi, info_mi, lead)
        q_ref, st_ref = q_and_st(ref, info_ref, lead)
        assert q_mi < q_ref - 0.1 and q_mi < -0.1 and st_mi > st_ref + 0.05, (
            lead,
            q_mi,
            q_ref,
            st_mi,
            st_ref,
        )
    for lead in ("V2", "V3"):  # the anterior wall is untouched
        assert abs(q_and_st(mi, info_mi, lead)[1] - q_and_st(ref, info_ref, lead)[1]) < 0.05


def test_lvh_high_and_lvolt_low_voltage():
    def voltage(codes, seed, leads=range(12)):  # mean QRS peak-to-peak of the median beat (mV)
        x, _, info, _ = _record(codes, seed)
        return np.mean([np.ptp(_median_beat(x, info, lead)[300:380]) for lead in leads])

    for seed in range(3):
        assert voltage({"LVH": 100.0, "SR": 0.0}, seed) > 1.4 * voltage({"SR": 0.0}, seed)
        # the clinical low-voltage criteria: limb leads < 0.5 mV, chest leads < 1 mV
        assert voltage({"LVOLT": 0.0, "SR": 0.0}, seed, range(6)) < 0.5
        assert voltage({"LVOLT": 0.0, "SR": 0.0}, seed, range(6, 12)) < 1.0


def test_noise_only_in_named_leads():
    x, *_ = _record({"SR": 0.0}, 5, burst_noise="V1,V2")
    clean, *_ = _record({"SR": 0.0}, 5)
    diff = np.abs(x - clean).max(0)
    assert diff[6] > 0.3 and diff[7] > 0.3 and diff[[0, 1, 10, 11]].max() < 1e-9


# --- class counts of the default world (method.md section 1, plain Python) ------------------------------

EXCLUDED = {4, 14, 17, 26, 28, 31, 40}
MIN_SIZE = {"single-verify": 140, "single-choose": 14, "single-query": 50}


def class_counts(samples: list[dict]) -> dict[str, int]:
    """Classes kept per single question type: keys (template, attributes, answer), size and group rules."""
    out = {}
    for qtype, minimum in MIN_SIZE.items():
        classes: dict[str, Counter] = defaultdict(Counter)
        for s in samples:
            if s["question_type"] != qtype or s["template_id"] in EXCLUDED:
                continue
            tid, attrs, ans = s["template_id"], "_".join(sorted(s["attribute"])), s["answer"]
            if qtype == "single-verify":
                keys = [f"{tid}_{attrs}_{ans[0]}"] if ans in (["yes"], ["no"]) else []
            elif qtype == "single-choose":
                if ans == ["none"]:
                    keys = [f"{tid}_{a}_none" for a in s["attribute"]]
                else:
                    keys = [f"{tid}_{attrs}_{ans[0] if len(ans) == 1 else 'both'}"] if len(ans) <= 2 else []
            else:
                keys = [f"{tid}_{attrs}_{', '.join(sorted(ans))}"]
            for k in keys:
                classes[k][s["question_id"]] += 1
        out[qtype] = sum(1 for g in classes.values() if sum(g.values()) >= minimum and max(g.values()) >= 10)
    return out


def test_class_rules_on_a_hand_made_list():
    def mk(tid, qt, attr, ans, qid):
        return {"template_id": tid, "question_type": qt, "attribute": attr, "answer": ans, "question_id": qid}

    samples = [mk(27, "single-verify", ["burst noise"], ["no"], 1)] * 140 + [
        mk(26, "single-verify", ["burst noise"], ["no"], 2)
    ] * 200
    samples += [mk(30, "single-choose", ["a", "b"], ["none"], 3)] * 14 + [
        mk(22, "single-query", [], ["x"], 4)
    ] * 49
    assert class_counts(samples) == {"single-verify": 1, "single-choose": 2, "single-query": 0}


@pytest.mark.slow
def test_default_world_size_and_class_counts(tmp_path):
    from ecgray.config import SynthConfig

    cfg = SynthConfig()
    t0 = time.perf_counter()
    summary = generate_world(tmp_path, cfg.patients, cfg.seed, progress=False)
    seconds = time.perf_counter() - t0
    counts = class_counts(_qa(tmp_path, split="train"))
    print(
        f"default world: {summary['records']} records, {summary['qa_samples']} samples, {seconds:.1f} s; train-split classes {counts}"
    )
    assert all(n >= 25 for n in counts.values()), counts  # its speed is bench/synth_speed.py's figure
    # the project's episode builder reads the same world and keeps the same classes
    from ecgray.config import EpisodeConfig
    from ecgray.data import ecgqa, episodes

    samples = ecgqa.read_split(tmp_path / "ecgqa", "ptbxl", "template", "train")
    built = {qt: len(episodes.build_classes(samples, qt, EpisodeConfig())) for qt in MIN_SIZE}
    assert built == counts, (built, counts)


# --- fidelity with an independent delineator (neurokit2) -------------------------------------------------


@pytest.mark.slow
def test_neurokit_measurements_agree_with_labels():
    from ecgray.synth.fidelity import checks, measure

    cases = [({"SR": 0.0, "NORM": 100.0}, "MID"), ({"SBRAD": 0.0}, np.nan), ({"STACH": 0.0}, np.nan), ({"AFIB": 100.0}, np.nan),
             ({"1AVB": 100.0, "SR": 0.0}, np.nan), ({"CLBBB": 100.0, "SR": 0.0}, "LAD"), ({"CRBBB": 100.0, "SR": 0.0}, np.nan),
             ({"LAFB": 100.0, "SR": 0.0}, "ALAD"), ({"SR": 0.0}, "RAD")]  # fmt: skip
    agree = defaultdict(list)
    for seed in range(4):
        for codes, axis in cases:
            x, *_ = _record(codes, 100 + seed, heart_axis=axis)
            for k, v in checks(codes, axis, np.nan, measure(x, 500)).items():
                agree[k].append(v)
    rates = {k: np.mean(v) for k, v in agree.items()}
    print(rates)
    assert set(rates) >= {
        "heart-rate class",
        "PR > 200 ms (1AVB)",
        "QRS >= 120 ms (CLBBB/CRBBB)",
        "RR irregular (AFIB)",
        "axis class (I/aVF)",
    }
    assert all(r >= 0.85 for r in rates.values()), rates


def test_measure_on_a_record_without_beats_gives_nan_not_an_error():
    from ecgray.synth.fidelity import measure

    flat = np.random.default_rng(0).normal(0, 0.01, (5000, 12))
    m = measure(flat, 500)
    assert np.isnan(m["qrs_ms"]) and np.isnan(m["axis_deg"])


# --- figure and CLI ------------------------------------------------------------------------------------


def test_render_ecg_png(tmp_path):
    from ecgray.synth.plot import render_ecg

    x, *_ = _record({"SR": 0.0}, 0)
    path = render_ecg(x, 500, tmp_path / "ecg.png", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20000
    with pytest.raises(ValueError, match=r"\(T, 12\)"):
        render_ecg(x[:, :3], 500, tmp_path / "bad.png")


def test_cli_generates_and_plots(tmp_path, capsys):
    from ecgray.cli import main

    assert (
        main(["synth", "--out", str(tmp_path), "--patients", "10", "--seed", "1", "--plot", "1", "--quiet"])
        == 0
    )
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[0])["patients"] == 10
    assert (tmp_path / "figures/00001.png").is_file()
    assert main(["synth", "--out", str(tmp_path), "--plot", "99999", "--plot-only"]) == 2
    assert "no record with ecg_id 99999" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path), "--patients", "3", "--quiet"]) == 2
