"""Image files listed in CSV files: root/train.csv and root/val.csv, a header row naming the columns `path` and
`label`, then one image per row. Paths are relative to root (or absolute); labels are class names (classes are
then the sorted names of both files) or integers (data.num_classes, or the largest label + 1)."""
from __future__ import annotations

import csv
import os

from core.config import DataCfg
from data.sources.base import DataError, check_labels, first_line
from data.sources.folder import FileImages
from data.sources.splits import Splits


def _rows(path: str) -> list[tuple[str, str]]:
    """(path, label) of every row; DataError naming the file for a missing file or column."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not {"path", "label"} <= set(reader.fieldnames or ()):
                raise DataError(f"'{path}' has columns {reader.fieldnames}, not 'path' and 'label'; give it a header "
                                f"row 'path,label'")
            return [(row["path"], row["label"].strip()) for row in reader]
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"cannot read '{path}' ({first_line(e)}); data.name=csv needs data.root to hold train.csv "
                        f"and val.csv") from None


def csv_list(cfg: DataCfg, train: bool) -> Splits:
    files = {split: os.path.join(cfg.root, f"{split}.csv") for split in (("train", "val") if train else ("val",))}
    if train and not os.path.isfile(files["val"]):  # training may go without one (train.eval_every=0)
        del files["val"]
    rows = {split: _rows(path) for split, path in files.items()}
    labels = {label for split_rows in rows.values() for _, label in split_rows}
    names = None if all(label.lstrip("-").isdigit() for label in labels) else sorted(labels)
    index = {name: i for i, name in enumerate(names or [])}
    sources = {split: FileImages(cfg.root, [path for path, _ in split_rows],
                                 [index[label] if names else int(label) for _, label in split_rows], cfg.skip_corrupt)
               for split, split_rows in rows.items()}
    num_classes = len(names) if names else cfg.num_classes or 1 + max(int(s.labels.max(initial=0))
                                                                      for s in sources.values())
    for split, source in sources.items():
        check_labels(source.labels, num_classes, lambda i, split=split: f"{files[split]} row {i + 1}",
                     "fix the labels or raise data.num_classes", unit="rows")
    return Splits(sources.get("train"), sources.get("val"), num_classes=num_classes, in_chans=3, class_names=names)
