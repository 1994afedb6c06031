"""convert-masks wall time against the decode floor, in one run.

Usage::

    python benchmarks/convert_masks.py [--category $MVTEC_ROOT/bottle] [--repeats 3] [--json out.json]

The floor is a single-threaded loop that only decodes, with OpenCV, every file convert-masks reads
(each image of ``train/good`` and ``test/``, each mask) and does nothing else. ``convert-masks``
decodes the same files (checking them), finds the components, encodes RLE, checks itself and writes
COCO, YOLO and SAM files. Both run alternately, ``--repeats`` times each after one warm-up of each;
medians are reported, and the ratio convert / floor (below 1 means the parallel decode beats the
single-threaded floor).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def decode_floor(files: list[Path]) -> float:
    import cv2
    import numpy as np

    t0 = time.perf_counter()
    for f in files:
        if cv2.imdecode(np.fromfile(str(f), np.uint8), cv2.IMREAD_UNCHANGED) is None:
            raise SystemExit(f"{f}: not decodable")
    return time.perf_counter() - t0


def convert_once(category: Path) -> float:
    from pipeline.data.convert import convert_category

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        convert_category(category, Path(tmp) / "ann")
        return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_cat = Path(os.environ.get("MVTEC_ROOT", "../shared/data/mvtec_ad")) / "bottle"
    ap.add_argument("--category", type=Path, default=default_cat)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not args.category.is_dir():
        print(f"{args.category}: category not found (set MVTEC_ROOT or pass --category)", file=sys.stderr)
        return 2
    from pipeline.data.mvtec import scan_category

    cat = scan_category(args.category, check_pixels=False)
    files = [*cat.train_good, *(s.image for s in cat.test), *(s.mask for s in cat.test if s.mask)]
    decode_floor(files)
    convert_once(args.category)
    floor, conv = [], []
    for _ in range(args.repeats):
        floor.append(decode_floor(files))
        conv.append(convert_once(args.category))
    res = {
        "category": args.category.name,
        "files_decoded": len(files),
        "cores": os.cpu_count(),
        "decode_floor_s": round(statistics.median(floor), 3),
        "convert_masks_s": round(statistics.median(conv), 3),
        "ratio": round(statistics.median(c / f for c, f in zip(conv, floor)), 3),
    }
    print(
        f"{res['category']}: {res['files_decoded']} files; single-threaded decode {res['decode_floor_s']} s, "
        f"convert-masks {res['convert_masks_s']} s, ratio {res['ratio']} ({res['cores']} cores)"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
