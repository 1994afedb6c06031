"""RunDir: the create / --force / --resume rules, and --force that keeps the user's files."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_json, json_dumps
from pipeline.core.runs import MANIFEST, RunDir


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"bare {name} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_new_run_writes_config_log_metrics_and_manifest(tmp_path):
    with RunDir.open(tmp_path / "run", kind="demo") as run:
        run.write_config({"lr": 0.1, "size_hw": (2, 3)})
        run.log("epoch 1", echo=False)
        run.write_metrics({"loss": float("nan"), "acc": 0.5})
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == sorted([MANIFEST, "config.yaml", "log.txt", "metrics.json"])
    assert _strict((tmp_path / "run" / "metrics.json").read_text()) == {"loss": None, "acc": 0.5}
    assert json.loads((tmp_path / "run" / MANIFEST).read_text()) == {
        "kind": "demo",
        "files": ["config.yaml", "log.txt", "metrics.json"],
    }


def test_existing_folder_needs_force_and_force_keeps_the_users_files(tmp_path):
    out = tmp_path / "run"
    with RunDir.open(out, kind="demo") as run:
        run.write_metrics({"a": 1})
        (out / "weights").mkdir()
        (out / "weights" / "last.pt").write_bytes(b"x")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="--force"):
        RunDir.open(out, kind="demo")
    with pytest.raises(PipelineError, match="holds a demo run"):
        RunDir.open(out, kind="other", force=True)
    with RunDir.open(out, kind="demo", force=True) as run:
        assert run.kept == ["notes.txt"]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


def test_force_refuses_a_folder_no_pipeline_command_wrote(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(PipelineError, match="not a folder a pipeline command wrote"):
        RunDir.open(tmp_path / "mine", kind="demo", force=True)


def test_resume_rules(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(PipelineError, match="either --resume or --force"):
        RunDir.open(out, kind="demo", force=True, resume=True, resume_file="last.pt")
    with pytest.raises(PipelineError, match="nothing to resume.*--force"):
        RunDir.open(out, kind="demo", resume=True, resume_file="last.pt")
    with RunDir.open(out, kind="demo", resume_file="last.pt") as run:
        (run / "last.pt").write_bytes(b"1")
    with RunDir.open(out, kind="demo", resume=True, resume_file="last.pt") as run:
        assert run.kept == []
        (run / "more.txt").write_text("2")
    assert json.loads((out / MANIFEST).read_text())["files"] == ["last.pt", "more.txt"]


def test_discard_removes_only_what_the_run_wrote(tmp_path):
    run = RunDir.open(tmp_path / "new", kind="demo").start()
    (run / "partial.txt").write_text("x")
    run.discard()
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("k")
    (tmp_path / "old" / "config.yaml").write_text("a: 1\n")
    run = RunDir.open(tmp_path / "old", kind="demo", force=True).start()
    assert run.kept == [] and not (tmp_path / "old" / "keep.txt").exists()  # no manifest: a legacy run, replaced whole
    (run / "partial.txt").write_text("x")
    run.discard()
    assert not (tmp_path / "old" / "partial.txt").exists()


@pytest.mark.parametrize(
    "obj, text",
    [
        # NaN and infinities are not JSON (RFC 8259): they become null, at any depth
        ({"a": float("nan"), "b": [float("inf"), -math.inf, 1.5]}, '{"a": null, "b": [null, null, 1.5]}'),
        # numpy scalars and arrays become numbers and lists
        ({"x": __import__("numpy").float32(0.5), "y": __import__("numpy").arange(3)}, '{"x": 0.5, "y": [0, 1, 2]}'),
        # tuples become lists, keys strings
        ({1: (1, 2)}, '{"1": [1, 2]}'),
    ],
)
def test_json_writer_is_strict(tmp_path, obj, text):
    assert json_dumps(obj, indent=None) == text
    atomic_write_json(tmp_path / "m.json", obj)
    assert _strict((tmp_path / "m.json").read_text()) == json.loads(text)


def test_ctrl_c_before_a_checkpoint_leaves_nothing_and_after_one_keeps_the_run(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with RunDir.open(tmp_path / "a", kind="demo", resume_file="last.pt") as run:
            run.write_config({"x": 1})
            raise KeyboardInterrupt
    assert not (tmp_path / "a").exists()
    with pytest.raises(KeyboardInterrupt):
        with RunDir.open(tmp_path / "b", kind="demo", resume_file="last.pt") as run:
            (run / "last.pt").write_bytes(b"1")
            raise KeyboardInterrupt
    assert json.loads((tmp_path / "b" / MANIFEST).read_text())["files"] == ["last.pt"]


def test_a_folder_no_pipeline_command_wrote_is_never_offered_force(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(PipelineError) as exc:
        RunDir.open(tmp_path / "mine", kind="demo")
    assert "no pipeline command wrote it (choose another --out)" in str(exc.value) and "--force" not in str(exc.value)
