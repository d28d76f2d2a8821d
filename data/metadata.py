"""Read ISIC metadata in its common layouts into one labelled table.

Supported layouts, detected from the files present (or chosen with ``layout=``):

- ``isic-cli``: a download folder written by isic-cli, ``metadata.csv`` with ``isic_id`` beside ``<isic_id>.jpg``,
  with the current label columns (``diagnosis_1`` to ``diagnosis_5``) or the legacy ones
  (``benign_malignant``, ``diagnosis``).
- ``ham10000``: ``HAM10000_metadata.csv`` (``lesion_id, image_id, dx, ...``) with images in ``images/`` or the
  original ``HAM10000_images_part_1/2`` folders.
- ``isic2020``: the SIIM-ISIC 2020 training CSV (``image_name, patient_id, ..., benign_malignant, target``).
- ``isic2019``: the ISIC 2019 one-hot ground truth (``image, MEL, NV, ...``).
- ``class-folders``: ``benign/`` and ``malignant/`` (or ``melanoma/``) folders of images, with no metadata.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data import labels as label_policy

__all__ = ["LAYOUTS", "DataError", "LabelledDataset", "load_dataset"]

logger = logging.getLogger(__name__)

LAYOUTS = ("auto", "isic-cli", "ham10000", "isic2020", "isic2019", "class-folders")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
_CLASS_FOLDER_NAMES = {"benign": 0, "nevus": 0, "malignant": 1, "melanoma": 1}
_OPTIONAL_COLUMNS = ("sex", "age_approx", "anatom_site")


class DataError(ValueError):
    """Invalid or unreadable dataset input; the message names the file, the value and the fix."""


@dataclass(frozen=True)
class LabelledDataset:
    """Images with binary labels and groups, plus the rows that were excluded and why.

    ``records`` has one row per usable image: ``image_id`` (str), ``path`` (str, absolute),
    ``label`` (int8, 1 = positive), ``group`` (str: patient, lesion or image id), ``diagnosis`` (str)
    and, where the metadata has them, ``sex``, ``age_approx`` and ``anatom_site``.
    ``excluded`` has ``image_id`` and ``reason`` for every row left out.
    """

    root: Path
    layout: str
    positive_class: str
    group_column: str | None
    records: pd.DataFrame
    excluded: pd.DataFrame

    def summary(self) -> dict[str, object]:
        """Count images per class, exclusions per reason and groups, as plain Python values."""
        positives = int(self.records["label"].sum())
        return {
            "root": str(self.root),
            "layout": self.layout,
            "positive_class": self.positive_class,
            "group_column": self.group_column,
            "images": int(len(self.records)),
            "positive": positives,
            "negative": int(len(self.records) - positives),
            "groups": int(self.records["group"].nunique()),
            "positive_groups": int(self.records.loc[self.records["label"] == 1, "group"].nunique()),
            "excluded": int(len(self.excluded)),
            "excluded_by_reason": {str(k): int(v) for k, v in self.excluded["reason"].value_counts().items()},
        }


def read_csv(path: Path) -> pd.DataFrame:
    """Read a CSV as saved by people: comma or semicolon, optional UTF-8 BOM, decimal commas, all as text."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"Cannot read metadata file {path}: {error}.") from error
    text = raw.decode("utf-8-sig", errors="replace")
    first_line = text.split("\n", 1)[0]
    delimiter = ";" if first_line.count(";") > first_line.count(",") else ","
    try:
        frame = pd.read_csv(io.StringIO(text), sep=delimiter, dtype=str, keep_default_na=False,
                            quoting=csv.QUOTE_MINIMAL)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DataError(f"Cannot parse metadata file {path} as CSV: {error}. Check that it is a CSV file.") from error
    frame.columns = [str(column).strip() for column in frame.columns]
    return frame.replace({"": np.nan})


def _index_images(folders: Iterable[Path]) -> dict[str, Path]:
    """Map file stems to image paths in the given folders (not recursive); earlier folders win."""
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                stem, suffix = os.path.splitext(entry.name)
                if suffix in IMAGE_SUFFIXES and stem not in found and entry.is_file():
                    found[stem] = Path(entry.path).resolve()
    return found


