"""``pipeline inspect`` under torchrun: each rank inspects a contiguous run of whole batches, rank 0 merges.

With ``WORLD_SIZE`` > 1 (:mod:`pipeline.core.distributed`) the stably ordered image list
(:func:`pipeline.inspection.sources.resolve_images`) still to do is cut into batches of ``--batch``
images, and rank ``r`` takes the contiguous range of batches :func:`pipeline.core.distributed.rank_slice`
gives it. Whole batches, so every batch holds the same images as in a single-process run with the
same ``--batch`` (PatchCore and the classifier score a batch at once, and a different batch
composition can change the last bits of their floats): the merged files equal a single process's, bit
for bit, apart from the ``timing_ms`` of each record (and ``world_size`` in ``config.yaml``).

Each rank writes into its own part, ``OUT/.parts/rank-<r>/`` (``verdicts.jsonl``, ``masks/``,
``overlays/``); rank 0 then appends the parts' records to ``OUT/verdicts.jsonl`` in rank order (which
is input order, the shards being contiguous), moves their images into ``OUT/masks`` and
``OUT/overlays`` and removes ``.parts``. A run killed before the merge leaves its parts behind:
``--resume`` merges them first (complete lines only, an id already merged is not added twice) and
goes on with what is still missing; a fresh run (``--force``) removes them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence, TypeVar

PARTS = ".parts"
VERDICTS = "verdicts.jsonl"
IMAGE_DIRS = ("masks", "overlays")

T = TypeVar("T")


def shard(todo: Sequence[T], batch: int, *, rank: int, world_size: int) -> list[T]:
    """The items of ``todo`` that ``rank`` inspects: the contiguous whole batches of ``batch`` items
    :func:`pipeline.core.distributed.rank_slice` assigns it (all of ``todo`` in a world of one)."""
    from pipeline.core.distributed import rank_slice

    n_batches = -(-len(todo) // batch)
    s = rank_slice(n_batches, rank=rank, world_size=world_size)
    return list(todo[s.start * batch : s.stop * batch])


def part_dir(out: Path, rank: int) -> Path:
    """``OUT/.parts/rank-<rank>``: where ``rank`` writes its records and images."""
    return Path(out) / PARTS / f"rank-{rank:05d}"


def _complete_records(path: Path):
    """``(line, record)`` of a ``verdicts.jsonl``, up to the first torn or unreadable line."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                return
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                return
            yield line, rec


def merge_parts(out: Path) -> int:
    """Append every part's records to ``OUT/verdicts.jsonl`` (rank order), move its images into
    ``OUT/masks`` and ``OUT/overlays``, remove ``OUT/.parts``; the number of records added.

    Streams through a temporary file and one rename, so a kill leaves either the old or the merged
    ``verdicts.jsonl``; records whose id the file already holds are skipped (a merge repeated
    after a kill between the rename and the removal of the parts adds nothing twice).
    """
    out = Path(out)
    root = out / PARTS
    if not root.is_dir():
        return 0
    parts = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("rank-"))
    target = out / VERDICTS
    tmp = out / f".{VERDICTS}.merge.tmp"
    seen: set[int] = set()
    added = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for line, rec in _complete_records(target):
            seen.add(rec.get("id"))
            fh.write(line)
        for p in parts:
            for line, rec in _complete_records(p / VERDICTS):
                if rec.get("id") in seen:
                    continue
                seen.add(rec.get("id"))
                fh.write(line)
                added += 1
    os.replace(tmp, target)
    for p in parts:
        for sub in IMAGE_DIRS:
            if not (p / sub).is_dir():
                continue
            (out / sub).mkdir(exist_ok=True)
            for f in sorted((p / sub).iterdir()):
                if f.is_file() and not f.name.startswith("."):  # not a half-written temporary file
                    os.replace(f, out / sub / f.name)
    shutil.rmtree(root)
    return added
