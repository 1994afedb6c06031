#!/usr/bin/env bash
# The main job on the embedded default data, from a fresh machine:
# synthetic MVTec-layout category -> convert-masks -> finetune yolo -> predict -> evaluate -> export labelstudio.
# Usage: bash scripts/demo.sh [CATEGORY_DIR]   (default: a synthetic category made in runs/demo/data)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
OUT=runs/demo
EPOCHS="${EPOCHS:-3}"
IMGSZ="${IMGSZ:-160}"
MODEL="${MODEL:-yolov8s-worldv2.yaml}"
if [ $# -ge 1 ]; then
  CATEGORY="$1"
else
  CATEGORY="$OUT/data/synth"
  pipeline synth-mvtec "$CATEGORY" --height 192 --width 256 --n-per-defect 12 --n-test-good 10 --force
fi
NAME="$(basename "$CATEGORY")"
pipeline convert-masks "$CATEGORY" --out "$OUT/annotations/$NAME" --force
pipeline finetune yolo --data "$OUT/annotations/$NAME/yolo/data.yaml" --model "$MODEL" \
  --epochs "$EPOCHS" --imgsz "$IMGSZ" --batch 8 --out "$OUT/yolo" --force
pipeline predict yolo --weights "$OUT/yolo/weights/best.pt" --gt "$OUT/annotations/$NAME/coco/test.json" \
  --imgsz "$IMGSZ" --out "$OUT/predictions/yolo_test.json" --force
pipeline evaluate "$OUT/predictions/yolo_test.json" --gt "$OUT/annotations/$NAME/coco/test.json" --out "$OUT/evaluation"
pipeline export labelstudio "$OUT/predictions/yolo_test.json" --gt "$OUT/annotations/$NAME/coco/test.json" \
  --out "$OUT/labelstudio" --min-score 0.05 --force
echo "demo done: everything is under $OUT"
