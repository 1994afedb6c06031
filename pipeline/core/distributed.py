"""Multi-process training helpers on ``torch.distributed`` (launched by ``torchrun``).

A process is part of a distributed run when ``torchrun`` (``python -m torch.distributed.run``) set
``WORLD_SIZE`` > 1 in its environment (with ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). Without those variables everything here is a no-op: rank 0 of a world of one,
so single-process code paths stay the default and nothing waits on other processes.

Backend: NCCL when the process trains on CUDA, gloo otherwise (CPU). Every rank must call the
collective helpers (:func:`barrier`, :func:`all_reduce_sums`, :func:`broadcast_object`) in the
same order; writes happen on rank 0 only (:func:`is_main`, :func:`main_only`).

Identical results whatever the world size: the trainers draw one global order per epoch from a
seeded generator that every rank holds in the same state, cut it into global batches of
``batch_size`` and give rank ``r`` the slice ``[r * b, (r + 1) * b)`` of each batch
(:func:`rank_slice`). DistributedDataParallel averages gradients over ranks, so with a mean loss
weighted by each rank's share (:func:`ddp_loss_scale`) one optimizer step sees the gradient of the
whole global batch, as a single process would.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

from pipeline.core.errors import PipelineError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run.

    Attributes:
        rank: global rank in ``[0, world_size)``.
        world_size: number of processes (1 when not distributed).
        local_rank: rank on this node (index of the GPU it uses).
        backend: ``nccl``, ``gloo`` or ``None`` (not distributed).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset or not a number)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def is_initialized() -> bool:
    """``torch.distributed`` is available and a process group exists."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def info() -> DistInfo:
    """The current :class:`DistInfo` (``rank 0 / world 1`` when no process group is initialised)."""
    if not is_initialized():
        return DistInfo()
    import torch.distributed as dist

    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend())


def init_from_env(device: str | None = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment; no-op without one.

    Args:
        device: the training device the caller resolved (``cpu``, ``cuda``, ``cuda:N``, ``auto``/None).
            On CUDA each process uses GPU ``LOCAL_RANK`` (:func:`pipeline.core.device.resolve_device` names it) and
            NCCL; otherwise gloo.

    Returns:
        This process's :class:`DistInfo`; ``DistInfo()`` when ``WORLD_SIZE`` is unset or 1.

    Raises:
        PipelineError: ``WORLD_SIZE`` > 1 but ``RANK``/``MASTER_ADDR``/``MASTER_PORT`` missing, or more
            local ranks than GPUs on a CUDA run.
    """
    if is_initialized():
        return info()
    if env_world_size() <= 1:
        return DistInfo()
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise PipelineError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} unset (launch with torchrun)"
        )
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = _wants_cuda(device)
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise PipelineError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) on this node "
                "(expected --nproc_per_node <= number of GPUs)"
            )
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    kwargs: dict[str, Any] = {"backend": backend}
    if use_cuda:
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(**kwargs)
    return info()


def _wants_cuda(device: str | None) -> bool:
    from pipeline.core.device import is_cuda, resolve_device

    return is_cuda(resolve_device(device))


def cleanup() -> None:
    """Destroy the process group if this process made one (safe to call always)."""
    if is_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()


def is_main() -> bool:
    """True on rank 0 (and in every single-process run)."""
    return info().rank == 0


def barrier() -> None:
    """Wait for every rank; returns at once when not distributed."""
    if is_initialized():
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[int(os.environ.get("LOCAL_RANK", "0"))])
        else:
            dist.barrier()


@contextlib.contextmanager
def main_only() -> Iterator[bool]:
    """``with main_only() as main: if main: write(...)`` then every rank waits until rank 0 wrote.

    Yields True on rank 0. The barrier after the block makes the files visible to every rank.
    """
    try:
        yield is_main()
    finally:
        barrier()


def _collective_device() -> str:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def all_reduce_sums(values: dict[str, float]) -> dict[str, float]:
    """Sum each value over ranks (float64); the input unchanged when not distributed.

    Reduce sums and counts, then divide: ``{"loss_sum": s, "n": n}`` -> mean = sum/n over all ranks.
    Every rank must pass the same keys in the same order.
    """
    if not is_initialized() or not values:
        return dict(values)
    import torch
    import torch.distributed as dist

    keys = list(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.cpu().tolist()))


def all_reduce_max(value: float) -> float:
    """The maximum of ``value`` over ranks (e.g. step time: the slowest rank sets the pace)."""
    if not is_initialized():
        return float(value)
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects); ``obj`` when not distributed."""
    if not is_initialized():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list:
    """Every rank's ``obj`` as a list indexed by rank; ``[obj]`` when not distributed."""
    if not is_initialized():
        return [obj]
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj: Any) -> list | None:
    """Every rank's ``obj`` on rank 0 (a list indexed by rank), ``None`` on the other ranks;
    ``[obj]`` when not distributed. Cheaper than :func:`all_gather_objects` for large results."""
    if not is_initialized():
        return [obj]
    import torch.distributed as dist

    out: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) with the same ``seed`` on every rank, so model
    initialisation and shared generators agree; per-rank randomness must come from explicit
    generators advanced identically on every rank."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_states() -> dict:
    """Every global random state a training step can draw from: Python's, NumPy's, torch's CPU
    generator and each CUDA device's, for a checkpoint (so a resumed run draws what an uninterrupted
    one would: dropout masks, DropBlock, any library's own draws)."""
    import random

    import numpy as np
    import torch

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # tensors and plain numbers only, so the checkpoint loads with torch.load(weights_only=True)
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    return {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict) -> None:
    """Restore what :func:`rng_states` captured (CUDA states only when as many devices are visible)."""
    import random

    import numpy as np
    import torch

    random.setstate(_as_python_state(states["python"]))
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _as_python_state(state):
    """``random.getstate()`` after a ``weights_only`` round trip: lists back to the tuples it needs."""
    version, internal, gauss = state
    return (int(version), tuple(int(v) for v in internal), gauss)


