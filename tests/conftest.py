"""Shared fixtures: a synthetic MVTec category made on the fly, and the real data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.data.synth import generate_category


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


@pytest.fixture()
def one_torch_thread():
    """One intra-op thread for tiny models: on a shared 2-core machine, 2 threads make small ops
    10-50x slower. Restores the previous setting."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
