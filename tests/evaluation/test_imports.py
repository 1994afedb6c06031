"""The import rules of evaluation/: no cycles (imports inside functions count), no model imports,
no heavy library at module level."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "pipeline"
EVAL = PKG / "evaluation"
HEAVY = {"torch", "torchvision", "cv2", "ultralytics", "segment_anything", "pycocotools", "matplotlib", "faiss"}


def _imports(path: Path, *, top_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _graph() -> dict[str, set[str]]:
    mods = {f"pipeline.evaluation.{p.stem}": p for p in EVAL.glob("*.py") if p.stem != "__init__"}
    return {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}


def test_no_import_cycle_inside_evaluation():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m, path):
        if state.get(m) == 1:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(m) :], m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in sorted(graph[m]):
            visit(n, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


@pytest.mark.parametrize("path", sorted(EVAL.glob("*.py")), ids=lambda p: p.name)
def test_evaluation_reads_files_never_models_and_imports_heavy_libraries_late(path):
    assert not {i for i in _imports(path) if i.startswith("pipeline.models")}, f"{path.name} imports a model"
    assert not {i.split(".")[0] for i in _imports(path, top_only=True)} & HEAVY, f"{path.name}: heavy top-level import"
