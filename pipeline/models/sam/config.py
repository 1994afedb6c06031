"""What defines a SAM fine-tuning run: :class:`SamTrainConfig` (the run's ``config.yaml``).

Apart from the loop in :mod:`pipeline.models.sam.train`: the CLI builds it from its options, a
checkpoint stores it (:meth:`SamTrainConfig.as_dict`) and ``--resume`` rebuilds it from there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.models.sam.model import MODEL_TYPES

TRAINABLE = ("mask_decoder", "prompt_encoder", "image_encoder")


@dataclass(frozen=True)
class SamTrainConfig:
    """Everything that defines a SAM fine-tuning run (written as the run's ``config.yaml``).

    Attributes:
        train_records, val_records: SAM JSON Lines (``annotations/<cat>/sam/{train,val}.jsonl``).
        model_type: ``tiny`` (random init, tests/smoke runs) or ``vit_b|vit_l|vit_h``.
        checkpoint: full SAM checkpoint (name resolved by ``pipeline.core.weights`` or a path); required for vit_*.
        tiny_seed: seed of the model's random init (defines the tiny model's frozen parts).
        train: modules that train; ``mask_decoder`` by default (``prompt_encoder``, ``image_encoder`` optional;
            training the image encoder disables the embedding cache).
        epochs, lr, weight_decay: AdamW with a per-step cosine schedule from ``lr`` to ``lr * min_lr_ratio``.
        box_jitter_px: each box coordinate moves by a uniform random ``[-j, j]`` original pixels (0: off).
        mask_loss: ``focal`` (alpha 0.25, gamma 2) or ``bce``; weights ``mask_loss_weight`` (default 20
            for focal, 1 for bce), ``dice_weight``, ``iou_weight``.
        loss_resolution: ``lowres`` (decoder frame, soft area-pooled target) or ``native`` (original pixels).
        max_boxes: at most this many components of one image per step (a random subset beyond).
        cache_dir: embedding cache folder (``None``: :func:`pipeline.models.sam.model.default_cache_dir`).
        use_cache: ``False`` recomputes every embedding every epoch (benchmark baseline only).
        images_per_step: images per optimizer step (the global batch; default 1 = one step per image).
            The step loss is the mean of the per-image losses. Under ``torchrun`` the images of a step are
            split over the ranks, so a run gives the same result for any world size that keeps this value
            (use a multiple of the number of processes, or some ranks idle on part of every step).
        amp: bf16 autocast for the decoder on CUDA (ignored on CPU).
    """

    train_records: str
    val_records: str
    model_type: str = "tiny"
    checkpoint: str | None = None
    tiny_seed: int = 0
    train: tuple[str, ...] = ("mask_decoder",)
    epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 1e-4
    min_lr_ratio: float = 0.01
    seed: int = 0
    box_jitter_px: float = 0.0
    mask_loss: str = "focal"
    mask_loss_weight: float | None = None
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    max_boxes: int = 32
    loss_resolution: str = "lowres"
    cache_dir: str | None = None
    use_cache: bool = True
    device: str | None = None
    allow_download: bool = False
    images_per_step: int = 1
    amp: bool = True

    def check(self) -> None:
        """Raise :class:`PipelineError` for values out of range."""
        if self.model_type not in MODEL_TYPES:
            raise PipelineError(f"--model-type {self.model_type!r}: expected one of {', '.join(MODEL_TYPES)}")
        bad = sorted(set(self.train) - set(TRAINABLE))
        if bad or not self.train:
            raise PipelineError(
                f"train modules {list(self.train)}: expected a non-empty subset of {', '.join(TRAINABLE)}"
            )
        if self.loss_resolution not in ("lowres", "native"):
            raise PipelineError(f"--loss-resolution {self.loss_resolution!r}: expected lowres or native")
        if self.mask_loss not in ("focal", "bce"):
            raise PipelineError(f"--mask-loss {self.mask_loss!r}: expected focal or bce")
        if self.epochs < 1 or self.lr <= 0 or self.max_boxes < 1 or self.box_jitter_px < 0:
            raise PipelineError("epochs, lr, max_boxes must be positive and box_jitter_px >= 0")
        if self.images_per_step < 1:
            raise PipelineError(f"--images-per-step {self.images_per_step}: expected at least 1")

    @property
    def pixel_weight(self) -> float:
        if self.mask_loss_weight is not None:
            return self.mask_loss_weight
        return 20.0 if self.mask_loss == "focal" else 1.0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train"] = list(self.train)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SamTrainConfig:
        """Inverse of :meth:`as_dict` (e.g. the config stored in ``last.pt``)."""
        return cls(**{**d, "train": tuple(d["train"])})

    @classmethod
    def from_annotations(
        cls, annotations: Path, *, train_prompt_encoder: bool = False, train_image_encoder: bool = False, **options
    ) -> SamTrainConfig:
        """The config for a ``convert-masks`` folder: ``sam/train.jsonl`` and ``sam/val.jsonl`` under
        ``annotations``; the mask decoder trains, plus the encoders asked for; ``options`` as the fields."""
        train = (
            ("mask_decoder",)
            + (("prompt_encoder",) if train_prompt_encoder else ())
            + (("image_encoder",) if train_image_encoder else ())
        )
        sam = Path(annotations) / "sam"
        return cls(train_records=str(sam / "train.jsonl"), val_records=str(sam / "val.jsonl"), train=train, **options)
