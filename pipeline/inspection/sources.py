"""Which images to inspect: files, folders (recursive) and glob patterns -> one stable, sorted list.

Every image gets an id (1, 2, ... in the order of its absolute POSIX path, the same for the same
arguments on every run, which ``--resume`` relies on) and an output name for ``masks/`` and
``overlays/``: its path relative to the common folder of all inputs, ``/`` written ``__``, suffix
dropped (``good__000``), with the suffix kept (``good__000_jpg``) where two files would otherwise
share a name.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline.core.errors import PipelineError
from pipeline.data.mvtec import IMAGE_SUFFIXES


@dataclass(frozen=True)
class ImageItem:
    """One image to inspect.

    Attributes:
        id: COCO image id (from 1, in path order).
        path: absolute path.
        name: output file stem, unique within the run.
    """

    id: int
    path: Path
    name: str


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES


def resolve_images(args: Sequence[str | Path]) -> list[ImageItem]:
    """The images named by ``args`` (see the module docstring), each once.

    A file given by name is kept whatever its suffix or content (an unreadable one becomes an
    ``error`` verdict, not a refusal); folders and globs contribute only files with an image suffix
    (``.png .jpg .jpeg .bmp .tif .tiff``, any case).

    Raises:
        PipelineError: an argument that names nothing, or no images at all.
    """
    found: set[Path] = set()
    for a in args:
        p = Path(a).expanduser()
        if p.is_file():
            found.add(p.resolve())
        elif p.is_dir():
            found.update(q.resolve() for q in p.rglob("*") if _is_image(q))
        elif glob.has_magic(str(a)):
            hits = [Path(h) for h in glob.glob(str(p), recursive=True)]
            found.update(h.resolve() for h in hits if _is_image(h))
            found.update(q.resolve() for h in hits if h.is_dir() for q in h.rglob("*") if _is_image(q))
            if not hits:
                raise PipelineError(f"{a}: the pattern matches no file")
        else:
            raise PipelineError(f"{a}: no such file or folder (expected images, folders of images or a glob)")
    if not found:
        raise PipelineError(f"no images in {', '.join(map(str, args))} (expected {' '.join(IMAGE_SUFFIXES)} files)")
    paths = sorted(found, key=lambda q: q.as_posix())
    return [ImageItem(i + 1, p, n) for i, (p, n) in enumerate(zip(paths, unique_names(paths)))]


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Output stems for absolute ``paths`` (module docstring), unique, in the same order."""
    import os

    if not paths:
        return []
    root = Path(os.path.commonpath([p.parent.as_posix() for p in paths]))
    stems = [p.relative_to(root).with_suffix("").as_posix().replace("/", "__") for p in paths]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [s if counts[s] == 1 else f"{s}_{p.suffix.lstrip('.').lower()}" for s, p in zip(stems, paths)]
