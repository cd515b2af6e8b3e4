"""Fixed vocabularies of the synthetic world: PTB-XL's 71 SCP statements, ECG-QA's answer names, lead names,
numeric-feature normal ranges. Facts are copied from the real files' formats (PTB-XL v1.0.3, ECG-QA v1.0.2)."""

from __future__ import annotations

# PTB-XL WFDB headers name the augmented leads in upper case; ECG-QA and the rest of ecgray use aVR/aVL/aVF.
WFDB_LEAD_NAMES = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]
QA_LEAD_NAMES = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]

# code: (description, diagnostic, form, rhythm, diagnostic_class, diagnostic_subclass, statement category)
# The 71 statements of PTB-XL's scp_statements.csv in its row order (44 diagnostic, 19 form, 12 rhythm; 4 overlap).
SCP_STATEMENTS: dict[str, tuple] = {
    "NDT": ("non-diagnostic T abnormalities", 1, 1, 0, "STTC", "STTC", "other ST-T descriptive statements"),
    "NST_": (
        "non-specific ST changes",
        1,
        1,
        0,
        "STTC",
        "NST_",
        "Basic roots for coding ST-T changes and abnormalities",
    ),
    "DIG": ("digitalis-effect", 1, 1, 0, "STTC", "STTC", "other ST-T descriptive statements"),
    "LNGQT": ("long QT-interval", 1, 1, 0, "STTC", "STTC", "other ST-T descriptive statements"),
    "NORM": ("normal ECG", 1, 0, 0, "NORM", "NORM", "Normal/abnormal"),
    "IMI": ("inferior myocardial infarction", 1, 0, 0, "MI", "IMI", "Myocardial Infarction"),
    "ASMI": ("anteroseptal myocardial infarction", 1, 0, 0, "MI", "AMI", "Myocardial Infarction"),
    "LVH": ("left ventricular hypertrophy", 1, 0, 0, "HYP", "LVH", "Ventricular Hypertrophy"),
    "LAFB": (
        "left anterior fascicular block",
        1,
        0,
        0,
        "CD",
        "LAFB/LPFB",
        "Intraventricular and intra-atrial Conduction disturbances",
    ),
    "ISC_": (
        "non-specific ischemic",
        1,
        0,
        0,
        "STTC",
        "ISC_",
        "Basic roots for coding ST-T changes and abnormalities",
    ),
    "IRBBB": (
        "incomplete right bundle branch block",
        1,
        0,
        0,
        "CD",
        "IRBBB",
        "Intraventricular and intra-atrial Conduction disturbances",
    ),
    "1AVB": ("first degree AV block", 1, 0, 0, "CD", "_AVB", "Atrioventricular Conduction disturbances"),
    "IVCD": (
        "non-specific intraventricular conduction disturbance (block)",
        1,
        0,
        0,
        "CD",
        "IVCD",
        "Intraventricular and intra-atrial Conduction disturbances",
    ),
    "ISCAL": ("ischemic in anterolateral leads", 1, 0, 0, "STTC", "ISCA", "Ischemic ST-T changes"),
    "CRBBB": (
        "complete right bundle branch block",
        1,
        0,
        0,
        "CD",
        "CRBBB",
        "Intraventricular and intra-atrial Conduction disturbances",
    ),
    "CLBBB": (
        "complete left bundle branch block",
        1,
        0,
        0,
        "CD",
        "CLBBB",
        "Intraventricular and intra-atrial Conduction disturbances",
    ),
    "ILMI": ("inferolateral myocardial infarction", 1, 0, 0, "MI", "IMI", "Myocardial Infarction"),
    "LAO/LAE": ("left atrial overload/enlargement", 1, 0, 0, "HYP", "LAO/LAE", "Atrial Hypertrophy"),
    "AMI": ("anterior myocardial infarction", 1, 0, 0, "MI", "AMI", "Myocardial Infarction"),
    "ALMI": ("anterolateral myocardial infarction", 1, 0, 0, "MI", "AMI", "Myocardial Infarction"),
    "ISCIN": ("ischemic in inferior leads", 1, 0, 0, "STTC", "ISCI", "Ischemic ST-T changes"),
    "INJAS": ("subendocardial injury in anteroseptal leads", 1, 0, 0, "MI", "AMI", "Myocardial Infarction"),
    "LMI": ("lateral myocardial infarction", 1, 0, 0, "MI", "LMI", "Myocardial Infarction"),
    "ISCIL": ("ischemic in inferolateral leads", 1, 0, 0, "STTC", "ISCI", "Ischemic ST-T changes"),
    "LPFB": (
        "left posterior fascicular block",
        1,
        0,
        0,
        "CD",
        "LAFB/LPFB",
        "Intraventricular and intra-atrial Conduction disturbances",
    ),
    "ISCAS": ("ischemic in anteroseptal leads", 1, 0, 0, "STTC", "ISCA", "Ischemic ST-T changes"),
    "INJAL": ("subendocardial injury in anterolateral leads", 1, 0, 0, "MI", "AMI", "Myocardial Infarction"),
    "ISCLA": ("ischemic in lateral leads", 1, 0, 0, "STTC", "ISCA", "Ischemic ST-T changes"),
    "RVH": ("right ventricular hypertrophy", 1, 0, 0, "HYP", "RVH", "Ventricular Hypertrophy"),
    "ANEUR": (
        "ST-T changes compatible with ventricular aneurysm",
        1,
        0,
        0,
        "STTC",
        "STTC",
        "other ST-T descriptive statements",
    ),
    "RAO/RAE": ("right atrial overload/enlargement", 1, 0, 0, "HYP", "RAO/RAE", "Atrial Hypertrophy"),
    "EL": (
        "electrolytic disturbance or drug (former EDIS)",
        1,
        0,
        0,
        "STTC",
        "STTC",
        "other ST-T descriptive statements",
    ),
    "WPW": (
        "Wolf-Parkinson-White syndrome",
        1,
        0,
        0,
        "CD",
        "WPW",
        "Intraventricular and intra-atrial Conduction disturbances",
    ),
    "ILBBB": (
        "incomplete left bundle branch block",
        1,
        0,
        0,
        "CD",
        "ILBBB",
        "Intraventricular and intra-atrial Conduction disturbances",
    ),
    "IPLMI": ("inferoposterolateral myocardial infarction", 1, 0, 0, "MI", "IMI", "Myocardial Infarction"),
    "ISCAN": ("ischemic in anterior leads", 1, 0, 0, "STTC", "ISCA", "Ischemic ST-T changes"),
    "IPMI": ("inferoposterior myocardial infarction", 1, 0, 0, "MI", "IMI", "Myocardial Infarction"),
    "SEHYP": ("septal hypertrophy", 1, 0, 0, "HYP", "SEHYP", "Ventricular Hypertrophy"),
    "INJIN": ("subendocardial injury in inferior leads", 1, 0, 0, "MI", "IMI", "Myocardial Infarction"),
    "INJLA": ("subendocardial injury in lateral leads", 1, 0, 0, "MI", "AMI", "Myocardial Infarction"),
    "PMI": ("posterior myocardial infarction", 1, 0, 0, "MI", "PMI", "Myocardial Infarction"),
    "3AVB": ("third degree AV block", 1, 0, 0, "CD", "_AVB", "Atrioventricular Conduction disturbances"),
    "INJIL": ("subendocardial injury in inferolateral leads", 1, 0, 0, "MI", "IMI", "Myocardial Infarction"),
    "2AVB": ("second degree AV block", 1, 0, 0, "CD", "_AVB", "Atrioventricular Conduction disturbances"),
    "ABQRS": ("abnormal QRS", 0, 1, 0, "", "", "other QRS descriptive statements"),
    "PVC": ("ventricular premature complex", 0, 1, 0, "", "", "Arrhythmia"),
    "STD_": (
        "non-specific ST depression",
        0,
        1,
        0,
        "",
        "",
        "Basic roots for coding ST-T changes and abnormalities",
    ),
    "VCLVH": (
        "voltage criteria (QRS) for left ventricular hypertrophy",
        0,
        1,
        0,
        "",
        "",
        "Ventricular Hypertrophy",
    ),
    "QWAVE": ("Q waves present", 0, 1, 0, "", "", "other QRS descriptive statements"),
    "LOWT": (
        "low amplitude T-wave",
        0,
        1,
        0,
        "",
        "",
        "Basic roots for coding ST-T changes and abnormalities",
    ),
    "NT_": (
        "non-specific T-wave changes",
        0,
        1,
        0,
        "",
        "",
        "Basic roots for coding ST-T changes and abnormalities",
    ),
    "PAC": ("atrial premature complex", 0, 1, 0, "", "", "Arrhythmia"),
    "LPR": ("prolonged PR interval", 0, 1, 0, "", "", "other descriptive statements"),
    "INVT": ("inverted T-waves", 0, 1, 0, "", "", "Basic roots for coding ST-T changes and abnormalities"),
    "LVOLT": (
        "low QRS voltages in the frontal and horizontal leads",
        0,
        1,
        0,
        "",
        "",
        "other QRS descriptive statements",
    ),
    "HVOLT": ("high QRS voltage", 0, 1, 0, "", "", "other QRS descriptive statements"),
    "TAB_": ("T-wave abnormality", 0, 1, 0, "", "", "Basic roots for coding ST-T changes and abnormalities"),
    "STE_": (
        "non-specific ST elevation",
        0,
        1,
        0,
        "",
        "",
        "Basic roots for coding ST-T changes and abnormalities",
    ),
    "PRC(S)": ("premature complex(es)", 0, 1, 0, "", "", "Arrhythmia"),
    "SR": ("sinus rhythm", 0, 0, 1, "", "", "Rhythm"),
    "AFIB": ("atrial fibrillation", 0, 0, 1, "", "", "Arrhythmia"),
    "STACH": ("sinus tachycardia", 0, 0, 1, "", "", "Rhythm"),
    "SARRH": ("sinus arrhythmia", 0, 0, 1, "", "", "Rhythm"),
    "SBRAD": ("sinus bradycardia", 0, 0, 1, "", "", "Rhythm"),
    "PACE": ("normal functioning artificial pacemaker", 0, 0, 1, "", "", "Rhythm"),
    "SVARR": ("supraventricular arrhythmia", 0, 0, 1, "", "", "Arrhythmia"),
    "BIGU": ("bigeminal pattern (unknown origin, SV or Ventricular)", 0, 0, 1, "", "", "Arrhythmia"),
    "AFLT": ("atrial flutter", 0, 0, 1, "", "", "Arrhythmia"),
    "SVTAC": ("supraventricular tachycardia", 0, 0, 1, "", "", "Arrhythmia"),
    "PSVT": ("paroxysmal supraventricular tachycardia", 0, 0, 1, "", "", "Arrhythmia"),
    "TRIGU": ("trigeminal pattern (unknown origin, SV or Ventricular)", 0, 0, 1, "", "", "Arrhythmia"),
}
assert len(SCP_STATEMENTS) == 71

