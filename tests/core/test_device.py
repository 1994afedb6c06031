"""The one device resolver."""

from __future__ import annotations

import pytest

from pipeline.core.device import cuda_indices, is_cuda, resolve_device
from pipeline.core.errors import PipelineError

torch = pytest.importorskip("torch")


def test_cpu_and_auto(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == resolve_device(" CPU ") == "cpu"
    assert not is_cuda("cpu") and cuda_indices("cpu") == []
    with pytest.raises(PipelineError, match="CUDA is not available"):
        resolve_device("0")


def test_cuda_specs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_device("auto") == resolve_device("cuda") == "cuda:0"
    assert resolve_device("1") == resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("0,1", multi=True) == "cuda:0,cuda:1" and cuda_indices("cuda:0,cuda:1") == [0, 1]
    for bad, msg in [("0,1", "one device only"), ("2", "below 2"), ("tpu", "expected cpu, auto")]:
        with pytest.raises(PipelineError, match=msg):
            resolve_device(bad)


def test_torchrun_gives_each_process_its_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == resolve_device("cuda") == "cuda:3"
    with pytest.raises(PipelineError, match="each process takes its own GPU"):
        resolve_device("cuda:1")
