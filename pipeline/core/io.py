"""File helpers shared by every stage: atomic writes, guarded output folders, image reading."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.core.errors import PipelineError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def to_json_plain(obj: Any) -> Any:
    """``obj`` made strictly JSON-serialisable: NaN and +-inf become ``None`` (JSON ``null``; bare
    ``NaN`` is not JSON, RFC 8259 section 6), numpy scalars and arrays become Python numbers and
    lists, tuples and sets lists, paths strings, mapping keys strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k): to_json_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_json_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json_plain(obj.tolist())
    if isinstance(obj, np.generic):
        return to_json_plain(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def json_dumps(obj: Any, *, indent: int | None = 2) -> str:
    """The project's one JSON encoder: :func:`to_json_plain`, then ``json.dumps(allow_nan=False)``."""
    return json.dumps(to_json_plain(obj), indent=indent, allow_nan=False)


def atomic_write_json(path: Path, obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as strict JSON (see :func:`to_json_plain`) to ``path``, atomically."""
    atomic_write_text(path, json_dumps(obj, indent=indent) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically (temporary file and rename): a checkpoint is either
    the old one or the new one, never half-written."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (a multi-GB checkpoint never sits in memory).

    Raises:
        PipelineError: the file is missing.
    """
    import hashlib

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found (expected a file to hash)")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: Path) -> Any:
    """Read a JSON file; raise :class:`PipelineError` naming the file when it is missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found (expected a JSON file)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc})") from None


def read_yaml_mapping(path: Path) -> dict:
    """A YAML file's top-level mapping; ``{}`` when the file is missing, unreadable or not a mapping
    (for optional metadata such as a run's ``config.yaml``)."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) if Path(path).is_file() else None
    except (OSError, yaml.YAMLError):
        return {}
    return doc if isinstance(doc, dict) else {}


def check_can_write(path: Path, *, force: bool) -> None:
    """Refuse to replace an existing, non-empty output without ``force``."""
    path = Path(path)
    if path.exists() and (path.is_file() or any(path.iterdir())) and not force:
        raise PipelineError(f"{path}: output already exists; pass --force to replace it")


@contextmanager
def staged_dir(final: Path, *, force: bool) -> Iterator[Path]:
    """Build a folder's content in a temporary sibling and move it into place at the end.

    Yields the temporary folder. On success the previous ``final`` (if any, allowed only with
    ``force``) is replaced as a whole; on any exception the temporary folder is removed and
    ``final`` is untouched, so an interrupted or failed stage leaves no partial output.
    """
    final = Path(final)
    check_can_write(final, force=force)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def read_image(path: Path, *, flags: int | None = None) -> np.ndarray:
    """Read an image with OpenCV, failing with one line when the file is missing or not decodable.

    A PNG's chunk structure and CRCs, and a JPEG's end-of-image marker, are checked before decoding,
    so a truncated file is reported by us in one line instead of by libpng/libjpeg on stderr.

    Args:
        path: image file (PNG, JPEG, BMP, TIFF, ...).
        flags: OpenCV imread flags; default ``IMREAD_UNCHANGED``.

    Returns:
        ``HxW`` (grey) or ``HxWxC`` (BGR/BGRA) array, as stored (uint8, or uint16 for 16-bit files).

    Raises:
        PipelineError: the file is missing, empty, truncated, corrupt or not an image.
    """
    import cv2

    _quiet_opencv(cv2)
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found (expected an image)")
    data = np.fromfile(str(path), dtype=np.uint8)
    problem = "empty file" if not data.size else _container_problem(memoryview(data))
    if problem:
        raise PipelineError(f"{path}: unreadable or truncated image ({problem}; expected a valid PNG/JPEG/BMP/TIFF)")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED if flags is None else flags)
    if img is None:
        raise PipelineError(f"{path}: unreadable or truncated image (expected a valid PNG/JPEG/BMP/TIFF)")
    return img


def _container_problem(b: memoryview) -> str | None:
    """Why a PNG or JPEG byte string is incomplete, or ``None`` (other formats are left to OpenCV).

    PNG: every chunk must fit in the file and match its CRC-32, up to ``IEND`` (PNG spec, section 5).
    JPEG: the data must end with the EOI marker ``FFD9`` (ITU T.81, annex B), padding aside.
    """
    if bytes(b[:8]) == b"\x89PNG\r\n\x1a\n":
        pos, n = 8, len(b)
        while pos + 12 <= n:
            length = int.from_bytes(b[pos : pos + 4], "big")
            end = pos + 12 + length
            if end > n:
                return "truncated"
            if zlib.crc32(b[pos + 4 : end - 4]) != int.from_bytes(b[end - 4 : end], "big"):
                return f"corrupt (CRC mismatch in chunk {bytes(b[pos + 4 : pos + 8])!r})"
            if bytes(b[pos + 4 : pos + 8]) == b"IEND":
                return None
            pos = end
        return "truncated"
    if bytes(b[:2]) == b"\xff\xd8":
        tail = bytes(b[-64:]).rstrip(b"\x00\r\n ")
        return None if tail.endswith(b"\xff\xd9") else "truncated (no JPEG end-of-image marker)"
    return None


def read_rgb(path: Path) -> np.ndarray:
    """Read an image file as ``HxWx3`` uint8 RGB (OpenCV reads BGR; grey is repeated, alpha dropped).

    Raises:
        PipelineError: missing, unreadable or truncated file, or a sample depth other than 8 bits
            (16-bit images are refused rather than rescaled: their range is the user's to choose).
    """
    import cv2

    img = read_image(path)
    if img.dtype != np.uint8:
        raise PipelineError(f"{path}: {img.dtype} image (expected 8 bits per sample; convert it first)")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _quiet_opencv(cv2) -> None:
    """Silence OpenCV's own warnings (a truncated PNG is reported once, by us, as one line)."""
    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:  # builds without the logging module
        pass


def image_size_hw(path: Path) -> tuple[int, int]:
    """Height and width in pixels of an image file, read from its header (PIL, no decode)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    # Any failure means the header is unreadable. Not only OSError/ValueError: once ultralytics is
    # imported, its process-wide PIL.Image.open patch answers an unidentified file with an attempt to
    # install pi-heif, which fails offline with ModuleNotFoundError.
    except Exception as exc:  # noqa: BLE001
        raise PipelineError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None
    return h, w


def atomic_savefig(fig, path: Path, **savefig_kwargs) -> None:
    """Save a matplotlib figure to ``path`` (PNG by its suffix) through a temporary file and a rename,
    then close the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, **savefig_kwargs)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def load_torch_file(path: Path, *, what: str):
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors.

    Args:
        path: the file.
        what: what the file should be, for messages (e.g. ``"PatchCore artefact"``).

    Raises:
        PipelineError: the file is missing or is not a readable PyTorch file (including one that
            needs unpickling arbitrary objects, which ``weights_only`` refuses).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: {what} not found")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling/zip error means "not this kind of file"
        raise PipelineError(f"{path}: not a readable {what} ({type(exc).__name__})") from None