SCP_COLUMNS = [
    "description", "diagnostic", "form", "rhythm", "diagnostic_class", "diagnostic_subclass",
    "Statement Category", "SCP-ECG Statement Description", "AHA code", "aECG REFID", "CDISC Code", "DICOM Code",
]  # fmt: skip

# SCP code -> ECG-QA answer name (answers.csv). Codes missing here (NORM, RVH, SEHYP, EL, WPW, ANEUR, 2AVB,
# 3AVB, PRC(S), SVARR, PSVT, TRIGU) have no ECG-QA name, as in the real dataset.
QA_DIAGNOSTIC = {
    "CLBBB": "complete left bundle branch block", "CRBBB": "complete right bundle branch block",
    "DIG": "digitalis effect", "1AVB": "first degree av block", "ILBBB": "incomplete left bundle branch block",
    "IRBBB": "incomplete right bundle branch block", "ISCAN": "ischemic in anterior leads",
    "ISCAL": "ischemic in anterolateral leads", "ISCAS": "ischemic in anteroseptal leads",
    "ISCIN": "ischemic in inferior leads", "ISCIL": "ischemic in inferolateral leads",
    "ISCLA": "ischemic in lateral leads", "LAFB": "left anterior fascicular block",
    "LAO/LAE": "left atrial overload/enlargement", "LPFB": "left posterior fascicular block",
    "LVH": "left ventricular hypertrophy", "LNGQT": "long qt-interval",
    "AMI": "myocardial infarction in anterior leads", "ALMI": "myocardial infarction in anterolateral leads",
    "ASMI": "myocardial infarction in anteroseptal leads", "IMI": "myocardial infarction in inferior leads",
    "ILMI": "myocardial infarction in inferolateral leads", "IPMI": "myocardial infarction in inferoposterior leads",
    "IPLMI": "myocardial infarction in inferoposterolateral leads", "LMI": "myocardial infarction in lateral leads",
    "PMI": "myocardial infarction in posterior leads", "NDT": "non-diagnostic t abnormalities",
    "IVCD": "non-specific intraventricular conduction disturbance (block)", "ISC_": "non-specific ischemic",
    "NST_": "non-specific st changes", "RAO/RAE": "right atrial overload/enlargement",
    "INJAL": "subendocardial injury in anterolateral leads", "INJAS": "subendocardial injury in anteroseptal leads",
    "INJIN": "subendocardial injury in inferior leads", "INJIL": "subendocardial injury in inferolateral leads",
    "INJLA": "subendocardial injury in lateral leads",
}  # fmt: skip
QA_FORM = {
    "ABQRS": "abnormal qrs", "PAC": "atrial premature complex", "HVOLT": "high qrs voltage",
    "INVT": "inverted t-waves", "LOWT": "low amplitude t-wave",
    "LVOLT": "low qrs voltages in the frontal and horizontal leads", "STD_": "non-specific st depression",
    "STE_": "non-specific st elevation", "NT_": "non-specific t-wave changes", "LPR": "prolonged pr interval",
    "QWAVE": "q waves present", "TAB_": "t-wave abnormality", "PVC": "ventricular premature complex",
    "VCLVH": "voltage criteria (qrs) for left ventricular hypertrophy",
    # form statements that are also diagnostic
    "DIG": "digitalis effect", "LNGQT": "long qt-interval", "NDT": "non-diagnostic t abnormalities",
    "NST_": "non-specific st changes",
}  # fmt: skip
QA_RHYTHM = {
    "AFIB": "atrial fibrillation", "AFLT": "atrial flutter",
    "BIGU": "bigeminal pattern (unknown origin, supraventricular, or ventricular)",
    "PACE": "normal functioning artificial pacemaker", "SARRH": "sinus arrhythmia", "SBRAD": "sinus bradycardia",
    "SR": "sinus rhythm", "STACH": "sinus tachycardia", "SVTAC": "supraventricular tachycardia",
}  # fmt: skip
QA_SUPERCLASS = {
    "CD": "conduction disturbance",
    "HYP": "hypertrophy",
    "MI": "myocardial infarction",
    "STTC": "st/t change",
}