def _is_safe_id(image_id: str) -> bool:
    return bool(image_id) and "/" not in image_id and "\\" not in image_id and image_id not in (".", "..") \
        and not image_id.startswith("..")


def _optional(frame: pd.DataFrame, names: Iterable[str]) -> pd.Series:
    for name in names:
        if name in frame.columns:
            return frame[name]
    return pd.Series([np.nan] * len(frame), index=frame.index, dtype=object)


def _assemble(
    *,
    root: Path,
    layout: str,
    positive_class: str,
    frame: pd.DataFrame,
    id_column: str,
    decide: Callable[[pd.Series], label_policy.LabelDecision],
    diagnosis: pd.Series,
    image_folders: list[Path],
    group_columns: tuple[str, ...],
    strip_suffix: str = "",
) -> LabelledDataset:
    images = _index_images(image_folders)
    group_column = next((c for c in group_columns if c in frame.columns and frame[c].notna().any()), None)
    optional = {
        "sex": _optional(frame, ["sex"]),
        "age_approx": _optional(frame, ["age_approx", "age"]),
        "anatom_site": _optional(frame, ["anatom_site_general", "anatom_site_general_challenge", "localization"]),
    }

    kept: list[dict[str, object]] = []
    excluded: list[tuple[str, str]] = []
    seen: set[str] = set()
    for position, (index, row) in enumerate(frame.iterrows()):
        file_id = str(row[id_column]).strip() if pd.notna(row[id_column]) else ""
        image_id = file_id.removesuffix(strip_suffix) if strip_suffix else file_id
        if not _is_safe_id(file_id):
            excluded.append((file_id or f"<row {position + 2}>", "invalid image id"))
            continue
        if image_id in seen:
            excluded.append((image_id, "duplicate image id"))
            continue
        seen.add(image_id)
        decision = decide(row)
        if decision.outcome is label_policy.Outcome.EXCLUDED:
            excluded.append((image_id, decision.reason))
            continue
        path = images.get(file_id) or images.get(image_id)
        if path is None:
            excluded.append((image_id, "image file not found"))
            continue
        group = row[group_column] if group_column else np.nan
        kept.append({
            "image_id": image_id,
            "path": str(path),
            "label": int(decision.outcome),
            "group": str(group).strip() if pd.notna(group) and str(group).strip() else image_id,
            "diagnosis": str(diagnosis.loc[index]) if pd.notna(diagnosis.loc[index]) else "",
            **{name: optional[name].loc[index] for name in _OPTIONAL_COLUMNS},
        })

    columns = ["image_id", "path", "label", "group", "diagnosis", *_OPTIONAL_COLUMNS]
    records = pd.DataFrame(kept, columns=columns)
    records["label"] = records["label"].astype("int8")
    records["age_approx"] = pd.to_numeric(
        records["age_approx"].astype(str).str.replace(",", ".", regex=False), errors="coerce")
    for name in ("sex", "anatom_site"):
        records[name] = records[name].astype("string")
    dataset = LabelledDataset(
        root=root, layout=layout, positive_class=positive_class, group_column=group_column,
        records=records, excluded=pd.DataFrame(excluded, columns=["image_id", "reason"]),
    )
    if records.empty:
        raise DataError(
            f"No usable images in {root} ({layout} layout): all {len(frame)} metadata rows were excluded "
            f"({dataset.summary()['excluded_by_reason']}). Check that the images sit where the layout expects them."
        )
    return dataset


def _require_columns(frame: pd.DataFrame, path: Path, columns: Iterable[str]) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise DataError(f"Metadata file {path} is missing the column(s) {', '.join(missing)}; "
                        f"it has {', '.join(frame.columns)}.")


