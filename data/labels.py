"""Label policy: which diagnoses count as positive, negative or excluded.

Labelling takes two steps. A table per metadata source maps each diagnosis value to a :class:`Category`
(melanoma, other malignant, malignant of unrecorded type, benign, indeterminate). :data:`POLICY` then maps
each category to an outcome under each positive class. A value missing from its table is excluded with an
``unknown ...`` reason and counted in the data report, so that no row is called benign by accident.

Sources and their tables:

- current ISIC metadata (``diagnosis_1`` to ``diagnosis_5``): :data:`CURRENT_ISIC_DIAGNOSES`, built from the
  diagnosis hierarchy of the ``isic_metadata`` package (``DiagnosisEnum``);
- legacy ISIC metadata and ISIC 2020 (``benign_malignant``, ``diagnosis``): :data:`LEGACY_ISIC_STATUS` and
  :data:`LEGACY_ISIC_DIAGNOSES`;
- HAM10000 (``dx``): :data:`HAM10000_DX`;
- ISIC 2019 (one-hot columns): :data:`ISIC2019_CLASSES`.

:func:`label_table` lists a table with the outcome of every value under both positive classes.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import pandas as pd
from isic_metadata.diagnosis_hierarchical import DiagnosisEnum

__all__ = [
    "CURRENT_ISIC_DIAGNOSES", "HAM10000_DX", "ISIC2019_CLASSES", "ISIC2019_COLUMNS", "LABEL_SOURCES",
    "LEGACY_ISIC_DIAGNOSES", "LEGACY_ISIC_STATUS", "POLICY", "POSITIVE_CLASSES", "Category", "LabelDecision",
    "Outcome", "label_current_isic", "label_ham10000", "label_isic2019", "label_legacy_isic", "label_table",
    "validate_positive_class",
]

POSITIVE_CLASSES = ("melanoma", "malignant")
"""Allowed values of the positive-class setting: melanoma only (the default), or any malignant lesion."""


class Outcome(enum.IntEnum):
    NEGATIVE = 0
    POSITIVE = 1
    EXCLUDED = -1


@dataclass(frozen=True)
class LabelDecision:
    """The label of one row, with the reason when the row is excluded."""

    outcome: Outcome
    reason: str = ""


class Category(enum.Enum):
    """Malignancy class of a diagnosis, before a positive class turns it into a label."""

    MELANOMA = "melanoma"
    OTHER_MALIGNANT = "other malignant"
    UNSPECIFIED_MALIGNANT = "unspecified malignant"
    BENIGN = "benign"
    INDETERMINATE = "indeterminate"


_POSITIVE = LabelDecision(Outcome.POSITIVE)
_NEGATIVE = LabelDecision(Outcome.NEGATIVE)
_MISSING = LabelDecision(Outcome.EXCLUDED, "missing diagnosis")
_INDETERMINATE = LabelDecision(Outcome.EXCLUDED, "indeterminate diagnosis")
_UNSPECIFIED_MALIGNANT = LabelDecision(Outcome.EXCLUDED, "unspecified malignant diagnosis")

POLICY: Mapping[Category, Mapping[str, LabelDecision]] = MappingProxyType({
    Category.MELANOMA: {"melanoma": _POSITIVE, "malignant": _POSITIVE},
    Category.OTHER_MALIGNANT: {"melanoma": _NEGATIVE, "malignant": _POSITIVE},
    # A malignant lesion whose type is not recorded may be a melanoma, so calling it negative would be a guess.
    Category.UNSPECIFIED_MALIGNANT: {"melanoma": _UNSPECIFIED_MALIGNANT, "malignant": _POSITIVE},
    Category.BENIGN: {"melanoma": _NEGATIVE, "malignant": _NEGATIVE},
    Category.INDETERMINATE: {"melanoma": _INDETERMINATE, "malignant": _INDETERMINATE},
})
"""Outcome of each category under each positive class."""


def _decide(category: Category, positive_class: str) -> LabelDecision:
    return POLICY[category][positive_class]


# Legacy ISIC `benign_malignant` values. A malignant status alone does not say whether the lesion is a melanoma.
LEGACY_ISIC_STATUS: Mapping[str, Category] = MappingProxyType({
    "benign": Category.BENIGN,
    "malignant": Category.UNSPECIFIED_MALIGNANT,
    "indeterminate": Category.INDETERMINATE,
    "indeterminate/benign": Category.INDETERMINATE,
    "indeterminate/malignant": Category.INDETERMINATE,
})

# Legacy ISIC `diagnosis` values, lower case: every value of `isic_metadata.fields.LegacyDxEnum` (isic-metadata
# 4.12), plus "unknown" (ISIC 2020), "bowen's disease" and "atypical fibroxanthoma". None marks a value that names
# no diagnosis.
LEGACY_ISIC_DIAGNOSES: Mapping[str, Category | None] = MappingProxyType({
    "melanoma": Category.MELANOMA,
    "melanoma metastasis": Category.MELANOMA,
    "basal cell carcinoma": Category.OTHER_MALIGNANT,
    "squamous cell carcinoma": Category.OTHER_MALIGNANT,
    "merkel cell carcinoma": Category.OTHER_MALIGNANT,
    # Actinic keratosis counts as malignant here, as akiec in HAM10000 and AK in ISIC 2019 do (a convention:
    # the current ISIC hierarchy files it under Indeterminate).
    "actinic keratosis": Category.OTHER_MALIGNANT,
    "bowen's disease": Category.OTHER_MALIGNANT,
    "atypical fibroxanthoma": Category.OTHER_MALIGNANT,
    "aimp": Category.INDETERMINATE,
    "atypical melanocytic proliferation": Category.INDETERMINATE,
    "atypical spitz tumor": Category.INDETERMINATE,
    # Adnexal tumours can be benign or malignant.
    "adnexal tumor": Category.INDETERMINATE,
    "acrochordon": Category.BENIGN,
    "angiofibroma or fibrous papule": Category.BENIGN,
    "angiokeratoma": Category.BENIGN,
    "angioma": Category.BENIGN,
    "cafe-au-lait macule": Category.BENIGN,
    "clear cell acanthoma": Category.BENIGN,
    "dermatofibroma": Category.BENIGN,
    "ephelis": Category.BENIGN,
    "epidermal nevus": Category.BENIGN,
    "lentigo nos": Category.BENIGN,
    "lentigo simplex": Category.BENIGN,
    "lichenoid keratosis": Category.BENIGN,
    "mucosal melanosis": Category.BENIGN,
    "neurofibroma": Category.BENIGN,
    "nevus": Category.BENIGN,
    "nevus spilus": Category.BENIGN,
    "pigmented benign keratosis": Category.BENIGN,
    "pyogenic granuloma": Category.BENIGN,
    "scar": Category.BENIGN,
    "sebaceous adenoma": Category.BENIGN,
    "sebaceous hyperplasia": Category.BENIGN,
    "seborrheic keratosis": Category.BENIGN,
    "solar lentigo": Category.BENIGN,
    "vascular lesion": Category.BENIGN,
    "verruca": Category.BENIGN,
    "other": None,
    "unknown": None,
})

# HAM10000 `dx` codes. akiec (actinic keratoses and intraepithelial carcinoma, i.e. Bowen's disease) is counted
# as malignant, by convention: the class mixes premalignant keratoses with carcinoma in situ. ISIC 2019's AK too.
HAM10000_DX: Mapping[str, Category] = MappingProxyType({
    "mel": Category.MELANOMA,
    "bcc": Category.OTHER_MALIGNANT,
    "akiec": Category.OTHER_MALIGNANT,
    "nv": Category.BENIGN,
    "bkl": Category.BENIGN,
    "df": Category.BENIGN,
    "vasc": Category.BENIGN,
})

# ISIC 2019 one-hot columns. UNK (none of the others) has no usable label.
ISIC2019_COLUMNS = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
ISIC2019_CLASSES: Mapping[str, Category | None] = MappingProxyType({
    "MEL": Category.MELANOMA,
    "BCC": Category.OTHER_MALIGNANT,
    "AK": Category.OTHER_MALIGNANT,
    "SCC": Category.OTHER_MALIGNANT,
    "NV": Category.BENIGN,
    "BKL": Category.BENIGN,
    "DF": Category.BENIGN,
    "VASC": Category.BENIGN,
    "UNK": None,
})


def _levels_of(member: DiagnosisEnum) -> tuple[str, ...]:
    return tuple(level.lower() for level in member.value.split(":"))


_MELANOMA_LEVELS = _levels_of(DiagnosisEnum.malignant_malignant_melanocytic_proliferations_melanoma)
# A collision lesion contains at least one malignant proliferation, which may or may not be the melanoma.
_MALIGNANT_COLLISION_LEVELS = _levels_of(DiagnosisEnum.malignant_collision_at_least_one_malignant_proliferation)
_TOP_LEVELS: Mapping[str, Category] = MappingProxyType({
    DiagnosisEnum.benign.value.lower(): Category.BENIGN,
    DiagnosisEnum.indeterminate.value.lower(): Category.INDETERMINATE,
    DiagnosisEnum.malignant.value.lower(): Category.UNSPECIFIED_MALIGNANT,
})


def _categorise_isic_levels(levels: tuple[str, ...]) -> Category:
    """Categorise a known ISIC hierarchy path by its first two levels, because deeper levels only refine the subtype."""
    top = _TOP_LEVELS[levels[0]]
    if top is not Category.UNSPECIFIED_MALIGNANT or len(levels) == 1:
        return top
    if levels[:2] == _MELANOMA_LEVELS:
        return Category.MELANOMA
    if levels[:2] == _MALIGNANT_COLLISION_LEVELS:
        return Category.UNSPECIFIED_MALIGNANT
    return Category.OTHER_MALIGNANT


# Every path of the ISIC diagnosis hierarchy ("Benign", ..., "Malignant:Malignant melanocytic proliferations
# (Melanoma):Melanoma in situ"), lower case, with its category.
CURRENT_ISIC_DIAGNOSES: Mapping[str, Category] = MappingProxyType({
    member.value.lower(): _categorise_isic_levels(_levels_of(member)) for member in DiagnosisEnum
})
# The hierarchy's terminal names are unique (checked by the tests), so a row that skips a level, such as
# diagnosis_1 and diagnosis_3 without diagnosis_2, still resolves to one path.
_ISIC_PATH_BY_TERMINAL: Mapping[str, tuple[str, ...]] = MappingProxyType({
    path.rsplit(":", 1)[-1]: tuple(path.split(":")) for path in CURRENT_ISIC_DIAGNOSES
})

LABEL_SOURCES = ("current-isic", "legacy-isic", "ham10000", "isic2019")
"""Sources accepted by :func:`label_table`. ISIC 2020 uses the legacy ISIC columns and tables."""


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


def _match_isic_path(recorded: list[str]) -> str | None:
    """Return the hierarchy path that ``recorded`` names, filling skipped levels in from the deepest level."""
    path = ":".join(recorded)
    if path in CURRENT_ISIC_DIAGNOSES:
        return path
    by_terminal = _ISIC_PATH_BY_TERMINAL.get(recorded[-1])
    if by_terminal is not None and len(by_terminal) == len(recorded) and all(
            not level or level == expected for level, expected in zip(recorded, by_terminal)):
        return ":".join(by_terminal)
    return None


def _find_conflicting_level(recorded: list[str]) -> int | None:
    """Return the index of a known level that contradicts the levels given above it, if any."""
    for index, level in enumerate(recorded):
        path = _ISIC_PATH_BY_TERMINAL.get(level)
        if path is not None and (len(path) != index + 1 or any(
                above and above != expected for above, expected in zip(recorded[:index], path))):
            return index
    return None


def _resolve_isic_levels(levels: list[str]) -> tuple[Category | None, str]:
    """Find the category of a row's diagnosis levels, with the exclusion reason to use in place of the default.

    Returns ``(None, reason)`` when the levels match no hierarchy path or contradict each other.
    """
    depth = max(index for index, level in enumerate(levels) if level) + 1
    recorded = levels[:depth]
    conflict = _find_conflicting_level(recorded)
    if conflict is not None:
        return None, f"conflicting diagnosis_{conflict + 1} {recorded[conflict]!r}"

    # An unknown subtype (from a newer hierarchy, or a typo) inherits the category of its deepest known
    # ancestor. Below diagnosis_2 that is exact, because the category depends on diagnosis_1 and diagnosis_2 only.
    for ancestor_depth in range(depth, 0, -1):
        ancestor = recorded[:ancestor_depth]
        path = _match_isic_path(ancestor) if ancestor[-1] else None
        if path is None:
            continue
        category = CURRENT_ISIC_DIAGNOSES[path]
        if ancestor_depth == 1 and depth > 1 and recorded[1] and category is Category.UNSPECIFIED_MALIGNANT:
            return category, f"unknown diagnosis_2 {recorded[1]!r}"
        return category, ""
    if recorded[0]:
        return None, f"unknown diagnosis_1 {recorded[0]!r}"
    return None, f"unknown diagnosis {recorded[-1]!r}"


def label_current_isic(diagnosis_1: object, diagnosis_2: object = None, diagnosis_3: object = None,
                       diagnosis_4: object = None, diagnosis_5: object = None, *,
                       positive_class: str) -> LabelDecision:
    """Label a row by the current ISIC diagnosis hierarchy (``diagnosis_1`` Benign/Malignant/Indeterminate).

    Every melanoma of the hierarchy (in situ, invasive, metastasis, NOS and their subtypes) is positive under
    both positive classes, and every other ``diagnosis_1 == "Malignant"`` is positive under ``"malignant"``.
    A malignant row whose type is not recorded (no or an unknown ``diagnosis_2``, or a malignant collision) is
    excluded under ``"melanoma"``. Levels are matched case-insensitively. A row that skips a level is resolved
    by its deepest level, whose name occurs once in the hierarchy, and a row whose levels contradict each other
    is excluded.
    """
    positive_class = validate_positive_class(positive_class)
    levels = [_text(level) for level in (diagnosis_1, diagnosis_2, diagnosis_3, diagnosis_4, diagnosis_5)]
    if not any(levels):
        return _MISSING
    category, reason = _resolve_isic_levels(levels)
    if category is None:
        return LabelDecision(Outcome.EXCLUDED, reason)
    decision = _decide(category, positive_class)
    if decision.outcome is Outcome.EXCLUDED and reason:
        return LabelDecision(Outcome.EXCLUDED, reason)
    return decision


def label_legacy_isic(benign_malignant: object, diagnosis: object, *, positive_class: str) -> LabelDecision:
    """Label a row by the legacy ISIC columns ``benign_malignant`` and ``diagnosis`` (also used for ISIC 2020).

    ``benign_malignant`` decides benign against malignant, and ``diagnosis`` separates melanoma from other
    malignant lesions. ``diagnosis`` alone decides when ``benign_malignant`` is blank. A melanoma diagnosis is positive
    whatever the value of ``benign_malignant``.
    """
    positive_class = validate_positive_class(positive_class)
    status, name = _text(benign_malignant), _text(diagnosis)
    if name and name not in LEGACY_ISIC_DIAGNOSES:
        return LabelDecision(Outcome.EXCLUDED, f"unknown diagnosis {name!r}")
    named = LEGACY_ISIC_DIAGNOSES.get(name)
    if named is Category.MELANOMA:
        return _decide(named, positive_class)

    if not status:
        return _MISSING if named is None else _decide(named, positive_class)
    if status not in LEGACY_ISIC_STATUS:
        return LabelDecision(Outcome.EXCLUDED, f"unknown benign_malignant {status!r}")
    category = LEGACY_ISIC_STATUS[status]
    if category is Category.UNSPECIFIED_MALIGNANT and named in (Category.OTHER_MALIGNANT, Category.BENIGN):
        category = Category.OTHER_MALIGNANT
    return _decide(category, positive_class)


def label_ham10000(dx: object, *, positive_class: str) -> LabelDecision:
    """Label a HAM10000 row by its ``dx`` code (mel, nv, bkl, bcc, akiec, vasc, df)."""
    positive_class = validate_positive_class(positive_class)
    code = _text(dx)
    if not code:
        return _MISSING
    if code not in HAM10000_DX:
        return LabelDecision(Outcome.EXCLUDED, f"unknown dx {code!r}")
    return _decide(HAM10000_DX[code], positive_class)


def label_isic2019(row: Mapping[str, object], *, positive_class: str) -> LabelDecision:
    """Label an ISIC 2019 ground-truth row from its one-hot columns (MEL, NV, ..., UNK)."""
    positive_class = validate_positive_class(positive_class)
    hot = [column for column in ISIC2019_COLUMNS if _text(row.get(column)) in ("1", "1.0")]
    if len(hot) != 1:
        return LabelDecision(Outcome.EXCLUDED, "not exactly one diagnosis column set")
    category = ISIC2019_CLASSES[hot[0]]
    if category is None:
        return LabelDecision(Outcome.EXCLUDED, "unknown diagnosis")
    return _decide(category, positive_class)


def _describe(decision: LabelDecision) -> str:
    if decision.outcome is Outcome.EXCLUDED:
        return f"excluded: {decision.reason}"
    return decision.outcome.name.lower()


def label_table(source: str) -> pd.DataFrame:
    """List every value in the table of ``source``, with its category and its outcome under each positive class.

    Args:
        source: one of :data:`LABEL_SOURCES`.

    Returns:
        One row per value: ``value``, ``category`` (empty when the value names no diagnosis), ``melanoma`` and
        ``malignant`` (``positive``, ``negative`` or ``excluded: <reason>``). For ``legacy-isic`` the rows are
        the ``diagnosis`` values with a blank ``benign_malignant``, then the ``benign_malignant`` values with a
        blank ``diagnosis``.
    """
    labellers = {
        "current-isic": lambda value, policy: label_current_isic(*value.split(":"), positive_class=policy),
        "legacy-isic": lambda value, policy: label_legacy_isic(*value, positive_class=policy),
        "ham10000": lambda value, policy: label_ham10000(value, positive_class=policy),
        "isic2019": lambda value, policy: label_isic2019({value: 1}, positive_class=policy),
    }
    if source not in labellers:
        raise ValueError(f"Invalid label source {source!r}: expected one of {', '.join(LABEL_SOURCES)}.")

    if source == "legacy-isic":
        entries = [((None, name), name, category) for name, category in LEGACY_ISIC_DIAGNOSES.items()]
        entries += [((status, None), status, category) for status, category in LEGACY_ISIC_STATUS.items()]
    else:
        table = {"current-isic": CURRENT_ISIC_DIAGNOSES, "ham10000": HAM10000_DX, "isic2019": ISIC2019_CLASSES}
        entries = [(value, value, category) for value, category in table[source].items()]
    rows = [
        {"value": display_value, "category": category.value if category else "",
         **{policy: _describe(labellers[source](value, policy)) for policy in POSITIVE_CLASSES}}
        for value, display_value, category in entries
    ]
    return pd.DataFrame(rows, columns=["value", "category", *POSITIVE_CLASSES])
