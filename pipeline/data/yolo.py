"""YOLO dataset folders (Ultralytics layout, https://docs.ultralytics.com/datasets/detect/): read and
check ``data.yaml``, find a split's images and their label files, check and read labels.

Layout: ``<path>/images/<split>/*.png`` with ``<path>/labels/<split>/*.txt`` beside them, one line
``cls cx cy w h`` per box: ``cls`` a 0-based class index, the box centre and size normalised to
[0, 1] by the image width (x) and height (y). An image without a label file, or with an empty one,
is a background image. ``names`` lists the classes in index order (COCO category id = index + 1).

No ultralytics import here: the image suffixes and the label-path rule are ultralytics' own, copied.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError

MAX_CLASSES = 80  # YOLO-World's WorldTrainer caps the prompt count at 80
# ultralytics.data.utils.IMG_FORMATS (8.4): what ultralytics loads as an image from a folder
IMG_FORMATS = frozenset(
    {"avif", "bmp", "dng", "heic", "heif", "jp2", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp"}
)


def read_data_yaml(data_yaml: Path) -> dict:
    """Read and check a YOLO ``data.yaml``; return it with an absolute ``path`` and names as a list.

    A relative ``path`` is taken relative to the YAML's folder (then the working folder);
    a missing ``path`` means the YAML's folder. ``train`` and ``val`` folders must hold images.

    Returns:
        ``{"path": absolute dataset folder, "names": {0: name, ...}, "nc": int, "train": str,
        "val": str[, "test": str]}`` (split folders as written, relative to ``path``).

    Raises:
        PipelineError: missing file, invalid YAML, missing keys, bad ``names``, dataset folder not found.
    """
    import yaml

    data_yaml = Path(data_yaml)
    if not data_yaml.is_file():
        raise PipelineError(f"{data_yaml}: file not found (expected a YOLO data.yaml)")
    try:
        data = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PipelineError(f"{data_yaml}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or "names" not in data or "train" not in data or "val" not in data:
        raise PipelineError(f"{data_yaml}: expected a mapping with 'train', 'val' and 'names' (YOLO data.yaml)")
    names = _names_list(data["names"], data_yaml)
    root = Path(str(data.get("path") or data_yaml.parent)).expanduser()
    if not root.is_absolute():
        root = data_yaml.parent / root if (data_yaml.parent / root).is_dir() else Path.cwd() / root
    if not root.is_dir():
        raise PipelineError(f"{data_yaml}: dataset folder {root} not found (the 'path' key)")
    out = {"path": str(root.resolve()), "names": dict(enumerate(names)), "nc": len(names)}
    # the MVTec category (written by convert-masks; else annotations/<category>/yolo/data.yaml)
    out["category"] = str(data.get("category") or data_yaml.resolve().parent.parent.name)
    for split in ("train", "val", "test"):
        if data.get(split):
            out[split] = str(data[split])
    return out


def _names_list(names: Any, data_yaml: Path) -> list[str]:
    if isinstance(names, dict):
        keys = sorted(names, key=str)
        if keys != list(range(len(keys))):
            raise PipelineError(f"{data_yaml}: 'names' keys must be 0..nc-1, got {keys}")
        names = [names[k] for k in keys]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise PipelineError(f"{data_yaml}: 'names' must be a non-empty list or 0-based mapping of non-empty strings")
    if len(names) > MAX_CLASSES:
        raise PipelineError(f"{data_yaml}: {len(names)} classes; YOLO-World takes at most {MAX_CLASSES}")
    if len(set(names)) != len(names):
        raise PipelineError(f"{data_yaml}: class names repeat ({names}); each class needs its own prompt")
    return names


def split_image_files(root: Path, split: str, data_yaml: Path) -> list[Path]:
    """The image files under ``root/split`` (recursive, sorted), as ultralytics would load them.

    Raises:
        PipelineError: the folder is missing or holds no images (``data_yaml`` names the source).
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise PipelineError(f"{data_yaml}: {split!r} folder {folder} not found")
    images = sorted(p for p in folder.rglob("*") if p.suffix[1:].lower() in IMG_FORMATS)
    if not images:
        raise PipelineError(f"{folder}: no images (expected the images of {data_yaml})")
    return images


def label_path(image: Path) -> Path:
    """ultralytics' rule: replace the last ``/images/`` folder with ``/labels/``, extension with ``.txt``."""
    s = str(image)
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(sb.join(s.rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt")


def check_labels(images: list[Path], nc: int) -> None:
    """Every label line is ``cls cx cy w h`` with ``0 <= cls < nc`` and values in [0, 1] (ultralytics only warns).

    Raises:
        PipelineError: ``<label file>:<line>: bad YOLO label ...`` for the first bad line.
    """
    for image in images:
        label = label_path(image)
        if not label.is_file():
            continue  # background image
        for i, line in enumerate(label.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                vals = [float(v) for v in line.split()]
            except ValueError:
                vals = []
            ok = len(vals) == 5 and vals[0].is_integer() and 0 <= vals[0] < nc
            if not ok or not all(0.0 <= v <= 1.0 for v in vals[1:]) or min(vals[3:]) <= 0:
                raise PipelineError(
                    f"{label}:{i}: bad YOLO label {line.strip()!r} (expected 'cls cx cy w h', cls in 0..{nc - 1}, "
                    f"values in [0, 1], w and h > 0)"
                )


def read_yolo_labels(path: Path) -> np.ndarray:
    """Read a YOLO label file as an ``Nx5`` float array ``cls cx cy w h`` (empty file -> ``0x5``)."""
    text = Path(path).read_text().strip()
    if not text:
        return np.zeros((0, 5))
    return np.array([[float(v) for v in line.split()] for line in text.splitlines()])