# heart_axis code of ptbxl_database.csv -> ECG-QA answer, and the frontal QRS axis range (degrees) the signal
# model targets for it. Missing heart_axis -> normal axis.
AXIS_QA = {
    "MID": "normal heart axis", "LAD": "left axis deviation", "ALAD": "left axis deviation",
    "AXL": "left axis deviation", "RAD": "right axis deviation", "ARAD": "right axis deviation",
    "AXR": "right axis deviation", "SAG": "extreme axis deviation",
}  # fmt: skip
AXIS_TARGET_DEG = {
    "normal heart axis": (5.0, 70.0), "left axis deviation": (-75.0, -45.0),
    "right axis deviation": (105.0, 155.0), "extreme axis deviation": (-155.0, -120.0),
}  # fmt: skip
AXIS_ANSWERS = ["extreme axis deviation", "left axis deviation", "normal heart axis", "right axis deviation"]


def axis_class(deg: float) -> str:
    """Frontal QRS axis in degrees -> ECG-QA heart-axis answer (normal -30..90)."""
    deg = (deg + 180.0) % 360.0 - 180.0
    if -30.0 <= deg <= 90.0:
        return "normal heart axis"
    if -90.0 <= deg < -30.0:
        return "left axis deviation"
    if 90.0 < deg <= 180.0:
        return "right axis deviation"
    return "extreme axis deviation"


