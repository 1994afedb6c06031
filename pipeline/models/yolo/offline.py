"""ultralytics, fully offline: the patches every YOLO-World call runs under, and the trainer class.

Everything ultralytics would fetch from the network is replaced at run time, inside
:func:`offline_ultralytics` and :class:`OfflineWorldTrainer`:

- class-name text embeddings: from :mod:`pipeline.models.yolo.prompts` (CLIP when usable, else
  hash vectors), never from CLIP calls ultralytics makes itself; ultralytics' own cache file next
  to the train images is neither read nor written;
- the plot font (``Arial.ttf``): any local copy, else matplotlib's ``DejaVuSans.ttf``;
- the AMP check on CUDA (it downloads ``yolo26n.pt``): run only when that file is on disk;
- the online flag, auto-install of requirements, usage events and logger integrations: off;
- label ``.cache`` files beside the dataset: not written.

``YOLO_OFFLINE`` / ``YOLO_AUTOINSTALL`` are set by the package (``pipeline/models/yolo/__init__.py``)
before this module first imports ultralytics.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import ultralytics.data.dataset as data_dataset
import ultralytics.data.utils as data_utils
import ultralytics.engine.trainer as engine_trainer
import ultralytics.utils as ul_utils
import ultralytics.utils.callbacks as ul_callbacks
import ultralytics.utils.checks as checks
import ultralytics.utils.events as events
import ultralytics.utils.plotting as plotting
from ultralytics.models.yolo.world.train import WorldTrainer, on_pretrain_routine_end
from ultralytics.utils.torch_utils import unwrap_model

from pipeline.core.device import cuda_indices, is_cuda, resolve_device
from pipeline.models.yolo.prompts import (
    HASH_SOURCE,
    class_prompt,
    load_embeddings,
    prompt_texts,
    save_embeddings,
    text_dim,
    text_table,
)
from pipeline.models.yolo.trunk import restore_trunk_batchnorm  # also registers ImageNetTrunk with ultralytics

LOG = logging.getLogger("pipeline.models.yolo")  # the family's log lines, copied into the run's log.txt
_LOGGER_SETTINGS_OFF = ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")
_MPL_FONT = "DejaVuSans.ttf"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# ----------------------------------------------------------------------------- offline patches


def _local_font(font: str | Path = "Arial.ttf") -> Path:
    """Stand-in for ``ultralytics.utils.checks.check_font`` that never downloads.

    Returns the font when it is a file, the copy in ultralytics' config folder when present,
    otherwise the DejaVu Sans that ships with matplotlib.
    """
    import matplotlib

    if Path(font).is_file():
        return Path(font)
    local = Path(ul_utils.USER_CONFIG_DIR) / Path(font).name
    if local.is_file():
        return local
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / _MPL_FONT


def _amp_check_without_download(check_amp: Callable) -> Callable:
    """Wrap ultralytics' AMP check so it runs only when its reference model is already on disk."""

    def check(model: Any) -> bool:
        if next(model.parameters()).device.type != "cuda" or (Path(ul_utils.WEIGHTS_DIR) / "yolo26n.pt").is_file():
            return check_amp(model)
        LOG.info("AMP check skipped (it would download yolo26n.pt); training with AMP on CUDA")
        return True

    return check


def _no_label_cache(prefix: str, path: Path, x: dict, version: str) -> None:
    """Stand-in for ``save_dataset_cache_file``: keep the in-place 'version' key, write no file."""
    x["version"] = version


@contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """``obj.name = value`` while the block runs; the old value is put back after it."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextmanager
def _settings_in_memory(overrides: dict[str, Any]) -> Iterator[None]:
    """Override ultralytics SETTINGS for this process only (the user's settings file is not rewritten)."""
    old = {k: dict.get(ul_utils.SETTINGS, k) for k in overrides}
    for k, v in overrides.items():
        dict.__setitem__(ul_utils.SETTINGS, k, v)  # bypass JSONDict.__setitem__, which saves to disk
    try:
        yield
    finally:
        for k, v in old.items():
            dict.__setitem__(ul_utils.SETTINGS, k, v)


@contextmanager
def offline_ultralytics() -> Iterator[None]:
    """Run ultralytics with nothing that reaches the network or writes beside the input data.

    Patches, for the duration of the block only: the ``ONLINE`` flags, auto-install, usage
    events, the integration callbacks (Platform streaming, MLflow, Comet, ...: not added),
    the matching SETTINGS (in memory), ``check_font`` (local font), the
    trainer's ``check_amp`` (no download) and the dataset label-cache writer (no ``.cache``
    file beside the labels). Multi-GPU training adds :func:`pipeline.models.yolo.ddp.ddp_launch`.
    """
    with ExitStack() as stack:
        for module in (ul_utils, checks, events):
            stack.enter_context(patched(module, "ONLINE", False))
        stack.enter_context(patched(checks, "AUTOINSTALL", False))
        stack.enter_context(patched(events.events, "enabled", False))
        # usage events, Ultralytics Platform streaming (on with $ULTRALYTICS_API_KEY), MLflow/Comet/...
        stack.enter_context(patched(ul_callbacks, "add_integration_callbacks", lambda instance: None))
        stack.enter_context(_settings_in_memory({**{k: False for k in _LOGGER_SETTINGS_OFF}, "api_key": ""}))
        for module in (checks, data_utils, plotting):
            stack.enter_context(patched(module, "check_font", _local_font))
        stack.enter_context(patched(engine_trainer, "check_amp", _amp_check_without_download(checks.check_amp)))
        stack.enter_context(patched(data_dataset, "save_dataset_cache_file", _no_label_cache))
        yield


@contextmanager
def torch_determinism_restored() -> Iterator[None]:
    """ultralytics turns on torch's deterministic algorithms globally; put the previous state back."""
    state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = torch.backends.cudnn.deterministic
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(state[0], warn_only=state[1])
        torch.backends.cudnn.deterministic = cudnn


def _strip_ansi(record: logging.LogRecord) -> bool:
    """Log filter: drop ultralytics' terminal colour codes from the file copy."""
    if isinstance(record.msg, str):
        record.msg = _ANSI.sub("", record.msg)
    return True


@contextmanager
def run_log(path: Path) -> Iterator[None]:
    """Append ultralytics' and this family's log lines to ``path`` (a run's ``log.txt``) while the block runs."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.addFilter(_strip_ansi)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    old_level = LOG.level
    LOG.setLevel(logging.INFO)
    ul_utils.LOGGER.addHandler(handler)
    LOG.addHandler(handler)
    try:
        yield
    finally:
        ul_utils.LOGGER.removeHandler(handler)
        LOG.removeHandler(handler)
        LOG.setLevel(old_level)
        handler.close()


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, without terminal colour codes."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return _ANSI.sub("", lines[0]) if lines else type(exc).__name__


def ultralytics_device(spec: str | None, *, multi: bool = False) -> str:
    """:func:`pipeline.core.device.resolve_device` in ultralytics' spelling: ``"cpu"``, ``"mps"``,
    ``"0"``, or for ``multi`` (training with ultralytics' DDP) ``"0,1,2,3"``."""
    device = resolve_device(spec, multi=multi)
    return ",".join(str(i) for i in cuda_indices(device)) if is_cuda(device) else device


# ----------------------------------------------------------------------------- trainer


def set_ema_classes(trainer: OfflineWorldTrainer) -> None:
    """``on_pretrain_routine_end`` callback: the validation classes of the EMA model, from the text table
    (upstream sets them through ``set_classes``, which calls CLIP)."""
    names = [class_prompt(n) for n in trainer.test_loader.dataset.data["names"].values()]
    table = trainer.text_table()
    ema = trainer.ema.ema
    device = next(ema.parameters()).device
    ema.txt_feats = torch.stack([table[n] for n in names])[None].to(device)  # 1 x nc x dim
    ema.model[-1].nc = len(names)


class OfflineWorldTrainer(WorldTrainer):
    """``WorldTrainer`` whose text embeddings come from :meth:`text_table`, never from CLIP calls it makes itself.

    Three hooks, nothing else changed: ``generate_text_embeddings`` (the training prompts; no cache
    file beside the data), the ``on_pretrain_routine_end`` callback (:func:`set_ema_classes`), and
    ``get_model``, which also puts an ImageNet trunk's BatchNorm settings back after ultralytics'
    weight init (:func:`pipeline.models.yolo.trunk.restore_trunk_batchnorm`).
    Set :attr:`use_clip` (and optionally :meth:`use_stored_prompts`) before ``train()``.
    """

    use_clip: bool = False  # set on the instance before train()
    preset_table: dict | None = None  # text -> embedding read back from a run folder (resume)
    preset_path: str | None = None  # the file preset_table came from
    embedding_source: str = HASH_SOURCE  # CLIP_VARIANT or HASH_SOURCE, for the embeddings file
    embeddings_path: str | None = None  # where the prompts are stored before the first epoch

    def text_table(self) -> dict[str, torch.Tensor]:
        """Text -> ``dim`` embedding for every prompt of the dataset's names (computed once)."""
        if getattr(self, "_text_table", None) is None:
            names = list(self.data["names"].values())
            texts = prompt_texts(names)
            if self.preset_table is not None and set(texts) <= set(self.preset_table):
                self._text_table = {t: self.preset_table[t] for t in texts}
            else:
                dim = text_dim(unwrap_model(self.model))
                self._text_table = text_table(names, dim=dim, use_clip=self.use_clip, device=self.device)
        return self._text_table

    def get_model(self, cfg=None, weights=None, verbose=True):  # noqa: ANN001 - ultralytics signature
        model = super().get_model(cfg, weights, verbose)
        restore_trunk_batchnorm(model)
        hooks = self.callbacks["on_pretrain_routine_end"]
        hooks[:] = [h for h in hooks if h is not on_pretrain_routine_end]
        if set_ema_classes not in hooks:
            hooks.append(set_ema_classes)
        return model

    def generate_text_embeddings(self, texts, batch, cache_dir):  # noqa: ANN001 - ultralytics signature
        table = self.text_table()
        return {t: table[t] for t in texts}

    def use_stored_prompts(self, path: Path) -> None:
        """Take the prompts of a class-embeddings file (a resumed run keeps its prompts, whatever is installed now)."""
        payload = load_embeddings(Path(path))
        self.preset_table = dict(zip(payload["texts"], payload["text_embeddings"]))
        self.embedding_source = payload.get("source", HASH_SOURCE)
        self.preset_path = str(path)

    def store_prompts_on_start(self, path: Path) -> None:
        """Write the prompts to ``path`` before the first epoch, so a resumed run finds the same ones."""
        self.embeddings_path = str(path)
        self.add_callback("on_pretrain_routine_end", lambda t: t._store_prompts(Path(path)))

    def _store_prompts(self, path: Path) -> None:
        if os.environ.get("RANK", "-1") not in ("-1", "0"):  # rank 0 only under DDP
            return
        names = list(self.data["names"].values())
        save_embeddings(path, names=names, table=self.text_table(), source=self.embedding_source)

    def final_metrics(self) -> dict:
        """Validation metrics of ``best.pt`` (ultralytics' final evaluation) as plain floats (NaN when absent)."""
        m = dict(self.metrics or {})

        def get(key: str) -> float:
            return float(m.get(f"metrics/{key}(B)", float("nan")))

        return {
            "split": "val",
            "weights": "weights/best.pt",
            "mAP50": get("mAP50"),
            "mAP50-95": get("mAP50-95"),
            "precision": get("precision"),
            "recall": get("recall"),
            "epochs": int(self.epochs),
            "embedding_source": self.embedding_source,
        }
