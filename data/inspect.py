"""Describe a labelled dataset: classes, exclusions, groups, diagnoses, demographics, image sizes, duplicates.

:func:`inspect_dataset` returns the report as plain Python values (JSON-ready), and :func:`format_report`
renders it as text for the ``lesiontune data inspect`` command.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from data.duplicates import find_duplicates, merge_duplicate_groups
from data.metadata import LabelledDataset

__all__ = ["format_report", "inspect_dataset"]

logger = logging.getLogger(__name__)

MISSING = "missing"
"""Key under which counts of blank metadata values appear."""

_COMMON_IMAGE_SIZES = 5
_GROUP_NOUNS = {"lesion_id": "lesions", "patient_id": "patients"}
_UNREADABLE_EXAMPLES = 5


def _plain(value: float) -> float | int:
    value = float(value)
    return int(value) if value.is_integer() else value


def _spread(values: pd.Series) -> dict[str, float | int | None]:
    """Return min, median and max as plain numbers (None when ``values`` is empty)."""
    if values.empty:
        return {"min": None, "median": None, "max": None}
    return {"min": _plain(values.min()), "median": _plain(values.median()), "max": _plain(values.max())}


def _counts(values: pd.Series) -> dict[str, int]:
    """Count each value, most frequent first, with blanks under :data:`MISSING`."""
    text = values.astype("string").str.strip().fillna("").replace("", MISSING)
    return {str(value): int(count) for value, count in text.value_counts().items()}


def _group_report(records: pd.DataFrame) -> dict[str, object]:
    per_group = records.groupby("group")["label"].agg(["size", "nunique", "max"])
    return {
        "images_per_group": _spread(per_group["size"]),
        "groups_with_both_classes": int((per_group["nunique"] > 1).sum()),
    }


def _diagnosis_report(records: pd.DataFrame) -> dict[str, dict[str, int]]:
    diagnosis = records["diagnosis"].astype("string").str.strip().fillna("").replace("", MISSING)
    table = records.assign(diagnosis=diagnosis).groupby("diagnosis")["label"].agg(["size", "sum"])
    table = table.sort_values("size", ascending=False, kind="stable")
    return {str(name): {"images": int(row["size"]), "positive": int(row["sum"])} for name, row in table.iterrows()}


def _read_size(path: str) -> tuple[int, int] | str:
    """Return ``(width, height)`` in pixels from the file header, without decoding pixels, or the error."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        return f"{type(error).__name__}: {error}"


def _image_size_report(records: pd.DataFrame, sample: int | None, seed: int) -> dict[str, object]:
    chosen = records
    if sample is not None and sample < len(records):
        chosen = records.sample(n=sample, random_state=seed)
    sizes, unreadable = [], []
    for image_id, path in zip(chosen["image_id"], chosen["path"]):
        size = _read_size(path)
        if isinstance(size, str):
            unreadable.append(f"{image_id}: {size}")
        else:
            sizes.append(size)

    frame = pd.DataFrame(sizes, columns=["width", "height"], dtype="int64")
    common = frame.value_counts().head(_COMMON_IMAGE_SIZES)
    if unreadable:
        logger.warning("%d of %d image headers could not be read, e.g. %s", len(unreadable), len(chosen),
                       unreadable[0])
    return {
        "checked": int(len(chosen)),
        "sampled": bool(len(chosen) < len(records)),
        "unreadable": len(unreadable),
        "unreadable_examples": unreadable[:_UNREADABLE_EXAMPLES],
        "width": _spread(frame["width"]),
        "height": _spread(frame["height"]),
        "most_common": [{"width": int(width), "height": int(height), "images": int(count)}
                        for (width, height), count in common.items()],
    }


def _duplicate_report(records: pd.DataFrame, duplicates: pd.DataFrame) -> dict[str, object]:
    label_of = records.set_index("image_id")["label"]
    group_of = records.set_index("image_id")["group"].astype(str)
    known = duplicates[duplicates["image_id"].isin(label_of.index) & duplicates["duplicate_of"].isin(label_of.index)]
    first, second = known["image_id"], known["duplicate_of"]
    merged = merge_duplicate_groups(records, known)
    return {
        "exact_pairs": int((known["kind"] == "exact").sum()),
        "near_pairs": int((known["kind"] == "near").sum()),
        "images_with_duplicates": int(pd.concat([first, second]).nunique()),
        "pairs_across_groups": int((group_of.loc[first].to_numpy() != group_of.loc[second].to_numpy()).sum()),
        "pairs_with_different_labels": int((label_of.loc[first].to_numpy() != label_of.loc[second].to_numpy()).sum()),
        "groups_after_merging": int(merged["group"].nunique()),
    }