# infarction_stadium -> ECG-QA stages (templates 23-25)
STAGE_QA = {
    "Stadium I": ["early stage of myocardial infarction"],
    "Stadium I-II": ["early stage of myocardial infarction", "middle stage of myocardial infarction"],
    "Stadium II": ["middle stage of myocardial infarction"],
    "Stadium II-III": ["middle stage of myocardial infarction", "old stage of myocardial infarction"],
    "Stadium III": ["old stage of myocardial infarction"],
    "unknown": ["unknown stage of myocardial infarction"],
}
STAGE_ANSWERS = [
    "early stage of myocardial infarction",
    "middle stage of myocardial infarction",
    "old stage of myocardial infarction",
]
NO_MI_STAGE = "none of myocardial infarction"

NOISE_TYPES = ["baseline drift", "static noise", "burst noise", "electrodes problems"]
NOISE_COLUMNS = {
    "baseline drift": "baseline_drift",
    "static noise": "static_noise",
    "burst noise": "burst_noise",
    "electrodes problems": "electrodes_problems",
}
EXTRA_TYPES = ["extrasystoles", "supraventricular extrasystoles", "ventricular extrasystoles"]

# Numeric features (ms) and their normal ranges [low, high]; below/within/above is judged on the value
# measured from the model's own wave timings.
NUMERIC_FEATURES = ["p duration", "pr interval", "qrs duration", "qt interval", "qt corrected", "rr interval"]
NORMAL_RANGE_MS = {
    "p duration": (80.0, 120.0), "pr interval": (120.0, 200.0), "qrs duration": (70.0, 120.0),
    "qt interval": (320.0, 440.0), "qt corrected": (350.0, 450.0), "rr interval": (600.0, 1000.0),
}  # fmt: skip
RANGE_ANSWERS = ["below the normal range", "within the normal range", "above the normal range"]


