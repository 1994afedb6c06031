"""Multi-process training on torch.distributed helpers, and 2-process gloo runs on CPU.

The 2-process tests launch ``python -m torch.distributed.run --nproc_per_node 2`` (torchrun) on
127.0.0.1 with a free port, on tiny models and data, one thread per process, and compare with a
single-process run of the same global batch:

- both ranks end with bit-identical weights (DDP keeps replicas in step);
- metrics (losses, accuracies, IoUs) equal the single-process run's within ``ATOL`` = 2e-5 (measured:
  about 1e-7); weights within ``WEIGHT_ATOL`` = 2e-4 absolute. Gradient averaging over ranks sums the
  same floats in another order, and AdamW divides each update by the root of the squared-gradient
  average, so for parameters whose gradients are near zero (the self-attention convolutions behind
  their gate ``gamma``, about 1e-3 after the first steps) last-bit gradient differences grow to
  about 1e-4 after 10 steps (measured 8e-5 on weights of size 0.13). The SAM decoder measured 0.0.

Also: a 2-rank SAM run stopped after epoch 1 and resumed equals an uninterrupted one; PatchCore's
feature extraction split over 2 ranks gives the single-process memory bank; the ultralytics
multi-GPU launch file runs our offline trainer (generated for 2 GPUs, run as one CPU process);
``scripts/gpu_check.sh --dry-run`` prints its table.

Classifier: BatchNorm cannot be synchronised on CPU (``SyncBatchNorm`` is CUDA-only in torch), so the
test freezes the ResNet trunk (its BatchNorm stays in eval mode) and trains the self-attention
blocks and the head (no BatchNorm), with dropout 0 and augmentation on.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from pipeline.core import distributed as D  # noqa: E402

ATOL = 2e-5  # metrics, single process vs 2 ranks (float32, a few AdamW steps)
WEIGHT_ATOL = 2e-4  # weights, single process vs 2 ranks (see the module docstring)
FROZEN_TRUNK = ["stem", "layer1", "layer2", "layer3", "layer4"]
CLS_OVERRIDES = {
    "data.input_size_hw": [32, 32],
    "train.batch_size": 4,
    "train.device": "cpu",
    "train.epochs": 2,
    "data.max_train_good": 4,
    "model.freeze": FROZEN_TRUNK,
    "model.dropout": 0.0,
    "model.attention_dropout": 0.0,
}

WORKER = textwrap.dedent('''
    """Run by torchrun in the tests: one trainer; every rank saves its final weights."""
    import json, os, sys
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    from pipeline.core import distributed as D

    kind, out, inp = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    rank = int(os.environ.get("RANK", "0"))
    weights_dir = out.parent / (out.name + "_ranks")
    weights_dir.mkdir(parents=True, exist_ok=True)
    if kind == "classifier":
        import pipeline.models.classifier.train as C
        from pipeline.models.classifier.config import load_config

        orig = C.train_one_epoch

        def recording(model, *a, **k):
            res = orig(model, *a, **k)
            torch.save(D.unwrap(model).state_dict(), weights_dir / f"rank{rank}.pt")
            return res

        C.train_one_epoch = recording
        cfg = load_config("attempt2_selfattention", json.loads(os.environ["CLS_OVERRIDES"]))
        C.train_classifier(cfg, inp, out, weights="none", progress=False, echo=False)
    elif kind == "anomaly":
        import numpy as np

        from pipeline.models.anomaly.patchcore import PatchCoreConfig, fit_patchcore

        cfg = PatchCoreConfig(backbone="efficientnet_lite0", image_size=64, coreset_ratio=0.1, batch_size=4)
        model = fit_patchcore(sorted((inp / "train" / "good").glob("*.png")), cfg, device="cpu")
        assert (model is None) == (rank != 0)
        if model is not None:
            np.save(weights_dir / "bank.npy", model.memory_bank)
    else:
        import pipeline.models.sam.train as S

        orig = S.train_one_epoch
        calls = []
        stop_at = int(os.environ.get("SAM_STOP_AT", "0"))

        def recording(sam, *a, **k):
            calls.append(1)
            if len(calls) == stop_at:  # a crash after the previous epoch's checkpoint
                raise SystemExit(3)
            res = orig(sam, *a, **k)
            torch.save(sam.mask_decoder.state_dict(), weights_dir / f"rank{rank}.pt")
            return res

        S.train_one_epoch = recording
        cfg = S.SamTrainConfig(**json.loads(os.environ["SAM_CONFIG"]))
        S.finetune_sam(cfg, out, progress=False, resume=os.environ.get("SAM_RESUME") == "1")
    D.cleanup()
''')


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, args: list[str], *, nproc: int, env: dict, ok: bool = True) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(k, None)
    if nproc == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            str(script),
            *args,
        ]
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) if a[k].numel() else 0.0 for k in a)


def _close(a, b, path="") -> None:
    """Numbers in nested dicts/lists equal within ATOL; other leaves equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert abs(a - b) <= ATOL or (a != a and b != b), f"{path}: {a} vs {b}"
    elif isinstance(a, str):  # paths inside the two run folders
        assert a.replace("/one", "/RUN") == b.replace("/two", "/RUN"), f"{path}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


