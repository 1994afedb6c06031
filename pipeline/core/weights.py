"""Resolve model weights from an explicit path or the standard caches; never download unless allowed.

Search order for a known file name: the path itself, ``$PIPELINE_WEIGHTS``, the torch hub
checkpoint cache (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/hub/checkpoints``),
and ultralytics' weights folder (``~/.config/Ultralytics`` settings ``weights_dir`` or ``./weights``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import PipelineError


@dataclass(frozen=True)
class KnownWeights:
    filename: str
    url: str
    note: str = ""


# Official download addresses, named only in messages and used only with --allow-download.
KNOWN: dict[str, KnownWeights] = {
    "yolov8s-worldv2.pt": KnownWeights(
        "yolov8s-worldv2.pt", "https://github.com/ultralytics/assets/releases/download/v8.3.0/yolov8s-worldv2.pt"
    ),
    "yolov8m-worldv2.pt": KnownWeights(
        "yolov8m-worldv2.pt", "https://github.com/ultralytics/assets/releases/download/v8.3.0/yolov8m-worldv2.pt"
    ),
    "sam_vit_b_01ec64.pth": KnownWeights(
        "sam_vit_b_01ec64.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    ),
    "sam_vit_l_0b3195.pth": KnownWeights(
        "sam_vit_l_0b3195.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth"
    ),
    "sam_vit_h_4b8939.pth": KnownWeights(
        "sam_vit_h_4b8939.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"
    ),
    "resnet18-f37072fd.pth": KnownWeights(
        "resnet18-f37072fd.pth",
        "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        "torchvision ResNet-18, ImageNet-1k",
    ),
    "wide_resnet50_2-95faca4d.pth": KnownWeights(
        "wide_resnet50_2-95faca4d.pth", "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth"
    ),
}


def search_dirs() -> list[Path]:
    """Folders searched for a weights file name, in order."""
    dirs: list[Path] = []
    if os.environ.get("PIPELINE_WEIGHTS"):
        dirs.append(Path(os.environ["PIPELINE_WEIGHTS"]).expanduser())
    torch_home = Path(os.environ.get("TORCH_HOME", Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "torch"))
    dirs.append(torch_home.expanduser() / "hub" / "checkpoints")
    dirs.append(_ultralytics_weights_dir())
    return dirs


def _ultralytics_weights_dir() -> Path:
    """ultralytics' ``weights_dir`` setting, read from its settings JSON (no ultralytics import)."""
    import json

    cfg = Path(os.environ.get("YOLO_CONFIG_DIR", Path.home() / ".config" / "Ultralytics")).expanduser()
    try:
        return Path(json.loads((cfg / "settings.json").read_text())["weights_dir"]).expanduser()
    except (OSError, ValueError, KeyError, TypeError):
        return Path("weights").resolve()


def resolve_weights(name_or_path: str | os.PathLike, *, allow_download: bool = False, alternative: str = "") -> Path:
    """Find a weights file.

    Args:
        name_or_path: a path to an existing file, or a file name such as ``sam_vit_b_01ec64.pth``.
        allow_download: fetch a known file into the first cache folder when it is nowhere on disk.
        alternative: what else the command can do without the file (e.g. ``"--weights none to train
            from scratch"``), appended to the error message.

    Returns:
        Absolute path of the file.

    Raises:
        PipelineError: one line naming the file (and what it is), every path looked at, the address to
            download it from and the flags: ``--allow-download``, then ``alternative``.
    """
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p.resolve()
    name = p.name
    for d in search_dirs():
        if (d / name).is_file():
            return (d / name).resolve()
    known = KNOWN.get(name)
    if allow_download and known is not None:
        import torch.hub

        dest = search_dirs()[0] / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(known.url, str(dest), progress=True)
        return dest.resolve()
    places = ", ".join(dict.fromkeys(str(q) for q in [p.absolute(), *(d / name for d in search_dirs())]))
    what = f" ({known.note})" if known and known.note else ""
    source = f"download it from {known.url}" if known else "give the path of the file"
    fetch = ", or pass --allow-download" + (" to fetch it" if known else "")
    other = f", or {alternative}" if alternative else ""
    raise PipelineError(
        f"weights {name!r}{what} not found (looked at {places}); {source} and put it in one of those folders "
        f"or $PIPELINE_WEIGHTS{fetch}{other}"
    )
