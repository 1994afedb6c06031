"""The split manifest and THE image-id rule that every stage shares.

MVTec's ``train/`` holds only good images, so supervised training needs a re-split of ``test/``:
:func:`make_split` draws a seeded split stratified per defect type (and good), and the manifest
(``annotations/<category>/split.json``) is what every later stage reads.

Image ids (:func:`image_ids`): every image a manifest lists gets one COCO image id, the same in
every file any stage writes for it (COCO ground truth, YOLO, SAM records, classifier, PatchCore,
fusion, review, report): the images of the train, val and test splits sorted by their relative
path, numbered from 1, then the ``train_good`` images, sorted, numbered on from there; images
listed under ``added`` (those later dataset versions added, see :mod:`pipeline.data.dataset`) are
numbered last, in that order, so a version's ids extend its parent's. Ids are a
property of the manifest alone, so a file made from ``split.json`` without ``coco/`` beside it
still names the right images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_json, read_json
from pipeline.data.mvtec import Category, Sample

SPLITS = ("train", "val", "test")
MANIFEST_VERSION = 1


def image_ids(manifest: dict) -> dict[str, int]:
    """The image-id rule (module docstring): relative image path -> COCO image id (from 1).

    Args:
        manifest: a split manifest (:func:`make_split`, ``split.json``).

    Returns:
        ``{relative POSIX path: id}`` for every image of the splits, then of ``train_good``.
    """
    added = list(manifest.get("added", []))  # images later dataset versions added, in the order added
    split_rels = sorted({e["image"] for entries in manifest["splits"].values() for e in entries} - set(added))
    ids = {r: i + 1 for i, r in enumerate(split_rels)}
    for r in sorted(set(manifest.get("train_good", [])) - set(ids) - set(added)):
        ids[r] = len(ids) + 1
    for r in added:
        ids.setdefault(r, len(ids) + 1)
    return ids


def make_split(
    category: Category,
    *,
    ratios: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> dict:
    """Seeded split of the test images into train/val/test, stratified by label.

    Each label's images are shuffled with ``numpy.random.default_rng(seed)`` and cut by
    ``ratios`` (rounded; every label with at least 3 images gets at least one image in each
    split). ``train/good`` stays listed as extra negatives.

    Returns:
        The manifest dict (paths relative to the category root, POSIX separators).

    Raises:
        PipelineError: ratios not positive or not summing to 1.
    """
    if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1) > 1e-6:
        raise PipelineError(
            f"split ratios {ratios}: expected three non-negative numbers (train, val, test) summing to 1"
        )
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[Sample]] = {}
    for s in category.test:
        by_label.setdefault(s.label, []).append(s)
    splits: dict[str, list[dict]] = {k: [] for k in SPLITS}
    for label in sorted(by_label):
        items = by_label[label]
        order = rng.permutation(len(items))
        n = len(items)
        n_val = int(round(n * ratios[1]))
        n_test = int(round(n * ratios[2]))
        if n >= 3:
            n_val = max(n_val, 1 if ratios[1] > 0 else 0)
            n_test = max(n_test, 1 if ratios[2] > 0 else 0)
        n_train = n - n_val - n_test
        cuts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
        for name, idx in cuts.items():
            for i in sorted(idx.tolist()):
                s = items[i]
                splits[name].append(
                    {
                        "image": s.image.relative_to(category.root).as_posix(),
                        "mask": s.mask.relative_to(category.root).as_posix() if s.mask else None,
                        "label": s.label,
                    }
                )
    return {
        "version": MANIFEST_VERSION,
        "category": category.name,
        "root": str(category.root),
        "seed": seed,
        "ratios": dict(zip(SPLITS, ratios)),
        "classes": category.defect_types,
        "splits": splits,
        "train_good": [p.relative_to(category.root).as_posix() for p in category.train_good],
    }


@dataclass(frozen=True)
class Split:
    """A loaded split manifest; paths resolved against the category root."""

    path: Path
    root: Path
    category: str
    classes: tuple[str, ...]
    manifest: dict

    def samples(self, split: str) -> list[Sample]:
        """Samples of ``split`` (``train``, ``val`` or ``test``) with absolute paths."""
        if split not in self.manifest["splits"]:
            raise PipelineError(f"{self.path}: no split {split!r} (expected one of {', '.join(SPLITS)})")
        return [
            Sample(self.root / e["image"], self.root / e["mask"] if e["mask"] else None, e["label"])
            for e in self.manifest["splits"][split]
        ]

    def train_good(self) -> list[Path]:
        return [self.root / p for p in self.manifest.get("train_good", [])]


def write_split(manifest: dict, path: Path) -> None:
    atomic_write_json(Path(path), manifest)


def load_split(path: Path, *, root: Path | None = None) -> Split:
    """Load ``split.json``.

    Args:
        path: the manifest file.
        root: category folder overriding the one recorded (when the data moved).

    Raises:
        PipelineError: missing file, wrong version, or missing keys.
    """
    path = Path(path)
    m = read_json(path)
    if not isinstance(m, dict) or m.get("version") != MANIFEST_VERSION or "splits" not in m:
        raise PipelineError(f"{path}: not a split manifest (expected version {MANIFEST_VERSION} with 'splits')")
    r = Path(root) if root else Path(m["root"])
    if not r.is_dir():
        raise PipelineError(f"{path}: category root {r} not found (pass the category folder to relocate it)")
    return Split(path=path, root=r, category=m["category"], classes=tuple(m["classes"]), manifest=m)