_VOLATILE = {
    "images_per_s",
    "train_images_per_s",
    "data_s",
    "step_s",
    "seconds",
    "train_seconds",
    "decode_resize_s",
    "world_size",
    "encoder_calls",
    "cache_hits",
    "train_encoder_calls",
    "train_cache_hits",
    "embedding_cache",
}


def _stable(obj):
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- helpers, single process


def test_helpers_are_no_ops_without_torchrun(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert D.init_from_env("cpu") == D.DistInfo(0, 1, 0, None)
    assert not D.is_initialized() and D.is_main()
    D.barrier()  # returns at once
    assert D.all_reduce_sums({"loss": 2.5, "n": 3}) == {"loss": 2.5, "n": 3}
    assert D.all_reduce_max(1.5) == 1.5
    assert D.broadcast_object({"a": 1}) == {"a": 1} and D.all_gather_objects(7) == [7]
    with D.main_only() as main:
        assert main
    assert D.ddp_loss_scale(3, 3) == 1.0
    D.seed_all(5)
    a = torch.rand(3)
    D.seed_all(5)
    assert torch.equal(a, torch.rand(3))
    m = torch.nn.Linear(2, 2)
    assert D.wrap_ddp(m, "cpu") is m and D.unwrap(m) is m
    from pipeline.core.device import resolve_device

    assert resolve_device("cpu") == "cpu"
    with D.autocast("cpu"):  # no autocast on CPU
        assert not torch.is_autocast_enabled()


def test_incomplete_torchrun_environment_is_one_line(monkeypatch):
    from pipeline.core.errors import PipelineError

    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(PipelineError, match="WORLD_SIZE=2 but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT unset"):
        D.init_from_env("cpu")


@pytest.mark.parametrize(
    "n, world, sizes",
    [
        (8, 2, [4, 4]),  # even split
        (5, 2, [3, 2]),  # first ranks take the remainder
        (1, 2, [1, 0]),  # fewer items than ranks: a rank gets nothing
        (7, 3, [3, 2, 2]),
    ],
)
def test_rank_slices_tile_the_global_batch(n, world, sizes):
    slices = [D.rank_slice(n, rank=r, world_size=world) for r in range(world)]
    assert [s.stop - s.start for s in slices] == sizes
    assert sum((list(range(n))[s] for s in slices), []) == list(range(n))
    shards = [D.shard_indices(n, rank=r, world_size=world) for r in range(world)]
    assert sorted(sum(shards, [])) == list(range(n))


def test_augmentation_of_a_rank_slice_equals_the_slice_of_the_global_batch():
    from pipeline.models.classifier.config import AugmentConfig
    from pipeline.models.classifier.data import augment

    aug = AugmentConfig(hflip=0.5, vflip=0.5, rotate_deg=10.0, translate_frac=0.05, brightness=0.1, contrast=0.1)
    x = torch.randn(5, 3, 8, 8)
    whole = augment(x, aug, torch.Generator().manual_seed(3))
    for rows in (slice(0, 3), slice(3, 5)):
        part = augment(x[rows], aug, torch.Generator().manual_seed(3), global_n=5, rows=rows)
        assert torch.allclose(part, whole[rows], atol=1e-6)


# ----------------------------------------------------------------------------- 2 processes, gloo


@pytest.fixture(scope="module")
def split_path(synth_category, tmp_path_factory) -> Path:
    from pipeline.data.mvtec import scan_category
    from pipeline.data.split import make_split, write_split

    path = tmp_path_factory.mktemp("dist_cls") / "split.json"
    write_split(make_split(scan_category(synth_category), seed=0), path)
    return path


@pytest.mark.parametrize(
    "balance",
    [
        "none",  # plain mean loss: each rank's share is its image count
        "reweight",  # class-weighted mean: each rank's share is its sum of class weights (reduced per step)
    ],
)
def test_classifier_two_gloo_ranks_match_single_process(split_path, tmp_path, balance):
    env = {"CLS_OVERRIDES": json.dumps({**CLS_OVERRIDES, "longtail.balance": balance})}
    _launch(tmp_path, ["classifier", str(tmp_path / "one"), str(split_path)], nproc=1, env=env)
    _launch(tmp_path, ["classifier", str(tmp_path / "two"), str(split_path)], nproc=2, env=env)
    r0, r1 = _state(tmp_path / "two_ranks" / "rank0.pt"), _state(tmp_path / "two_ranks" / "rank1.pt")
    assert _max_diff(r0, r1) == 0.0  # replicas identical
    single = _state(tmp_path / "one_ranks" / "rank0.pt")
    assert _max_diff(single, r0) <= WEIGHT_ATOL
    frozen = [k for k in single if k.startswith(("stem.", "layer"))]
    trained = [k for k in single if k.startswith(("extras.", "head."))]
    assert frozen and trained
    # rank 0 alone wrote the run folder; metrics equal the single-process run's
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m1["world_size"] == 1 and m2["world_size"] == 2
    _close(_stable(m1), _stable(m2))
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())
    h2 = json.loads((tmp_path / "two" / "history.json").read_text())
    _close(_stable(h1), _stable(h2))
    assert h1[-1]["train_loss"] < h1[0]["train_loss"] + 1.0  # trained, finite
    assert len((tmp_path / "two" / "log.txt").read_text().splitlines()) == len(
        (tmp_path / "one" / "log.txt").read_text().splitlines()
    )


