"""pipeline: industrial visual inspection on MVTec AD-layout data.

Stages exchange files (split manifest, COCO JSON, YOLO folder, SAM JSON Lines, weights,
prediction JSON); see README.md for the data flow.
"""

__version__ = "0.1.0"