def rank_slice(n: int, *, rank: int | None = None, world_size: int | None = None) -> slice:
    """The part of a global batch of ``n`` items that ``rank`` takes: contiguous, sizes differing by
    at most one (the first ``n % world`` ranks get one more). ``slice(0, n)`` when not distributed."""
    d = info()
    rank = d.rank if rank is None else rank
    world = d.world_size if world_size is None else world_size
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def shard_indices(n: int, *, rank: int | None = None, world_size: int | None = None) -> list[int]:
    """Indices ``rank, rank + world, ...`` of ``range(n)`` (a strided shard, for inference work
    such as feature extraction whose results are gathered and re-ordered)."""
    d = info()
    rank = d.rank if rank is None else rank
    world = d.world_size if world_size is None else world_size
    return list(range(rank, n, world))


def ddp_loss_scale(local_n: int, global_n: int) -> float:
    """Factor that makes DDP's gradient average equal the global-batch mean gradient.

    DDP averages gradients over ``W`` ranks; rank ``r`` computes a mean over its ``n_r`` items.
    Multiplying its loss by ``W * n_r / N`` gives ``(1/W) * sum_r W * n_r / N * grad(mean_r) =
    grad(mean over N)``. Equals 1 when the batch splits evenly or when not distributed.
    """
    world = info().world_size
    return world * local_n / max(global_n, 1)


def wrap_ddp(model, device: str, *, find_unused_parameters: bool = False):
    """``DistributedDataParallel(model)`` when distributed (``device_ids`` on CUDA), else ``model``."""
    if not is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if device.startswith("cuda"):
        idx = int(device.split(":")[1]) if ":" in device else int(os.environ.get("LOCAL_RANK", "0"))
        return DDP(model, device_ids=[idx], output_device=idx, find_unused_parameters=find_unused_parameters)
    return DDP(model, find_unused_parameters=find_unused_parameters)


def unwrap(model):
    """The module inside a DDP / ``torch.compile`` wrapper (or ``model`` itself)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def autocast(device: str, enabled: bool = True):
    """bf16 autocast on CUDA (when ``enabled`` and the GPU supports bf16); a no-op context on CPU."""
    import torch

    if enabled and device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
