"""The one device resolver: what ``--device`` means for every command.

Accepted specs: ``auto`` / ``None`` (the first CUDA GPU when one is visible, else the CPU), ``cpu``,
``cuda``, ``cuda:N``, ``N`` (a CUDA index, ultralytics' spelling), ``mps``, and for training
``0,1,2,3`` (several CUDA GPUs, one process each). Under ``torchrun`` a CUDA run resolves to the
process's own GPU, ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import os

from pipeline.core.errors import PipelineError


def resolve_device(spec: str | None = "auto", *, multi: bool = False) -> str:
    """Resolve a ``--device`` value to a torch device string.

    Args:
        spec: see the module docstring; case and spaces are ignored.
        multi: allow a comma list of CUDA indices (multi-GPU training).

    Returns:
        ``"cpu"``, ``"mps"``, ``"cuda:N"``, or for ``multi`` a comma list ``"cuda:0,cuda:1"``.

    Raises:
        PipelineError: CUDA asked for but not available, an index past the GPUs present, a list
            where one device is expected, or an unknown spec.
    """
    import torch

    s = "auto" if spec is None else str(spec).strip().lower().replace(" ", "")
    if s in ("", "auto"):
        s = "cuda" if torch.cuda.is_available() else "cpu"
    if s in ("cpu", "mps"):
        return s
    parts = [p.removeprefix("cuda:") for p in s.split(",")]
    if len(parts) > 1 and not multi:
        raise PipelineError(f"device {spec!r}: one device only here (several GPUs are for training)")
    if not torch.cuda.is_available():
        raise PipelineError(f"device {spec!r}: CUDA is not available on this machine (use --device cpu)")
    n = torch.cuda.device_count()
    if parts == ["cuda"]:
        # under torchrun each process takes its own GPU, before and after init_process_group
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        return "cuda:0"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not multi:
        raise PipelineError(
            f"device {spec!r}: under torchrun each process takes its own GPU (LOCAL_RANK); pass --device cuda or auto"
        )
    if not all(p.isdigit() and int(p) < n for p in parts) or len(set(parts)) != len(parts):
        raise PipelineError(f"device {spec!r}: expected cpu, auto, cuda, cuda:N or distinct CUDA indices below {n}")
    return ",".join(f"cuda:{int(p)}" for p in parts)


def is_cuda(device: str) -> bool:
    """True for a device string from :func:`resolve_device` that names one or more CUDA GPUs."""
    return str(device).startswith("cuda")


def cuda_indices(device: str) -> list[int]:
    """CUDA indices of a resolved device string (``"cuda:0,cuda:2"`` -> ``[0, 2]``); ``[]`` for CPU."""
    return [int(p.split(":")[1]) for p in str(device).split(",") if p.startswith("cuda:")]
