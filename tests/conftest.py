"""Shared fixtures: a synthetic MVTec category made on the fly, and the real data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.synth import generate_category


@pytest.fixture(scope="session")
def synth_category(tmp_path_factory) -> Path:
    """A small synthetic category (96x128, 3 defect types, 6 images each); treat as read-only."""
    return generate_category(tmp_path_factory.mktemp("mvtec") / "synth", seed=0)


@pytest.fixture(scope="session")
def mvtec_root() -> Path:
    """``$MVTEC_ROOT`` (the folder holding ``bottle/``); skips the test when unset or missing."""
    root = os.environ.get("MVTEC_ROOT")
    if not root:
        pytest.skip("real MVTec AD data not available: set MVTEC_ROOT to the folder holding bottle/")
    path = Path(root)
    if not (path / "bottle").is_dir():
        pytest.skip(f"real MVTec AD data not available: {path}/bottle not found")
    return path
