"""Label-safe augmentation: which augmentations each category allows (``configs/augmentation.yaml``).

Some augmentations change an MVTec label: a mirrored good cable is a ``cable_swap`` defect, a
mirrored metal nut looks ``flip``ped, a moved transistor is ``misplaced``, a saturation jitter
creates or hides ``color`` defects. The policy says, per category, which kinds are allowed; each
trainer turns it into its own settings (:func:`restrict_classifier_augment`,
:func:`ultralytics_overrides`) and records the result in its run's ``config.yaml``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.core.errors import PipelineError

KINDS = ("flips", "rotations", "color_jitter", "mosaic")


def default_policy_file() -> Path:
    """``configs/augmentation.yaml`` of this checkout."""
    return Path(__file__).resolve().parents[2] / "configs" / "augmentation.yaml"


@dataclass(frozen=True)
class AugmentPolicy:
    """What one category allows. ``source`` says where it came from (for logs and ``config.yaml``)."""

    category: str
    flips: bool = True
    rotations: bool = True
    color_jitter: bool = True
    mosaic: bool = True
    source: str = "default"

    def as_dict(self) -> dict:
        return asdict(self)


def policy_for(category: str, path: Path | None = None) -> AugmentPolicy:
    """The policy of ``category`` (an MVTec category name such as ``cable``).

    Args:
        category: the category's folder name.
        path: the policy file (default :func:`default_policy_file`).

    Returns:
        The listed category's policy, or ``default`` with ``source`` saying the category is unknown.

    Raises:
        PipelineError: an unreadable policy file, or a key that is not one of :data:`KINDS`.
    """
    import yaml

    path = Path(path) if path else default_policy_file()
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PipelineError(f"{path}: unreadable augmentation policy ({type(exc).__name__})") from None
    default = doc.get("default", {}) or {}
    listed = (doc.get("categories", {}) or {}).get(category)
    for where, entry in (("default", default), (category, listed or {})):
        bad = sorted(set(entry) - set(KINDS))
        if bad:
            raise PipelineError(f"{path}: {where}: unknown augmentation kind(s) {bad} (expected {', '.join(KINDS)})")
    values = {**{k: True for k in KINDS}, **default, **(listed or {})}
    source = (
        f"{path.name}: {category}" if listed is not None else f"{path.name}: default (category {category!r} not listed)"
    )
    return AugmentPolicy(category=category, source=source, **{k: bool(values[k]) for k in KINDS})


def restrict_classifier_augment(augment: dict, policy: AugmentPolicy) -> dict:
    """The classifier's augmentation settings with what ``policy`` forbids switched off.

    ``augment`` keys as in the classifier config (``hflip``, ``vflip`` probabilities, ``rotate_deg``,
    ``saturation``, ``hue``; others pass through).
    """
    out = dict(augment)
    if not policy.flips:
        out["hflip"] = out["vflip"] = 0.0
    if not policy.rotations:
        out["rotate_deg"] = 0.0
    if not policy.color_jitter:
        for k in ("saturation", "hue"):
            if k in out:
                out[k] = 0.0
    return out


def ultralytics_overrides(policy: AugmentPolicy) -> dict:
    """Ultralytics training arguments that enforce ``policy`` (only the ones it switches off)."""
    out: dict = {}
    if not policy.flips:
        out.update(fliplr=0.0, flipud=0.0)
    if not policy.rotations:
        out["degrees"] = 0.0
    if not policy.color_jitter:
        out.update(hsv_h=0.0, hsv_s=0.0)
    if not policy.mosaic:
        out.update(mosaic=0.0, close_mosaic=0)
    return out
