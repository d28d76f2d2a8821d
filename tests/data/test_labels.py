"""Table-driven tests for the label policy of every metadata source."""

from pathlib import Path

import pandas as pd
import pytest
from isic_metadata.diagnosis_hierarchical import DiagnosisEnum
from isic_metadata.fields import LegacyDxEnum

from data.labels import (
    CURRENT_ISIC_DIAGNOSES,
    LABEL_SOURCES,
    Category,
    Outcome,
    label_current_isic,
    label_ham10000,
    label_isic2019,
    label_legacy_isic,
    label_table,
    validate_positive_class,
)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SHARED_METADATA = SHARED_DATA / "metadata"
POSITIVE, NEGATIVE, EXCLUDED = Outcome.POSITIVE, Outcome.NEGATIVE, Outcome.EXCLUDED
MELANOMA_NODE = DiagnosisEnum.malignant_malignant_melanocytic_proliferations_melanoma.value

# (diagnosis_1 .. diagnosis_5, outcome under "melanoma", outcome under "malignant", exclusion reason)
CURRENT_ISIC_CASES = [
    (("Malignant", "Malignant melanocytic proliferations (Melanoma)", "Melanoma in situ"), POSITIVE, POSITIVE, ""),
    (("Malignant", "Malignant melanocytic proliferations (Melanoma)", "Melanoma Invasive",
      "Melanoma Invasive, Superficial spreading"), POSITIVE, POSITIVE, ""),
    (("Malignant", "Malignant melanocytic proliferations (Melanoma)", "Melanoma metastasis"), POSITIVE, POSITIVE, ""),
    (("Malignant", "Malignant melanocytic proliferations (Melanoma)", "Melanoma, NOS"), POSITIVE, POSITIVE, ""),
    (("MALIGNANT", "malignant melanocytic proliferations (melanoma)"), POSITIVE, POSITIVE, ""),
    ((None, None, "Melanoma in situ"), POSITIVE, POSITIVE, ""),
    (("Malignant", "Malignant melanocytic proliferations (Melanoma)", "Melanoma, newer subtype"), POSITIVE,
     POSITIVE, ""),
    (("Malignant", "Malignant adnexal epithelial proliferations - Follicular", "Basal cell carcinoma"), NEGATIVE,
     POSITIVE, ""),
    (("Malignant", None, "Basal cell carcinoma"), NEGATIVE, POSITIVE, ""),
    (("Malignant", "Malignant epidermal proliferations"), NEGATIVE, POSITIVE, ""),
    (("Malignant",), EXCLUDED, POSITIVE, "unspecified malignant diagnosis"),
    (("Malignant", "Collision - At least one malignant proliferation"), EXCLUDED, POSITIVE,
     "unspecified malignant diagnosis"),
    (("Malignant", "Newer malignant branch"), EXCLUDED, POSITIVE, "unknown diagnosis_2 'newer malignant branch'"),
    (("Benign", "Benign melanocytic proliferations", "Nevus"), NEGATIVE, NEGATIVE, ""),
    (("Benign",), NEGATIVE, NEGATIVE, ""),
    (("Benign", "Newer benign branch"), NEGATIVE, NEGATIVE, ""),
    (("Indeterminate", "Indeterminate melanocytic proliferations", "Atypical Spitz tumor"), EXCLUDED, EXCLUDED,
     "indeterminate diagnosis"),
    (("Indeterminate",), EXCLUDED, EXCLUDED, "indeterminate diagnosis"),
    (("Benign", "Malignant melanocytic proliferations (Melanoma)"), EXCLUDED, EXCLUDED,
     "conflicting diagnosis_2 'malignant melanocytic proliferations (melanoma)'"),
    ((None, None, None), EXCLUDED, EXCLUDED, "missing diagnosis"),
    ((" ", float("nan"), None), EXCLUDED, EXCLUDED, "missing diagnosis"),
    (("Suspicious",), EXCLUDED, EXCLUDED, "unknown diagnosis_1 'suspicious'"),
    ((None, "Something else"), EXCLUDED, EXCLUDED, "unknown diagnosis 'something else'"),
]

