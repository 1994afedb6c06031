"""YOLO-World fine-tuning and prediction with ultralytics, fully offline.

This is the only module that imports ultralytics. Everything ultralytics would fetch from the
network is replaced at run time, inside :func:`_offline_ultralytics` and one trainer subclass:

- class-name text embeddings: real CLIP (``clip:ViT-B/32``) when the ``clip`` package and its
  weights are on disk, otherwise deterministic per-name vectors (:func:`hash_text_embeddings`),
  which make the detector closed-set. Either way they are computed once per run, stored in
  ``weights/class_embeddings.pt`` beside the checkpoints and reused for validation, resume and
  prediction. ultralytics' own cache file next to the train images is neither read nor written;
- the plot font (``Arial.ttf``): any local copy, else matplotlib's ``DejaVuSans.ttf``;
- the AMP check on CUDA (it downloads ``yolo26n.pt``): run only when that file is on disk;
- the online flag, auto-install of requirements, usage events and logger integrations: off;
- label ``.cache`` files beside the dataset: not written.

Coordinates: YOLO labels are ``cls cx cy w h`` normalised to [0, 1]; predictions are
``bbox_xyxy`` in absolute pixels of the original image (x right, y down, origin top-left).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import warnings
from contextlib import ExitStack, contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_bytes, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    import torch

LOG = logging.getLogger(__name__)

CLIP_VARIANT = "clip:ViT-B/32"  # the text encoder YOLO-World was trained with
HASH_SOURCE = "sha256-normal"  # deterministic stand-in when CLIP is unavailable
EMBEDDINGS_FILE = "class_embeddings.pt"
MAX_CLASSES = 80  # WorldTrainer caps the prompt count at 80
_LOGGER_SETTINGS_OFF = ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")
_MPL_FONT = "DejaVuSans.ttf"


# ----------------------------------------------------------------------------- text embeddings


def hash_text_embeddings(texts: list[str], *, dim: int = 512) -> torch.Tensor:
    """Deterministic unit vectors, one per text, seeded from the SHA-256 of the text.

    The same text always gives the same vector (any process, any machine); different texts give
    independent standard-normal directions, so they are nearly orthogonal for ``dim`` 512. They
    carry no meaning: a detector trained with them only knows the trained names (closed set).

    Args:
        texts: class names (prompts), e.g. ``["ring", "scratch"]``.
        dim: embedding size of the model's text head (512 for the v8 worldv2 models).

    Returns:
        ``N x dim`` float32 tensor of L2-normalised rows, ``N = len(texts)``.
    """
    import torch

    rows = []
    for text in texts:
        seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
        vec = np.random.default_rng(seed).standard_normal(dim)
        rows.append(vec / np.linalg.norm(vec))
    return torch.from_numpy(np.asarray(rows, dtype=np.float32).reshape(len(texts), dim))


def _clip_weights_path() -> Path:
    from ultralytics.utils import WEIGHTS_DIR

    return Path(WEIGHTS_DIR) / "clip" / "ViT-B-32.pt"


def _clip_usable(allow_download: bool) -> bool:
    """CLIP can encode text: the package imports and its weights are on disk (or may be fetched)."""
    import importlib.util

    if importlib.util.find_spec("clip") is None:
        return False
    return allow_download or _clip_weights_path().is_file()


def _clip_text_embeddings(texts: list[str], device: Any) -> torch.Tensor:
    """``N x 512`` unit CLIP ViT-B/32 text embeddings (ultralytics' own encoder wrapper)."""
    from ultralytics.nn.text_model import build_text_model

    encoder = build_text_model(CLIP_VARIANT, device=device)
    return encoder.encode_text(encoder.tokenize(texts)).detach().float().cpu()


def _text_table(names: list[str], *, dim: int, use_clip: bool, device: Any) -> dict[str, torch.Tensor]:
    """Text -> ``dim`` embedding for every prompt ultralytics may look up for ``names``.

    With CLIP each synonym (``a/b``) gets its own embedding. Without it a class gets one hash
    vector (of its first synonym) shared by all its synonyms: hash vectors carry no meaning,
    so synonyms must not become unrelated prompts.
    """
    texts = _prompt_texts(names)
    if use_clip:
        feats = _clip_text_embeddings(texts, device)
        if feats.shape[-1] != dim:
            raise PipelineError(f"CLIP gives {feats.shape[-1]}-d text embeddings but the model's text head takes {dim}")
        return dict(zip(texts, feats))
    table = {}
    for name, vec in zip(names, hash_text_embeddings([_class_prompt(n) for n in names], dim=dim)):
        for text in _prompt_texts([name]):
            table.setdefault(text, vec)
    return table


def _prompt_texts(names: list[str]) -> list[str]:
    """Every text ultralytics may look up for these class names: synonyms split on ``/``, raw and stripped."""
    out: list[str] = []
    for name in names:
        for part in name.split("/"):
            for text in (part, part.strip()):
                if text not in out:
                    out.append(text)
    return out


def _class_prompt(name: str) -> str:
    """The prompt that stands for a class at validation and prediction: its first synonym."""
    return name.split("/", 1)[0].strip()


def _text_dim(model: Any) -> int:
    """Size of the text embeddings a YOLO-World model takes (the guide channels of its attention blocks)."""
    from ultralytics.nn.modules.block import MaxSigmoidAttnBlock

    for module in model.modules():
        if isinstance(module, MaxSigmoidAttnBlock):
            return int(module.gl.in_features)
    raise PipelineError("the model has no text-guided attention blocks: it is not a YOLO-World model")


def _save_embeddings(path: Path, *, names: list[str], table: dict, source: str) -> None:
    """Write ``{names, embeddings (nc x dim), texts, text_embeddings, source}`` with torch.save, atomically."""
    import torch

    texts = list(table)
    payload = {
        "names": list(names),
        "embeddings": torch.stack([table[_class_prompt(n)] for n in names]).float().cpu(),
        "texts": texts,
        "text_embeddings": torch.stack([table[t] for t in texts]).float().cpu(),
        "source": source,
        "open_vocabulary": source == CLIP_VARIANT,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_embeddings(path: Path) -> dict:
    """Read a class-embeddings file written by :func:`_save_embeddings`."""
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise PipelineError(f"{path}: unreadable class-embeddings file ({exc})") from None
    if not isinstance(payload, dict) or not {"names", "embeddings"} <= set(payload):
        raise PipelineError(f"{path}: expected a dict with 'names' and 'embeddings' (a class-embeddings file)")
    return payload


# ----------------------------------------------------------------------------- offline ultralytics


def _local_font(font: str | Path = "Arial.ttf") -> Path:
    """Stand-in for ``ultralytics.utils.checks.check_font`` that never downloads.

    Returns the font when it is a file, the copy in ultralytics' config folder when present,
    otherwise the DejaVu Sans that ships with matplotlib.
    """
    import matplotlib
    from ultralytics.utils import USER_CONFIG_DIR

    if Path(font).is_file():
        return Path(font)
    local = Path(USER_CONFIG_DIR) / Path(font).name
    if local.is_file():
        return local
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / _MPL_FONT


def _amp_check_without_download(check_amp: Callable) -> Callable:
    """Wrap ultralytics' AMP check so it runs only when its reference model is already on disk."""

    def check(model: Any) -> bool:
        from ultralytics.utils import WEIGHTS_DIR

        if next(model.parameters()).device.type != "cuda" or (Path(WEIGHTS_DIR) / "yolo26n.pt").is_file():
            return check_amp(model)
        LOG.info("AMP check skipped (it would download yolo26n.pt); training with AMP on CUDA")
        return True

    return check


def _no_label_cache(prefix: str, path: Path, x: dict, version: str) -> None:
    """Stand-in for ``save_dataset_cache_file``: keep the in-place 'version' key, write no file."""
    x["version"] = version


@contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextmanager
def _settings_in_memory(overrides: dict[str, Any]) -> Iterator[None]:
    """Override ultralytics SETTINGS for this process only (the user's settings file is not rewritten)."""
    from ultralytics.utils import SETTINGS

    old = {k: dict.get(SETTINGS, k) for k in overrides}
    for k, v in overrides.items():
        dict.__setitem__(SETTINGS, k, v)  # bypass JSONDict.__setitem__, which saves to disk
    try:
        yield
    finally:
        for k, v in old.items():
            dict.__setitem__(SETTINGS, k, v)


@contextmanager
def _offline_ultralytics() -> Iterator[None]:
    """Run ultralytics with nothing that reaches the network or writes beside the input data.

    Sets ``YOLO_OFFLINE`` / ``YOLO_AUTOINSTALL`` before ultralytics is first imported, then
    patches, for the duration of the block only: the ``ONLINE`` flags, auto-install, usage
    events, the integration callbacks (Platform streaming, MLflow, Comet, ...: not added),
    the matching SETTINGS (in memory), ``check_font`` (local font), the
    trainer's ``check_amp`` (no download) and the dataset label-cache writer (no ``.cache``
    file beside the labels).
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    import ultralytics.data.dataset as data_dataset
    import ultralytics.data.utils as data_utils
    import ultralytics.engine.trainer as engine_trainer
    import ultralytics.utils as ul_utils
    import ultralytics.utils.callbacks as ul_callbacks
    import ultralytics.utils.checks as checks
    import ultralytics.utils.events as events
    import ultralytics.utils.plotting as plotting

    with ExitStack() as stack:
        for module in (ul_utils, checks, events):
            stack.enter_context(_patched(module, "ONLINE", False))
        stack.enter_context(_patched(checks, "AUTOINSTALL", False))
        stack.enter_context(_patched(events.events, "enabled", False))
        # usage events, Ultralytics Platform streaming (on with $ULTRALYTICS_API_KEY), MLflow/Comet/...
        stack.enter_context(_patched(ul_callbacks, "add_integration_callbacks", lambda instance: None))
        stack.enter_context(_settings_in_memory({**{k: False for k in _LOGGER_SETTINGS_OFF}, "api_key": ""}))
        for module in (checks, data_utils, plotting):
            stack.enter_context(_patched(module, "check_font", _local_font))
        stack.enter_context(_patched(engine_trainer, "check_amp", _amp_check_without_download(checks.check_amp)))
        stack.enter_context(_patched(data_dataset, "save_dataset_cache_file", _no_label_cache))
        stack.enter_context(_patched(engine_trainer, "generate_ddp_command", _ddp_command))
        yield


@contextmanager
def _torch_determinism_restored() -> Iterator[None]:
    """ultralytics turns on torch's deterministic algorithms globally; put the previous state back."""
    import torch

    state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = torch.backends.cudnn.deterministic
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(state[0], warn_only=state[1])
        torch.backends.cudnn.deterministic = cudnn


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _strip_ansi(record: logging.LogRecord) -> bool:
    """Log filter: drop ultralytics' terminal colour codes from the file copy."""
    if isinstance(record.msg, str):
        record.msg = _ANSI.sub("", record.msg)
    return True


@contextmanager
def _run_log(path: Path) -> Iterator[None]:
    """Copy ultralytics' and this module's log lines into ``path`` while the block runs."""
    from ultralytics.utils import LOGGER

    handler = logging.FileHandler(path, encoding="utf-8")
    handler.addFilter(_strip_ansi)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    old_level = LOG.level
    LOG.setLevel(logging.INFO)
    LOGGER.addHandler(handler)
    LOG.addHandler(handler)
    try:
        yield
    finally:
        LOGGER.removeHandler(handler)
        LOG.removeHandler(handler)
        LOG.setLevel(old_level)
        handler.close()


# ----------------------------------------------------------------------------- trainer hook


@lru_cache(maxsize=1)
def _trainer_class() -> type:
    """``WorldTrainer`` whose text embeddings come from :meth:`text_table`, never from CLIP calls it makes itself.

    Two hooks, nothing else changed: ``generate_text_embeddings`` (the training prompts; no cache
    file beside the data) and the ``on_pretrain_routine_end`` callback (the validation classes
    of the EMA model, which upstream sets through ``set_classes`` -> CLIP).
    """
    import torch
    from ultralytics.models.yolo.world.train import WorldTrainer, on_pretrain_routine_end
    from ultralytics.utils.torch_utils import unwrap_model

    def set_ema_classes(trainer: Any) -> None:
        names = [_class_prompt(n) for n in trainer.test_loader.dataset.data["names"].values()]
        table = trainer.text_table()
        ema = trainer.ema.ema
        device = next(ema.parameters()).device
        ema.txt_feats = torch.stack([table[n] for n in names])[None].to(device)  # 1 x nc x dim
        ema.model[-1].nc = len(names)

    class OfflineWorldTrainer(WorldTrainer):
        use_clip: bool = False  # set on the instance before train()
        preset_table: dict | None = None  # text -> embedding read back from a run folder (resume)
        embedding_source: str = HASH_SOURCE  # CLIP_VARIANT or HASH_SOURCE, for the embeddings file

        def text_table(self) -> dict[str, torch.Tensor]:
            """Text -> ``dim`` embedding for every prompt of the dataset's names (computed once)."""
            if getattr(self, "_text_table", None) is None:
                names = list(self.data["names"].values())
                texts = _prompt_texts(names)
                if self.preset_table is not None and set(texts) <= set(self.preset_table):
                    self._text_table = {t: self.preset_table[t] for t in texts}
                else:
                    dim = _text_dim(unwrap_model(self.model))
                    self._text_table = _text_table(names, dim=dim, use_clip=self.use_clip, device=self.device)
            return self._text_table

        def get_model(self, cfg=None, weights=None, verbose=True):  # noqa: ANN001 - ultralytics signature
            model = super().get_model(cfg, weights, verbose)
            hooks = self.callbacks["on_pretrain_routine_end"]
            hooks[:] = [h for h in hooks if h is not on_pretrain_routine_end]
            if set_ema_classes not in hooks:
                hooks.append(set_ema_classes)
            return model

        def generate_text_embeddings(self, texts, batch, cache_dir):  # noqa: ANN001 - ultralytics signature
            table = self.text_table()
            return {t: table[t] for t in texts}

    OfflineWorldTrainer.__module__ = __name__  # importable as pipeline.models.yolo.train.OfflineWorldTrainer
    return OfflineWorldTrainer


# ----------------------------------------------------------------------------- inputs


def _read_data_yaml(data_yaml: Path) -> dict:
    """Read and check a YOLO ``data.yaml``; return it with an absolute ``path`` and names as a list.

    A relative ``path`` is taken relative to the YAML's folder (then the working folder);
    a missing ``path`` means the YAML's folder. ``train`` and ``val`` folders must hold images.
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


def _split_images(root: Path, split: str, data_yaml: Path) -> list[Path]:
    from ultralytics.data.utils import IMG_FORMATS

    folder = root / split
    if not folder.is_dir():
        raise PipelineError(f"{data_yaml}: {split!r} folder {folder} not found")
    images = sorted(p for p in folder.rglob("*") if p.suffix[1:].lower() in IMG_FORMATS)
    if not images:
        raise PipelineError(f"{folder}: no images (expected the images of {data_yaml})")
    return images


def _label_path(image: Path) -> Path:
    """ultralytics' rule: replace the last ``/images/`` folder with ``/labels/``, extension with ``.txt``."""
    s = str(image)
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(sb.join(s.rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt")


def _check_labels(images: list[Path], nc: int) -> None:
    """Every label line is ``cls cx cy w h`` with ``0 <= cls < nc`` and values in [0, 1] (ultralytics only warns)."""
    for image in images:
        label = _label_path(image)
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


def _resolve_model(model: str, *, allow_download: bool) -> str:
    """An absolute weights path, or a model YAML ultralytics can find (scale letter in the name allowed)."""
    from pipeline.core.weights import resolve_weights

    if Path(model).suffix.lower() in {".yaml", ".yml"}:
        from ultralytics.nn.tasks import yaml_model_load

        try:
            cfg = yaml_model_load(model)
        except (FileNotFoundError, OSError) as exc:
            raise PipelineError(f"{model}: model YAML not found ({exc})") from None
        if "WorldDetect" not in str(cfg.get("head", "")):
            raise PipelineError(f"{model}: not a YOLO-World model YAML (expected a WorldDetect head)")
        return str(Path(model).resolve()) if Path(model).is_file() else model
    return str(resolve_weights(model, allow_download=allow_download))


def _resolve_device(device: str | None, *, multi: bool = False) -> str:
    """``None`` -> ``"0"`` (first CUDA GPU) when CUDA is available, else ``"cpu"``.

    ``multi`` (training): a comma list of CUDA indices (``"0,1,2,3"``) selects ultralytics' DDP,
    one process per GPU (see :func:`_ddp_command`); prediction takes one device only.
    """
    import torch

    if device is None:
        return "0" if torch.cuda.is_available() else "cpu"
    device = str(device).strip().lower().replace("cuda:", "").replace(" ", "")
    if "," in device:
        if not multi:
            raise PipelineError(f"device {device!r}: one device only (prediction runs on one GPU)")
        if not torch.cuda.is_available():
            raise PipelineError(f"device {device!r}: CUDA is not available on this machine, so one device only (use 'cpu')")
        parts = device.split(",")
        n = torch.cuda.device_count()
        if not all(p.isdigit() and int(p) < n for p in parts) or len(set(parts)) != len(parts):
            raise PipelineError(f"device {device!r}: expected distinct CUDA indices below {n} (this machine has {n} GPU(s))")
        return ",".join(parts)
    if device not in {"cpu", "mps"} and not torch.cuda.is_available():
        raise PipelineError(f"device {device!r}: CUDA is not available on this machine (use 'cpu')")
    return device


def _prepare_run_dir(out_dir: Path, *, force: bool, resume: bool) -> None:
    if resume:
        if force:
            raise PipelineError(f"{out_dir}: pass either resume or force, not both")
        for need in (out_dir / "weights" / "last.pt", out_dir / "data.yaml"):
            if not need.is_file():
                raise PipelineError(f"{need}: not found (resume needs the run folder of an earlier train_yolo_world)")
        return
    if out_dir.exists() and (out_dir.is_file() or any(out_dir.iterdir())):
        if not force:
            raise PipelineError(f"{out_dir}: output already exists; pass --force to replace it or --resume")
        shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------- training


def train_yolo_world(
    *,
    data_yaml: Path,
    model: str,
    out_dir: Path,
    epochs: int = 10,
    imgsz: int = 640,
    batch: int = 8,
    device: str | None = None,
    seed: int = 0,
    workers: int = 0,
    optimizer: str = "auto",
    lr0: float = 0.01,
    allow_download: bool = False,
    resume: bool = False,
    force: bool = False,
) -> Path:
    """Fine-tune YOLO-World on a YOLO dataset, offline, into one run folder.

    Args:
        data_yaml: YOLO ``data.yaml`` (``path``, ``train``, ``val`` [, ``test``] image folders
            with ``labels/`` siblings; ``names`` 0-based). Labels ``cls cx cy w h`` normalised.
        model: real weights (``yolov8s-worldv2.pt``: a path or a name looked up by
            :func:`pipeline.core.weights.resolve_weights`) or a model YAML from ultralytics' cfg for a
            random start (``yolov8s-worldv2.yaml``; the scale letter picks the size, e.g.
            ``yolov8n-worldv2.yaml``).
        out_dir: the run folder. Gets ``config.yaml`` (these arguments, resolved), ``data.yaml``
            (the dataset config as trained, absolute path), ``train.log``, ultralytics' files
            (``weights/best.pt``, ``weights/last.pt``, ``results.csv``, ``args.yaml``, plots),
            ``weights/class_embeddings.pt`` and ``metrics.json`` (val mAP50, mAP50-95, precision,
            recall of ``best.pt``).
        epochs, imgsz, batch: training length, square input size in pixels, images per batch.
        device: ``"cpu"``, ``"0"``/``"cuda:0"``, or several GPUs ``"0,1,2,3"`` (ultralytics' own DDP:
            it launches ``torch.distributed.run`` with one process per GPU; ``batch`` is the global
            batch, a multiple of the GPU count; the offline patches and text embeddings reach the
            worker processes through :func:`run_ddp_worker`); ``None`` picks the first GPU, else the CPU.
        seed: seeds Python, NumPy and torch; ultralytics' deterministic mode is on.
        workers: dataloader processes (ultralytics forces 0 on CPU).
        optimizer: ultralytics optimizer name (``auto``, ``SGD``, ``AdamW``, ...). With ``auto``
            ultralytics picks the optimizer and learning rate itself and ignores ``lr0``; short
            fine-tunes from real weights are steadier with e.g. ``AdamW`` and a small ``lr0``.
        lr0: initial learning rate (used unless ``optimizer="auto"``).
        allow_download: let missing weights (and CLIP weights, when ``clip`` is installed) download.
        resume: continue ``out_dir/weights/last.pt`` with its stored arguments (ultralytics resume).
        force: delete a non-empty ``out_dir`` first.

    Returns:
        ``out_dir``.

    Raises:
        PipelineError: bad ``data.yaml`` or labels, weights or model YAML not found, a non-empty
            ``out_dir`` without ``force``/``resume``, nothing to resume, bad arguments.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    for name, value, low in (("epochs", epochs, 1), ("imgsz", imgsz, 32), ("batch", batch, 1), ("workers", workers, 0)):
        if int(value) < low:
            raise PipelineError(f"{name}={value}: expected an integer >= {low}")
    with _offline_ultralytics():
        data = _read_data_yaml(Path(data_yaml))
        root = Path(data["path"])
        for split in ("train", "val"):
            _check_labels(_split_images(root, data[split], Path(data_yaml)), data["nc"])
        model_ref = _resolve_model(model, allow_download=allow_download)
        device = _resolve_device(device, multi=True)
        n_gpu = len(device.split(",")) if "," in device else 1
        if n_gpu > 1 and int(batch) % n_gpu:
            raise PipelineError(f"batch={batch}: expected a multiple of the {n_gpu} GPUs in device {device!r} (one share per GPU)")
        _prepare_run_dir(out_dir, force=force, resume=resume)
        config = {
            "data_yaml": str(Path(data_yaml).resolve()), "model": str(model), "model_resolved": model_ref,
            "out_dir": str(out_dir), "epochs": int(epochs), "imgsz": int(imgsz), "batch": int(batch),
            "device": device, "seed": int(seed), "workers": int(workers), "optimizer": str(optimizer),
            "lr0": float(lr0), "allow_download": bool(allow_download),
            "resume": bool(resume), "force": bool(force), "names": list(data["names"].values()),
        }
        _write_config(out_dir, config, data, resume=resume)
        with _run_log(out_dir / "train.log"), _torch_determinism_restored():
            trainer = _build_trainer(config, out_dir, resume=resume, allow_download=allow_download)
            _train(trainer, out_dir)
            worker_metrics = out_dir / "metrics.json"
            if getattr(trainer, "ddp", False) and worker_metrics.is_file():  # written by rank 0 of the DDP workers
                from pipeline.core.io import read_json

                metrics = read_json(worker_metrics)
            else:
                metrics = _final_metrics(trainer)
                atomic_write_json(out_dir / "metrics.json", metrics)
            LOG.info("run folder %s: mAP50 %.4f, mAP50-95 %.4f", out_dir, metrics["mAP50"], metrics["mAP50-95"])
    return out_dir


def _write_config(out_dir: Path, config: dict, data: dict, *, resume: bool) -> None:
    import yaml

    import ultralytics

    config = {**config, "ultralytics_version": ultralytics.__version__}
    if resume:  # keep the config of the run being resumed; record the resume call beside it
        atomic_write_text(out_dir / "config.resume.yaml", yaml.safe_dump(config, sort_keys=False))
        return
    atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    atomic_write_text(out_dir / "data.yaml", yaml.safe_dump(data, sort_keys=False))


def _build_trainer(config: dict, out_dir: Path, *, resume: bool, allow_download: bool) -> Any:
    """An :func:`_trainer_class` instance for a new run or for resuming ``weights/last.pt``."""
    trainer_cls = _trainer_class()
    if resume:
        last = str(out_dir / "weights" / "last.pt")
        overrides = {"model": last, "resume": last, "data": str(out_dir / "data.yaml"), "save_dir": str(out_dir),
                     "device": config["device"], "workers": config["workers"]}
    else:
        overrides = {
            "model": config["model_resolved"], "data": str(out_dir / "data.yaml"), "epochs": config["epochs"],
            "imgsz": config["imgsz"], "batch": config["batch"], "device": config["device"],
            "workers": config["workers"], "seed": config["seed"], "deterministic": True,
            "optimizer": config["optimizer"], "lr0": config["lr0"],
            "project": str(out_dir.parent), "name": out_dir.name, "exist_ok": True,
            "amp": config["device"] != "cpu", "plots": True, "val": True, "cache": False, "verbose": True,
        }
    try:
        trainer = trainer_cls(overrides=overrides)
    except (FileNotFoundError, ValueError) as exc:  # e.g. an unknown device: select_device raises ValueError
        raise PipelineError(f"{out_dir}: cannot start training ({_first_line(exc)})") from None
    trainer.use_clip = _clip_usable(allow_download)
    trainer.embedding_source = CLIP_VARIANT if trainer.use_clip else HASH_SOURCE
    stored = out_dir / "weights" / EMBEDDINGS_FILE
    trainer.embeddings_path = str(stored)
    if resume and stored.is_file():  # same prompts as the interrupted run, whatever is installed now
        payload = _load_embeddings(stored)
        trainer.preset_table = dict(zip(payload["texts"], payload["text_embeddings"]))
        trainer.embedding_source = payload.get("source", HASH_SOURCE)
        trainer.preset_path = str(stored)
    elif not trainer.use_clip:
        msg = (
            f"CLIP is not available (package 'clip' or {_clip_weights_path()} missing): class prompts get "
            "deterministic hash embeddings, so the detector is closed-set (it only knows the trained names)"
        )
        LOG.warning(msg)  # into train.log
        warnings.warn(msg, UserWarning, stacklevel=3)  # on the console, once per process
    trainer.add_callback("on_pretrain_routine_end", lambda t: _save_trainer_embeddings(t, stored))
    return trainer


def _save_trainer_embeddings(trainer: Any, path: Path) -> None:
    """Callback: store the prompts before the first epoch, so a resumed run finds the same ones
    (rank 0 only under DDP)."""
    if os.environ.get("RANK", "-1") not in ("-1", "0"):
        return
    names = list(trainer.data["names"].values())
    _save_embeddings(path, names=names, table=trainer.text_table(), source=trainer.embedding_source)


def _train(trainer: Any, out_dir: Path) -> None:
    try:
        trainer.train()
    except AssertionError as exc:  # ultralytics asserts, e.g. "training ... is finished, nothing to resume"
        raise PipelineError(f"{out_dir}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return _ANSI.sub("", lines[0]) if lines else type(exc).__name__


def _final_metrics(trainer: Any) -> dict:
    """Validation metrics of ``best.pt`` (ultralytics' final evaluation) as plain floats."""
    m = dict(trainer.metrics or {})

    def get(key: str) -> float:
        return float(m.get(f"metrics/{key}(B)", float("nan")))

    return {
        "split": "val",
        "weights": "weights/best.pt",
        "mAP50": get("mAP50"),
        "mAP50-95": get("mAP50-95"),
        "precision": get("precision"),
        "recall": get("recall"),
        "epochs": int(trainer.epochs),
        "embedding_source": trainer.embedding_source,
    }


# ----------------------------------------------------------------------------- multi-GPU (ultralytics DDP)


def _plain_arg(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain_arg(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain_arg(x) for k, x in v.items()}
    return str(v)


def _ddp_command(trainer: Any) -> tuple[list[str], str]:
    """Stand-in for ``ultralytics.utils.dist.generate_ddp_command`` (patched in by :func:`_offline_ultralytics`).

    Upstream pickles the trainer class and launches a generated script that rebuilds it in each
    worker, without our offline patches, text-embedding table or run-log, and first deletes the
    save folder (our ``data.yaml`` lives there). This writes, into the run folder,
    ``ddp_launch_<id>.pt`` (the trainer arguments as plain values, the embedding settings) and
    ``ddp_launch_<id>.py`` (calls :func:`run_ddp_worker`); ultralytics' ``ddp_cleanup`` deletes both.

    Returns:
        ``(command, script path)``: ``python -m torch.distributed.run --nproc_per_node <GPUs>
        --master_port <free port> <script>``.
    """
    import sys

    import torch
    from ultralytics.utils.dist import find_free_network_port

    save_dir = Path(trainer.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    stem = save_dir / f"ddp_launch_{id(trainer)}"
    state = {
        "args": {k: _plain_arg(v) for k, v in vars(trainer.args).items()},
        "use_clip": bool(getattr(trainer, "use_clip", False)),
        "embedding_source": str(getattr(trainer, "embedding_source", HASH_SOURCE)),
        "embeddings_path": getattr(trainer, "embeddings_path", None),
        "preset_path": getattr(trainer, "preset_path", None),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(stem.with_suffix(".pt"), buf.getvalue())
    script = (
        "# pipeline: ultralytics multi-GPU worker (deleted after the run)\n"
        'if __name__ == "__main__":\n'
        "    import sys\n"
        f"    sys.path = {sys.path!r}\n"
        "    from pipeline.models.yolo.train import run_ddp_worker\n"
        f"    run_ddp_worker({str(stem.with_suffix('.pt'))!r})\n"
    )
    atomic_write_text(stem.with_suffix(".py"), script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(trainer.world_size),
           "--master_port", str(find_free_network_port()), str(stem.with_suffix(".py"))]
    return cmd, str(stem.with_suffix(".py"))


def run_ddp_worker(state_path: str | Path) -> None:
    """Body of one ultralytics DDP worker process (started by ``torch.distributed.run``).

    Rebuilds the offline trainer (:func:`_trainer_class`) from the state :func:`_ddp_command`
    wrote, inside :func:`_offline_ultralytics`, with the same text-embedding source (hash or CLIP,
    or the stored table of a resumed run) as the launching process, and trains. Rank 0 copies the
    log into ``train.log``, stores ``class_embeddings.pt`` and writes ``metrics.json``.
    """
    import torch

    state = torch.load(Path(state_path), map_location="cpu", weights_only=True)
    rank0 = os.environ.get("RANK", "-1") in ("-1", "0")
    with _offline_ultralytics(), _torch_determinism_restored(), ExitStack() as stack:
        from ultralytics.utils import DEFAULT_CFG_DICT

        save_dir = Path(state["args"]["save_dir"])
        if rank0:
            stack.enter_context(_run_log(save_dir / "train.log"))
        cfg = DEFAULT_CFG_DICT.copy()
        cfg.update(save_dir="")  # the extra key 'save_dir', as upstream's DDP file does
        trainer = _trainer_class()(cfg=cfg, overrides=state["args"])
        trainer.use_clip = bool(state["use_clip"])
        trainer.embedding_source = state["embedding_source"]
        if state.get("preset_path"):
            payload = _load_embeddings(Path(state["preset_path"]))
            trainer.preset_table = dict(zip(payload["texts"], payload["text_embeddings"]))
        if state.get("embeddings_path"):
            stored = Path(state["embeddings_path"])
            trainer.add_callback("on_pretrain_routine_end", lambda t: _save_trainer_embeddings(t, stored))
        trainer.train()
        if rank0:
            atomic_write_json(save_dir / "metrics.json", _final_metrics(trainer))


def __getattr__(name: str) -> Any:
    """``pipeline.models.yolo.train.OfflineWorldTrainer``: the trainer class, built on first access (importable by name)."""
    if name == "OfflineWorldTrainer":
        return _trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- prediction


def _embeddings_beside(weights: Path) -> Path:
    return Path(weights).parent / EMBEDDINGS_FILE


def load_class_names(weights: Path) -> list[str]:
    """The trained class names, in YOLO index order, for a checkpoint written by :func:`train_yolo_world`.

    Read from ``class_embeddings.pt`` beside the weights, else from the checkpoint itself.

    Raises:
        PipelineError: the weights file is missing or holds no class names.
    """
    weights = Path(weights)
    if not weights.is_file():
        raise PipelineError(f"{weights}: file not found (expected YOLO-World weights, e.g. weights/best.pt)")
    if _embeddings_beside(weights).is_file():
        return list(_load_embeddings(_embeddings_beside(weights))["names"])
    with _offline_ultralytics():
        from ultralytics.nn.tasks import load_checkpoint

        model = load_checkpoint(str(weights), device="cpu")[0]
    names = getattr(model, "names", None)
    if not names:
        raise PipelineError(f"{weights}: the checkpoint holds no class names")
    return list(names.values()) if isinstance(names, dict) else list(names)


def predict_yolo_world(
    *,
    weights: Path,
    images: list[Path],
    imgsz: int = 640,
    conf: float = 0.001,
    device: str | None = None,
    batch: int = 8,
) -> list[list[dict]]:
    """Detect the trained classes in images with a fine-tuned YOLO-World checkpoint, offline.

    The class prompts are the stored embeddings (``class_embeddings.pt`` beside the weights) in
    the trained order; without that file, those kept in the checkpoint. Images are letterboxed
    to ``imgsz`` by ultralytics and boxes are mapped back to the original image.

    Args:
        weights: ``weights/best.pt`` (or ``last.pt``) of a :func:`train_yolo_world` run.
        images: image files (any size, grey or colour).
        imgsz: inference size in pixels (long side after letterbox).
        conf: minimum score kept, in [0, 1].
        device: ``"cpu"``, ``"0"``/``"cuda:0"``; ``None`` picks the first GPU, else the CPU.
        batch: images per forward pass.

    Returns:
        One list per input image, in input order, of detections
        ``{"bbox_xyxy": [x0, y0, x1, y1], "class_index": int, "score": float}``: box corners in
        absolute pixels of the original image (float, clipped to it), ``class_index`` 0-based
        into :func:`load_class_names`, score in [0, 1].

    Raises:
        PipelineError: missing weights or image file, bad arguments.
    """
    weights = Path(weights)
    images = [Path(p) for p in images]
    if not weights.is_file():
        raise PipelineError(f"{weights}: file not found (expected YOLO-World weights, e.g. weights/best.pt)")
    for p in images:
        if not p.is_file():
            raise PipelineError(f"{p}: file not found (expected an image)")
    if not 0.0 <= conf <= 1.0 or imgsz < 32 or batch < 1:
        raise PipelineError(
            f"conf={conf}, imgsz={imgsz}, batch={batch}: expected conf in [0, 1], imgsz >= 32, batch >= 1"
        )
    if not images:
        return []
    device = _resolve_device(device)
    with _offline_ultralytics():
        yolo = _load_for_prediction(weights)
        results = yolo.predict(
            source=[str(p) for p in images], imgsz=imgsz, conf=conf, device=device, batch=batch,
            stream=True, verbose=False, save=False,
        )
        return [_detections(r) for r in results]


def _load_for_prediction(weights: Path) -> Any:
    """ultralytics model for ``weights`` with the stored class prompts and names set (no CLIP)."""
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.tasks import WorldModel

    try:
        yolo = YOLO(str(weights), task="detect")
    except Exception as exc:  # ultralytics raises many types for a foreign or corrupt file
        raise PipelineError(f"{weights}: not a loadable YOLO checkpoint ({_first_line(exc)})") from None
    net = yolo.model
    if not isinstance(net, WorldModel):
        raise PipelineError(f"{weights}: a {type(net).__name__} checkpoint, expected YOLO-World (WorldModel)")
    stored = _embeddings_beside(weights)
    if stored.is_file():
        payload = _load_embeddings(stored)
        names, emb = list(payload["names"]), payload["embeddings"]
        if emb.ndim != 2 or emb.shape[0] != len(names) or emb.shape[1] != _text_dim(net):
            raise PipelineError(f"{stored}: embeddings {tuple(emb.shape)} do not fit {len(names)} names and the model")
        net.txt_feats = emb[None].to(torch.float32)
        net.model[-1].nc = len(names)
        net.names = dict(enumerate(names))
    elif getattr(net, "txt_feats", None) is None:
        raise PipelineError(f"{weights}: no {EMBEDDINGS_FILE} beside it and no class prompts in the checkpoint")
    return yolo


def _detections(result: Any) -> list[dict]:
    boxes = result.boxes
    if boxes is None or len(boxes) == 0:
        return []
    xyxy = boxes.xyxy.detach().cpu().numpy().astype(float)
    cls = boxes.cls.detach().cpu().numpy().astype(int)
    score = boxes.conf.detach().cpu().numpy().astype(float)
    return [
        {"bbox_xyxy": [float(v) for v in b], "class_index": int(c), "score": float(s)}
        for b, c, s in zip(xyxy, cls, score)
    ]
