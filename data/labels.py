"""Label policy: which diagnoses count as positive, negative or excluded.

Each metadata source names diagnoses in its own vocabulary. The tables here map every known value to
one of three outcomes, so that a row is never called benign by accident: a value missing from a table
is excluded with the reason ``unknown diagnosis`` and counted in the data report.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

__all__ = ["POSITIVE_CLASSES", "LabelDecision", "Outcome", "label_current_isic", "label_ham10000", "label_isic2019",
           "label_legacy_isic", "validate_positive_class"]

POSITIVE_CLASSES = ("melanoma", "malignant")
"""Allowed values of the positive-class setting: melanoma only (the default), or any malignant lesion."""

# The ISIC hierarchy puts every melanoma (in situ, invasive, metastatic, NOS) under this diagnosis_2 value.
ISIC_MELANOMA_DIAGNOSIS_2 = "malignant melanocytic proliferations (melanoma)"

# Legacy ISIC `diagnosis` values (lower case) that are malignant. Anything else with
# benign_malignant == "benign" is negative under both policies.
_LEGACY_MALIGNANT = {
    "melanoma", "melanoma metastasis", "basal cell carcinoma", "squamous cell carcinoma",
    "merkel cell carcinoma", "atypical fibroxanthoma", "bowen's disease",
}

# HAM10000 `dx` codes. akiec (actinic keratosis and intraepithelial carcinoma, i.e. Bowen's disease) is
# counted as malignant, as in the ISIC 2018 and 2019 challenges.
_HAM10000_MALIGNANT = {"mel", "bcc", "akiec"}
_HAM10000_KNOWN = {"mel", "nv", "bkl", "bcc", "akiec", "vasc", "df"}

# ISIC 2019 one-hot columns. UNK (none of the others) has no usable label.
ISIC2019_COLUMNS = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
_ISIC2019_MALIGNANT = {"MEL", "BCC", "AK", "SCC"}


class Outcome(enum.IntEnum):
    NEGATIVE = 0
    POSITIVE = 1
    EXCLUDED = -1


@dataclass(frozen=True)
class LabelDecision:
    """The label of one row, with the reason when the row is excluded."""

    outcome: Outcome
    reason: str = ""


_MISSING = LabelDecision(Outcome.EXCLUDED, "missing diagnosis")
_INDETERMINATE = LabelDecision(Outcome.EXCLUDED, "indeterminate diagnosis")


def validate_positive_class(positive_class: str) -> str:
    """Return ``positive_class`` lower-cased, or raise ValueError naming the allowed values."""
    value = str(positive_class).strip().lower()
    if value not in POSITIVE_CLASSES:
        raise ValueError(
            f"Invalid positive class {positive_class!r}: expected one of {', '.join(POSITIVE_CLASSES)}. "
            "Use 'melanoma' for melanoma vs the rest, or 'malignant' for any malignant lesion vs benign."
        )
    return value


def _text(value: object) -> str:
    """Normalise a metadata cell: NaN, None and blank become the empty string."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip().lower()


def _decide(is_positive: bool) -> LabelDecision:
    return LabelDecision(Outcome.POSITIVE if is_positive else Outcome.NEGATIVE)


def label_current_isic(diagnosis_1: object, diagnosis_2: object, diagnosis_3: object, *,
                       positive_class: str) -> LabelDecision:
    """Label a row with the current ISIC columns (``diagnosis_1`` Benign/Malignant/Indeterminate)."""
    level_1, level_2, level_3 = _text(diagnosis_1), _text(diagnosis_2), _text(diagnosis_3)
    is_melanoma = level_2 == ISIC_MELANOMA_DIAGNOSIS_2 or level_3.startswith("melanoma")

    if level_1 == "indeterminate":
        return _INDETERMINATE
    if level_1 == "benign":
        return _decide(False)
    if level_1 == "malignant":
        return _decide(is_melanoma or positive_class == "malignant")
    if not level_1 and is_melanoma:
        return _decide(True)
    if not level_1:
        return _MISSING
    return LabelDecision(Outcome.EXCLUDED, f"unknown diagnosis_1 {level_1!r}")


def label_legacy_isic(benign_malignant: object, diagnosis: object, *, positive_class: str) -> LabelDecision:
    """Label a row with the legacy ISIC columns ``benign_malignant`` and ``diagnosis``."""
    status, name = _text(benign_malignant), _text(diagnosis)
    if name in ("melanoma", "melanoma metastasis"):
        return _decide(True)
    if status == "benign":
        return _decide(False)
    if status == "malignant":
        return _decide(positive_class == "malignant")
    if name in _LEGACY_MALIGNANT:
        return _decide(positive_class == "malignant")
    if status.startswith("indeterminate") or name == "unknown":
        return _INDETERMINATE
    if not status and not name:
        return _MISSING
    return LabelDecision(Outcome.EXCLUDED, f"unknown diagnosis {name or status!r}")


def label_ham10000(dx: object, *, positive_class: str) -> LabelDecision:
    """Label a HAM10000 row by its ``dx`` code (mel, nv, bkl, bcc, akiec, vasc, df)."""
    code = _text(dx)
    if not code:
        return _MISSING
    if code not in _HAM10000_KNOWN:
        return LabelDecision(Outcome.EXCLUDED, f"unknown dx {code!r}")
    if positive_class == "melanoma":
        return _decide(code == "mel")
    return _decide(code in _HAM10000_MALIGNANT)


def label_isic2019(row: dict[str, object], *, positive_class: str) -> LabelDecision:
    """Label an ISIC 2019 ground-truth row from its one-hot columns (MEL, NV, ..., UNK)."""
    hot = [column for column in ISIC2019_COLUMNS if _text(row.get(column)) in ("1", "1.0")]
    if len(hot) != 1:
        return LabelDecision(Outcome.EXCLUDED, "not exactly one diagnosis column set")
    column = hot[0]
    if column == "UNK":
        return LabelDecision(Outcome.EXCLUDED, "unknown diagnosis")
    if positive_class == "melanoma":
        return _decide(column == "MEL")
    return _decide(column in _ISIC2019_MALIGNANT)
