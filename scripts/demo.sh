#!/usr/bin/env bash
# The main job on the embedded default data, from a fresh machine:
# synthetic MVTec-layout category -> convert-masks -> finetune yolo -> predict -> evaluate -> export labelstudio
# -> bundle -> inspect new synthetic images -> export them as a review queue.
# Usage: bash scripts/demo.sh [CATEGORY_DIR]   (default: a synthetic category made in runs/demo/data)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
OUT=runs/demo
# Random init from the model YAML (no weights needed); MODEL=yolov8s-worldv2.pt uses real weights when present.
MODEL="${MODEL:-yolov8n-worldv2.yaml}"
if [ $# -ge 1 ]; then
  CATEGORY="$1"
  # A real category: the README's CPU recipe, YOLO-World's neck and head on the ImageNet trunk with the
  # best val AP50 on bottle (benchmarks/yolo_trunks.py), no mosaic, an optimizer step per batch.
  # BACKBONE= keeps the YAML's CSPDarknet.
  EPOCHS="${EPOCHS:-15}"
  IMGSZ="${IMGSZ:-320}"
  BATCH="${BATCH:-8}"
  BACKBONE="${BACKBONE-mobilenet_v2}"
  CLOSE_MOSAIC="${CLOSE_MOSAIC:-$EPOCHS}"
  NBS="${NBS:-$BATCH}"
else
  EPOCHS="${EPOCHS:-30}"
  IMGSZ="${IMGSZ:-160}"
  BATCH="${BATCH:-16}"
  BACKBONE="${BACKBONE-}"
  CLOSE_MOSAIC="${CLOSE_MOSAIC-}"
  NBS="${NBS-}"
  CATEGORY="$OUT/data/synth"
  pipeline synth-mvtec "$CATEGORY" --height 120 --width 160 --n-per-defect 40 --n-test-good 20 --force
fi
NAME="$(basename "$CATEGORY")"
pipeline convert-masks "$CATEGORY" --out "$OUT/annotations/$NAME" --force
case "$MODEL" in *.pt) BACKBONE="" ;; esac  # real weights keep their own backbone
pipeline finetune yolo --data "$OUT/annotations/$NAME/yolo/data.yaml" --model "$MODEL" \
  ${BACKBONE:+--backbone "$BACKBONE"} ${CLOSE_MOSAIC:+--close-mosaic "$CLOSE_MOSAIC"} ${NBS:+--nbs "$NBS"} \
  --epochs "$EPOCHS" --imgsz "$IMGSZ" --batch "$BATCH" --out "$OUT/yolo" --force
pipeline predict yolo --weights "$OUT/yolo/weights/best.pt" --gt "$OUT/annotations/$NAME/coco/test.json" \
  --imgsz "$IMGSZ" --out "$OUT/predictions/yolo_test" --force
pipeline evaluate "$OUT/predictions/yolo_test/predictions.json" --gt "$OUT/annotations/$NAME/coco/test.json" --out "$OUT/evaluation"
pipeline export labelstudio "$OUT/predictions/yolo_test/predictions.json" --gt "$OUT/annotations/$NAME/coco/test.json" \
  --out "$OUT/labelstudio" --min-score 0.05 --force
# Inspect new images with the trained detector: a bundle (thresholds chosen on val), then new images.
pipeline bundle --detector "$OUT/yolo" --split "$OUT/annotations/$NAME/split.json" --out "$OUT/bundle" --force
if [ $# -ge 1 ]; then
  NEW="$CATEGORY/test"
else
  NEW="$OUT/data/new"
  pipeline synth-mvtec "$NEW" --seed 7 --height 120 --width 160 --n-per-defect 2 --n-test-good 2 --force
  NEW="$NEW/test"
fi
pipeline inspect "$NEW" --bundle "$OUT/bundle" --out "$OUT/inspect" --force
# ... and the inspected images as a review queue (no ground truth: the images come from inspect's images.json)
pipeline export labelstudio "$OUT/inspect/predictions.json" --out "$OUT/labelstudio_new" --force
echo "demo done: everything is under $OUT"