@pytest.fixture(scope="module")
def ann(synth_category, tmp_path_factory) -> Path:
    from pipeline.data.convert import convert_category

    out = tmp_path_factory.mktemp("dist_sam") / "ann"
    convert_category(synth_category, out)
    return out


def _sam_config(ann: Path, tmp: Path) -> dict:
    return dict(
        train_records=str(ann / "sam" / "train.jsonl"),
        val_records=str(ann / "sam" / "val.jsonl"),
        model_type="tiny",
        epochs=2,
        lr=1e-3,
        cache_dir=str(tmp / "cache"),
        device="cpu",
        images_per_step=2,
        box_jitter_px=2.0,
    )


@pytest.fixture(scope="module")
def sam_runs(ann, tmp_path_factory) -> Path:
    """The same SAM decoder run, single process (``one``) and 2 gloo ranks (``two``)."""
    tmp = tmp_path_factory.mktemp("sam_runs")
    env = {"SAM_CONFIG": json.dumps(_sam_config(ann, tmp))}
    _launch(tmp, ["sam", str(tmp / "one"), str(ann)], nproc=1, env=env)
    _launch(tmp, ["sam", str(tmp / "two"), str(ann)], nproc=2, env=env)
    return tmp


def test_sam_decoder_two_gloo_ranks_match_single_process(sam_runs):
    tmp_path = sam_runs
    r0, r1 = _state(tmp_path / "two_ranks" / "rank0.pt"), _state(tmp_path / "two_ranks" / "rank1.pt")
    assert _max_diff(r0, r1) == 0.0
    single = _state(tmp_path / "one_ranks" / "rank0.pt")
    assert _max_diff(single, r0) <= WEIGHT_ATOL
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["world_size"] == 2
    _close(_stable(m1), _stable(m2))
    assert not (tmp_path / "two_ranks" / "rank2.pt").exists()