def _read_isic_cli(csv_path: Path, positive_class: str) -> LabelledDataset:
    frame = read_csv(csv_path)
    _require_columns(frame, csv_path, ["isic_id"])
    if "diagnosis_1" in frame.columns:
        def decide(row: pd.Series) -> label_policy.LabelDecision:
            return label_policy.label_current_isic(row.get("diagnosis_1"), row.get("diagnosis_2"),
                                                   row.get("diagnosis_3"), row.get("diagnosis_4"),
                                                   row.get("diagnosis_5"), positive_class=positive_class)
        diagnosis = _optional(frame, ["diagnosis_3", "diagnosis_2", "diagnosis_1"])
    elif "benign_malignant" in frame.columns or "diagnosis" in frame.columns:
        def decide(row: pd.Series) -> label_policy.LabelDecision:
            return label_policy.label_legacy_isic(row.get("benign_malignant"), row.get("diagnosis"),
                                                  positive_class=positive_class)
        diagnosis = _optional(frame, ["diagnosis", "benign_malignant"])
    else:
        raise DataError(
            f"Metadata file {csv_path} has no known label column: expected diagnosis_1 (current ISIC) or "
            f"benign_malignant/diagnosis (legacy ISIC); it has {', '.join(frame.columns)}. "
            "Download the metadata with isic-cli ('isic metadata download') or add one of these columns."
        )
    return _assemble(root=csv_path.parent, layout="isic-cli", positive_class=positive_class, frame=frame,
                     id_column="isic_id", decide=decide, diagnosis=diagnosis,
                     image_folders=[csv_path.parent, csv_path.parent / "images"],
                     group_columns=("patient_id", "lesion_id"))


def _read_ham10000(csv_path: Path, positive_class: str) -> LabelledDataset:
    frame = read_csv(csv_path)
    _require_columns(frame, csv_path, ["image_id", "dx"])
    root = csv_path.parent
    return _assemble(
        root=root, layout="ham10000", positive_class=positive_class, frame=frame, id_column="image_id",
        decide=lambda row: label_policy.label_ham10000(row.get("dx"), positive_class=positive_class),
        diagnosis=frame["dx"],
        image_folders=[root / "images", root / "HAM10000_images_part_1", root / "HAM10000_images_part_2", root],
        group_columns=("patient_id", "lesion_id"),
    )


def _read_isic2020(csv_path: Path, positive_class: str) -> LabelledDataset:
    frame = read_csv(csv_path)
    _require_columns(frame, csv_path, ["image_name"])
    if "benign_malignant" not in frame.columns and "target" not in frame.columns:
        raise DataError(f"ISIC 2020 metadata {csv_path} has neither benign_malignant nor target; "
                        "use the training ground-truth CSV of the challenge.")

    def decide(row: pd.Series) -> label_policy.LabelDecision:
        status = row.get("benign_malignant")
        if pd.isna(status) and pd.notna(row.get("target")):
            status = "malignant" if str(row.get("target")).strip() in ("1", "1.0") else "benign"
        return label_policy.label_legacy_isic(status, row.get("diagnosis"), positive_class=positive_class)

    root = csv_path.parent
    return _assemble(root=root, layout="isic2020", positive_class=positive_class, frame=frame,
                     id_column="image_name", decide=decide, diagnosis=_optional(frame, ["diagnosis"]),
                     image_folders=[root / "train", root / "jpeg" / "train", root / "images", root],
                     group_columns=("patient_id",))


def _read_isic2019(csv_path: Path, positive_class: str) -> LabelledDataset:
    frame = read_csv(csv_path)
    _require_columns(frame, csv_path, ["image", "MEL"])
    present = [c for c in label_policy.ISIC2019_COLUMNS if c in frame.columns]
    diagnosis = frame[present].astype(float).idxmax(axis=1).where(frame[present].notna().any(axis=1))
    root = csv_path.parent
    return _assemble(
        root=root, layout="isic2019", positive_class=positive_class, frame=frame, id_column="image",
        decide=lambda row: label_policy.label_isic2019(row.to_dict(), positive_class=positive_class),
        diagnosis=diagnosis,
        image_folders=[root / "ISIC_2019_Training_Input", root / "images", root],
        group_columns=("lesion_id",), strip_suffix="_downsampled",
    )


