"""Weights resolver: paths, caches, and the one-line message when a file is missing."""

import pytest

from pipeline.core.errors import PipelineError
from pipeline.core.weights import resolve_weights


def test_missing_known_weights_name_file_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(PipelineError) as exc:
        resolve_weights("sam_vit_b_01ec64.pth")
    msg = str(exc.value)
    assert "sam_vit_b_01ec64.pth" in msg and "dl.fbaipublicfiles.com" in msg and "--allow-download" in msg
    assert str(tmp_path) in msg and "\n" not in msg


def test_found_in_pipeline_weights_and_torch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "yolov8s-worldv2.pt").write_bytes(b"x")
    assert resolve_weights("yolov8s-worldv2.pt") == (tmp_path / "w" / "yolov8s-worldv2.pt").resolve()
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"x")
    assert resolve_weights("resnet18-f37072fd.pth").parent == (tmp_path / "torch" / "hub" / "checkpoints").resolve()
    assert resolve_weights(tmp_path / "w" / "yolov8s-worldv2.pt").name == "yolov8s-worldv2.pt"


def test_missing_file_message_names_every_place_the_url_and_the_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "ultra"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError) as exc:
        resolve_weights("resnet18-f37072fd.pth", alternative="--weights none to train from scratch")
    msg = str(exc.value)
    f = "resnet18-f37072fd.pth"
    expected = (
        f"weights '{f}' (torchvision ResNet-18, ImageNet-1k) not found (looked at {tmp_path / f}, "
        f"{tmp_path / 'w' / f}, {tmp_path / 'torch' / 'hub' / 'checkpoints' / f}, {tmp_path / 'weights' / f}); "
        f"download it from https://download.pytorch.org/models/{f} and put it in one of those folders or "
        "$PIPELINE_WEIGHTS, or pass --allow-download to fetch it, or --weights none to train from scratch"
    )
    assert msg == expected
