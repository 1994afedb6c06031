"""YOLO-World (ultralytics), offline. Imports run ``train`` -> ``ddp`` -> ``offline`` -> ``prompts`` / ``trunk``
and ``predict`` -> ``offline``; ``trunk`` (an ImageNet backbone in ultralytics' model YAML) uses
:mod:`pipeline.models.backbones`; the dataset side is :mod:`pipeline.data.yolo`.

ultralytics reads ``YOLO_OFFLINE`` and ``YOLO_AUTOINSTALL`` once, when first imported; they are set
here, before any module of this family imports it (a user's own values win).
"""

import os

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