def range_class(feature: str, value_ms: float) -> str:
    lo, hi = NORMAL_RANGE_MS[feature]
    return RANGE_ANSWERS[0] if value_ms < lo else RANGE_ANSWERS[2] if value_ms > hi else RANGE_ANSWERS[1]


def parse_leads(text) -> list[str]:
    """A PTB-XL lead string (" , I-V1,  ", " , II,AVF", "alles", "v6", "V1???") -> lead names in order.

    Ranges follow the standard lead order; "alles" (all) and strings naming no lead (e.g. "mittel",
    "Elektroden vertauscht???") mean every lead. NaN / empty -> [].
    """
    if text is None or (isinstance(text, float) and text != text) or not str(text).strip(" ,"):
        return []
    upper = [n.upper() for n in WFDB_LEAD_NAMES]
    chosen: set[int] = set()
    named_any = False
    for token in str(text).replace("?", "").split(","):
        token = token.strip().upper()
        if not token:
            continue
        if token == "ALLES":
            return list(QA_LEAD_NAMES)
        if "-" in token:
            a, _, b = token.partition("-")
            if a.strip() in upper and b.strip() in upper:
                i, j = upper.index(a.strip()), upper.index(b.strip())
                chosen.update(range(min(i, j), max(i, j) + 1))
                named_any = True
                continue
        if token in upper:
            chosen.add(upper.index(token))
            named_any = True
    if not named_any:
        return list(QA_LEAD_NAMES)
    return [QA_LEAD_NAMES[i] for i in sorted(chosen)]