def inspect_dataset(dataset: LabelledDataset, *, image_stats: bool = True, sample: int | None = None,
                    duplicates: bool | pd.DataFrame = False, seed: int = 0,
                    workers: int | None = None) -> dict[str, object]:
    """Count what a dataset contains, as plain Python values.

    The report contains the keys of :meth:`LabelledDataset.summary` (images, positive, negative, groups,
    positive_groups, excluded, excluded_by_reason, ...) and adds:

    - ``groups_detail``: images per group (min/median/max) and the number of groups with both classes;
    - ``diagnoses``: images and positives per diagnosis value, most frequent first;
    - ``sex``, ``anatom_site``: images per value, and ``age_approx``: min/median/max in years plus missing;
    - ``image_sizes`` (if ``image_stats``): width and height in pixels (min/median/max) and the most common
      sizes, read from file headers without decoding pixels;
    - ``duplicates`` (if requested): exact and near pairs, pairs that cross groups or labels, and the number of
      groups after :func:`data.duplicates.merge_duplicate_groups`.

    Args:
        dataset: the output of :func:`data.metadata.load_dataset`.
        image_stats: read the image size of every image (or of ``sample`` of them) from its header.
        sample: read the sizes of this many images, drawn with ``seed``; default: all images.
        duplicates: ``True`` to run :func:`data.duplicates.find_duplicates` (decodes every image), or its
            output for these records; ``False`` to skip the duplicate counts.
        seed: seed of the image sample.
        workers: threads that decode images for the duplicate search; default: the CPUs this process may use.
    """
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or sample < 1):
        raise ValueError(f"Invalid sample {sample!r}: expected a positive number of images, or None for all.")
    if not isinstance(duplicates, (bool, pd.DataFrame)):
        raise TypeError(f"Invalid duplicates {type(duplicates).__name__}: expected True, False or the DataFrame "
                        "that find_duplicates returns.")
    records = dataset.records

    report: dict[str, object] = dict(dataset.summary())
    report["groups_detail"] = _group_report(records)
    report["diagnoses"] = _diagnosis_report(records)
    for column in ("sex", "anatom_site"):
        if column in records.columns and records[column].notna().any():
            report[column] = _counts(records[column])
    if "age_approx" in records.columns and records["age_approx"].notna().any():
        ages = records["age_approx"].dropna()
        report["age_approx"] = {**_spread(ages), MISSING: int(records["age_approx"].isna().sum())}
    if image_stats:
        report["image_sizes"] = _image_size_report(records, sample, seed)
    if duplicates is True:
        duplicates = find_duplicates(records, workers=workers)
    if isinstance(duplicates, pd.DataFrame):
        report["duplicates"] = _duplicate_report(records, duplicates)
    return report


def _number(value: object) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    if isinstance(value, (int, float)):
        return f"{int(value):,}"
    return str(value)


def _list_counts(counts: Mapping[str, int], limit: int = 8) -> str:
    items = [f"{name} {_number(count)}" for name, count in list(counts.items())[:limit]]
    if len(counts) > limit:
        items.append(f"and {len(counts) - limit} more")
    return ", ".join(items)


def _spread_text(spread: Mapping[str, object]) -> str:
    return f"min {_number(spread['min'])}, median {_number(spread['median'])}, max {_number(spread['max'])}"


def format_report(report: Mapping[str, object]) -> str:
    """Render the output of :func:`inspect_dataset` as aligned lines of text."""
    groups = report["groups_detail"]
    if report["group_column"]:
        source = f"groups from {report['group_column']}"
    else:
        source = "no group column, one group per image"
    lines = [
        ("Dataset", f"{report['root']} ({report['layout']} layout, {source})"),
        ("Images", f"{_number(report['images'])}: {_number(report['positive'])} positive ({report['positive_class']}), "
                   f"{_number(report['negative'])} negative"),
        ("Positive", f"{_number(report['positive'])} {report['positive_class']} images of "
                     f"{_number(report['positive_groups'])} {_GROUP_NOUNS.get(report['group_column'], 'groups')}"),
        ("Groups", f"{_number(report['groups'])}; images per group {_spread_text(groups['images_per_group'])}; "
                   f"{_number(groups['groups_with_both_classes'])} with both classes"),
        ("Excluded", f"{_number(report['excluded'])}" + (f": {_list_counts(report['excluded_by_reason'])}"
                                                          if report["excluded_by_reason"] else "")),
        ("Diagnoses", ", ".join(f"{name} {_number(row['images'])} ({_number(row['positive'])} positive)"
                                for name, row in list(report["diagnoses"].items())[:10])),
    ]
    if "sex" in report:
        lines.append(("Sex", _list_counts(report["sex"])))
    if "anatom_site" in report:
        lines.append(("Site", _list_counts(report["anatom_site"])))
    if "age_approx" in report:
        lines.append(("Age (years)", f"{_spread_text(report['age_approx'])}, "
                                     f"missing {_number(report['age_approx'][MISSING])}"))
    if "image_sizes" in report:
        sizes = report["image_sizes"]
        checked = f"{_number(sizes['checked'])} {'sampled' if sizes['sampled'] else 'images'}"
        common = ", ".join(f"{size['width']}x{size['height']} ({_number(size['images'])})"
                           for size in sizes["most_common"])
        lines.append(("Image size", f"{checked}: width {_spread_text(sizes['width'])} px; height "
                                    f"{_spread_text(sizes['height'])} px; most common {common or 'none'}; "
                                    f"{_number(sizes['unreadable'])} unreadable"))
    if "duplicates" in report:
        found = report["duplicates"]
        lines.append(("Duplicates", f"{_number(found['exact_pairs'])} exact and {_number(found['near_pairs'])} near "
                                    f"pairs of {_number(found['images_with_duplicates'])} images; pairs across "
                                    f"groups {_number(found['pairs_across_groups'])}, with different labels "
                                    f"{_number(found['pairs_with_different_labels'])}; "
                                    f"{_number(found['groups_after_merging'])} groups after merging"))
    width = max(len(label) for label, _ in lines)
    return "\n".join(f"{label:<{width}}  {text}" for label, text in lines)