# (benign_malignant, diagnosis, outcome under "melanoma", outcome under "malignant", exclusion reason)
LEGACY_ISIC_CASES = [
    ("malignant", "melanoma", POSITIVE, POSITIVE, ""),
    (None, "melanoma metastasis", POSITIVE, POSITIVE, ""),
    ("benign", "melanoma", POSITIVE, POSITIVE, ""),
    ("benign", "nevus", NEGATIVE, NEGATIVE, ""),
    ("benign", None, NEGATIVE, NEGATIVE, ""),
    ("benign", "unknown", NEGATIVE, NEGATIVE, ""),
    ("benign", "atypical melanocytic proliferation", NEGATIVE, NEGATIVE, ""),
    ("benign", "actinic keratosis", NEGATIVE, NEGATIVE, ""),
    ("malignant", "basal cell carcinoma", NEGATIVE, POSITIVE, ""),
    ("malignant", "nevus", NEGATIVE, POSITIVE, ""),
    ("malignant", None, EXCLUDED, POSITIVE, "unspecified malignant diagnosis"),
    ("malignant", "other", EXCLUDED, POSITIVE, "unspecified malignant diagnosis"),
    (None, "basal cell carcinoma", NEGATIVE, POSITIVE, ""),
    (None, "Seborrheic Keratosis", NEGATIVE, NEGATIVE, ""),
    (None, "AIMP", EXCLUDED, EXCLUDED, "indeterminate diagnosis"),
    ("indeterminate", None, EXCLUDED, EXCLUDED, "indeterminate diagnosis"),
    ("indeterminate/benign", None, EXCLUDED, EXCLUDED, "indeterminate diagnosis"),
    ("indeterminate/malignant", "nevus", EXCLUDED, EXCLUDED, "indeterminate diagnosis"),
    (None, None, EXCLUDED, EXCLUDED, "missing diagnosis"),
    (None, "unknown", EXCLUDED, EXCLUDED, "missing diagnosis"),
    ("benign", "blue blob", EXCLUDED, EXCLUDED, "unknown diagnosis 'blue blob'"),
    ("maybe", "nevus", EXCLUDED, EXCLUDED, "unknown benign_malignant 'maybe'"),
]

# (dx, outcome under "melanoma", outcome under "malignant", exclusion reason)
HAM10000_CASES = [
    ("mel", POSITIVE, POSITIVE, ""),
    ("MEL ", POSITIVE, POSITIVE, ""),
    ("bcc", NEGATIVE, POSITIVE, ""),
    ("akiec", NEGATIVE, POSITIVE, ""),
    ("nv", NEGATIVE, NEGATIVE, ""),
    ("bkl", NEGATIVE, NEGATIVE, ""),
    ("df", NEGATIVE, NEGATIVE, ""),
    ("vasc", NEGATIVE, NEGATIVE, ""),
    (None, EXCLUDED, EXCLUDED, "missing diagnosis"),
    ("xyz", EXCLUDED, EXCLUDED, "unknown dx 'xyz'"),
]

# (one-hot row, outcome under "melanoma", outcome under "malignant", exclusion reason)
ISIC2019_CASES = [
    ({"MEL": "1.0", "NV": "0.0"}, POSITIVE, POSITIVE, ""),
    ({"MEL": 0, "SCC": 1}, NEGATIVE, POSITIVE, ""),
    ({"AK": "1"}, NEGATIVE, POSITIVE, ""),
    ({"BCC": 1}, NEGATIVE, POSITIVE, ""),
    ({"VASC": 1}, NEGATIVE, NEGATIVE, ""),
    ({"NV": 1}, NEGATIVE, NEGATIVE, ""),
    ({"UNK": 1}, EXCLUDED, EXCLUDED, "unknown diagnosis"),
    ({"MEL": 1, "NV": 1}, EXCLUDED, EXCLUDED, "not exactly one diagnosis column set"),
    ({"MEL": 0}, EXCLUDED, EXCLUDED, "not exactly one diagnosis column set"),
]


def _check(decide, melanoma: Outcome, malignant: Outcome, reason: str) -> None:
    for positive_class, expected in (("melanoma", melanoma), ("malignant", malignant)):
        decision = decide(positive_class)
        assert decision.outcome is expected, positive_class
        assert decision.reason == (reason if expected is EXCLUDED else ""), positive_class


@pytest.mark.parametrize(("levels", "melanoma", "malignant", "reason"), CURRENT_ISIC_CASES)
def test_label_current_isic_cases(levels, melanoma, malignant, reason):
    _check(lambda policy: label_current_isic(*levels, positive_class=policy), melanoma, malignant, reason)


@pytest.mark.parametrize(("status", "diagnosis", "melanoma", "malignant", "reason"), LEGACY_ISIC_CASES)
def test_label_legacy_isic_cases(status, diagnosis, melanoma, malignant, reason):
    _check(lambda policy: label_legacy_isic(status, diagnosis, positive_class=policy), melanoma, malignant, reason)


@pytest.mark.parametrize(("dx", "melanoma", "malignant", "reason"), HAM10000_CASES)
def test_label_ham10000_cases(dx, melanoma, malignant, reason):
    _check(lambda policy: label_ham10000(dx, positive_class=policy), melanoma, malignant, reason)