def test_sam_resume_after_restart_under_two_ranks(ann, sam_runs, tmp_path):
    """A 2-rank run stopped after epoch 1 and restarted with ``resume`` ends where an uninterrupted one does."""
    env = {"SAM_CONFIG": json.dumps(_sam_config(ann, sam_runs))}
    _launch(tmp_path, ["sam", str(tmp_path / "part"), str(ann)], nproc=2, env={**env, "SAM_STOP_AT": "2"}, ok=False)
    from pipeline.models.sam.model import read_finetuned

    assert read_finetuned(tmp_path / "part" / "last.pt")["epoch"] == 1
    _launch(tmp_path, ["sam", str(tmp_path / "part"), str(ann)], nproc=2, env={**env, "SAM_RESUME": "1"})
    full, part = _state(sam_runs / "two_ranks" / "rank0.pt"), _state(tmp_path / "part_ranks" / "rank0.pt")
    assert _max_diff(full, part) <= WEIGHT_ATOL
    hist = json.loads((tmp_path / "part" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1, 2]


# ----------------------------------------------------------------------------- GPU check script


def test_gpu_check_dry_run_prints_the_table():
    """``scripts/gpu_check.sh --dry-run``: the CUDA benchmark's code on CPU, tiny models, 2 steps."""
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        ["bash", str(root / "scripts" / "gpu_check.sh"), "--dry-run"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=240,
        env={**env, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:2] == ["trainer", "size"] and {"img/s", "data s/step", "compute s/step", "peak MiB"} <= set(header)
    rows = {
        tuple(c.strip() for c in ln.strip("|").split("|"))[0]: [c.strip() for c in ln.strip("|").split("|")]
        for ln in lines[2:]
    }
    assert set(rows) == {"classifier", "sam-encoder", "sam-decoder", "anomaly"}
    for cells in rows.values():
        assert cells[1] == "tiny" and cells[3] == "cpu" and float(cells[header.index("img/s")]) > 0
        assert cells[header.index("peak MiB")] == "-"  # no CUDA memory on CPU


def test_patchcore_features_split_over_two_ranks_give_the_single_process_bank(synth_category, tmp_path):
    from pipeline.models import backbones

    if backbones.available().get("efficientnet_lite0") is None:
        pytest.skip("efficientnet_lite0 weights package not installed")
    import numpy as np

    from pipeline.models.anomaly.patchcore import PatchCoreConfig, fit_patchcore

    cfg = PatchCoreConfig(backbone="efficientnet_lite0", image_size=64, coreset_ratio=0.1, batch_size=4)
    torch.set_num_threads(1)
    single = fit_patchcore(sorted((synth_category / "train" / "good").glob("*.png")), cfg, device="cpu").memory_bank
    _launch(tmp_path, ["anomaly", str(tmp_path / "two"), str(synth_category)], nproc=2, env={})
    bank = np.load(tmp_path / "two_ranks" / "bank.npy")
    assert bank.shape == single.shape
    assert np.allclose(bank, single, atol=1e-5)