def _read_class_folders(root: Path, positive_class: str) -> LabelledDataset:
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() in _CLASS_FOLDER_NAMES):
        label = _CLASS_FOLDER_NAMES[folder.name.lower()]
        for path in sorted(folder.iterdir()):
            if path.suffix in IMAGE_SUFFIXES:
                rows.append({"image_id": path.stem, "folder": folder.name, "label": label})
    frame = pd.DataFrame(rows, columns=["image_id", "folder", "label"])
    if positive_class == "melanoma" and (frame["folder"].str.lower() == "malignant").any():
        logger.warning("Class folder 'malignant' is taken as melanoma; rename it 'melanoma' to make that explicit.")
    return _assemble(
        root=root, layout="class-folders", positive_class=positive_class, frame=frame, id_column="image_id",
        decide=lambda row: label_policy.LabelDecision(label_policy.Outcome(int(row["label"]))),
        diagnosis=frame["folder"], image_folders=[root / name for name in sorted(frame["folder"].unique())],
        group_columns=(),
    )


_READERS = {
    "isic-cli": (_read_isic_cli, ("metadata.csv",)),
    "ham10000": (_read_ham10000, ("HAM10000_metadata.csv", "HAM10000_metadata")),
    "isic2020": (_read_isic2020, ("ISIC_2020_Training_GroundTruth.csv", "ISIC_2020_Training_GroundTruth_v2.csv",
                                  "train.csv")),
    "isic2019": (_read_isic2019, ("ISIC_2019_Training_GroundTruth.csv",)),
}


def _layout_of_csv(csv_path: Path) -> str | None:
    """Guess the layout of one CSV from its header line."""
    header = set(read_csv(csv_path).columns)
    if "isic_id" in header:
        return "isic-cli"
    if {"image_id", "dx"} <= header:
        return "ham10000"
    if "image_name" in header:
        return "isic2020"
    if {"image", "MEL"} <= header:
        return "isic2019"
    return None


def _detect(path: Path) -> tuple[str, Path]:
    if path.is_file():
        layout = _layout_of_csv(path)
        if layout is None:
            raise DataError(
                f"Cannot tell the layout of metadata file {path} from its columns. Expected isic_id (isic-cli), "
                "image_id+dx (HAM10000), image_name (ISIC 2020) or image+MEL (ISIC 2019); "
                "pass --layout to choose one.")
        return layout, path
    for layout, (_, names) in _READERS.items():
        for name in names:
            if (path / name).is_file() and _layout_of_csv(path / name) == layout:
                return layout, path / name
    if any(p.is_dir() and p.name.lower() in _CLASS_FOLDER_NAMES for p in path.iterdir()):
        return "class-folders", path
    raise DataError(
        f"No metadata found in {path}: expected metadata.csv (an isic-cli download), HAM10000_metadata.csv, "
        "an ISIC 2019/2020 ground-truth CSV, or class folders benign/ and malignant/. "
        "Download images with 'lesiontune data fetch' or point --data at one of these layouts."
    )


def load_dataset(path: str | os.PathLike, *, positive_class: str = "melanoma", layout: str = "auto") -> LabelledDataset:
    """Read a folder or metadata CSV into a :class:`LabelledDataset`.

    Args:
        path: a dataset folder, or a metadata CSV inside one.
        positive_class: ``"melanoma"`` (melanoma vs everything else) or ``"malignant"`` (any malignant vs benign).
        layout: one of ``LAYOUTS``; ``"auto"`` detects it from the files present.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"Data path {root} does not exist. Pass --data with a folder of ISIC images.")
    positive_class = label_policy.validate_positive_class(positive_class)
    if layout not in LAYOUTS:
        raise DataError(f"Invalid layout {layout!r}: expected one of {', '.join(LAYOUTS)}.")

    if layout == "auto":
        layout, target = _detect(root)
    elif layout == "class-folders":
        target = root
    else:
        names = _READERS[layout][1]
        target = root if root.is_file() else next((root / n for n in names if (root / n).is_file()), None)
        if target is None:
            raise DataError(f"No {layout} metadata file in {root}: expected one of {', '.join(names)}.")

    if layout == "class-folders":
        dataset = _read_class_folders(target, positive_class)
    else:
        dataset = _READERS[layout][0](target, positive_class)
    summary = dataset.summary()
    logger.info("Read %s (%s): %d images, %d positive (%s), %d excluded", root, layout, summary["images"],
                summary["positive"], positive_class, summary["excluded"])
    return dataset