@pytest.mark.parametrize(("row", "melanoma", "malignant", "reason"), ISIC2019_CASES)
def test_label_isic2019_cases(row, melanoma, malignant, reason):
    _check(lambda policy: label_isic2019(row, positive_class=policy), melanoma, malignant, reason)


def test_current_isic_table_covers_hierarchy():
    assert set(CURRENT_ISIC_DIAGNOSES) == {member.value.lower() for member in DiagnosisEnum}


def test_current_isic_terminal_names_unique():
    terminals = [member.value.rsplit(":", 1)[-1].lower() for member in DiagnosisEnum]
    assert len(terminals) == len(set(terminals))


def test_label_current_isic_every_hierarchy_path():
    for member in DiagnosisEnum:
        levels = member.value.split(":")
        melanoma = label_current_isic(*levels, positive_class="melanoma")
        malignant = label_current_isic(*levels, positive_class="malignant")
        if member.value.startswith(MELANOMA_NODE):
            assert melanoma.outcome is POSITIVE, member.value
            assert malignant.outcome is POSITIVE, member.value
        elif levels[0] == "Malignant":
            assert melanoma.outcome in (NEGATIVE, EXCLUDED), member.value
            assert malignant.outcome is POSITIVE, member.value
        elif levels[0] == "Benign":
            assert melanoma.outcome is NEGATIVE, member.value
            assert malignant.outcome is NEGATIVE, member.value
        else:
            assert melanoma.reason == "indeterminate diagnosis", member.value
            assert malignant.reason == "indeterminate diagnosis", member.value


def test_current_isic_melanoma_paths_count():
    melanoma_paths = {path for path, category in CURRENT_ISIC_DIAGNOSES.items() if category is Category.MELANOMA}
    assert melanoma_paths == {m.value.lower() for m in DiagnosisEnum if m.value.startswith(MELANOMA_NODE)}
    assert {path.split(":")[2] for path in melanoma_paths if path.count(":") >= 2} == {
        "melanoma invasive", "melanoma in situ", "melanoma metastasis", "melanoma, nos"}


def test_legacy_table_covers_isic_metadata_values():
    legacy = label_table("legacy-isic")
    assert {member.value.lower() for member in LegacyDxEnum} <= set(legacy["value"])


@pytest.mark.parametrize("source", LABEL_SOURCES)
def test_label_table_matches_categories(source):
    expected = {"melanoma": {"positive"}, "benign": {"negative"}}
    table = label_table(source)
    assert list(table.columns) == ["value", "category", "melanoma", "malignant"]
    assert table["value"].is_unique
    for category, outcomes in expected.items():
        rows = table[table["category"] == category]
        assert set(rows["melanoma"]) == outcomes, category
        assert set(rows["malignant"]) == outcomes, category
    other = table[table["category"] == "other malignant"]
    assert set(other["melanoma"]) == {"negative"}
    assert set(other["malignant"]) == {"positive"}


def test_label_table_invalid_source():
    with pytest.raises(ValueError, match="Invalid label source 'isic2018': expected one of current-isic"):
        label_table("isic2018")


def test_validate_positive_class_errors():
    assert validate_positive_class(" Melanoma ") == "melanoma"
    with pytest.raises(ValueError, match="Invalid positive class 'nevus': expected one of melanoma, malignant"):
        validate_positive_class("nevus")
    with pytest.raises(ValueError, match="Invalid positive class 'benign'"):
        label_ham10000("mel", positive_class="benign")


@pytest.mark.skipif(not (SHARED_METADATA / "ISIC_2020_Training_GroundTruth.csv").is_file(),
                    reason="the shared ISIC 2020 ground-truth CSV is absent")
def test_label_legacy_isic2020_values():
    frame = pd.read_csv(SHARED_METADATA / "ISIC_2020_Training_GroundTruth.csv",
                        usecols=["benign_malignant", "diagnosis", "target"])
    pairs = frame[["benign_malignant", "diagnosis", "target"]].drop_duplicates()
    assert len(pairs) == 9
    for status, diagnosis, target in pairs.itertuples(index=False):
        decision = label_legacy_isic(status, diagnosis, positive_class="melanoma")
        assert decision.outcome is Outcome(int(target)), (status, diagnosis)


@pytest.mark.skipif(not (SHARED_DATA / "ham10000").is_dir(), reason="the shared HAM10000 metadata is absent")
def test_label_ham10000_shared_counts():
    dx = pd.read_csv(SHARED_DATA / "ham10000" / "HAM10000_metadata.csv", usecols=["dx"])["dx"]
    for positive_class, expected in (("melanoma", 1113), ("malignant", 1113 + 514 + 327)):
        outcomes = [label_ham10000(code, positive_class=positive_class).outcome for code in dx]
        assert outcomes.count(POSITIVE) == expected, positive_class
        assert EXCLUDED not in outcomes, positive_class
