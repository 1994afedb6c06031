"""The layout's rules, checked by parsing every module (imports inside functions count too).

- no import cycle between modules of ``pipeline``;
- stages point one way: ``core`` imports no other stage; ``data`` only ``core``; ``evaluation`` and
  ``review`` never ``models``; ``cli`` and ``inspection`` sit on top, nothing imports them;
- a model family (``models/<family>/``) never imports another family;
- each heavy library stays in the folders that own it, and ``cli/``, ``core/``, ``data/``,
  ``evaluation/``, ``review/`` import none of them at module level (``pipeline --help`` stays instant);
- no module is over 600 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pipeline"
FAMILIES = ("yolo", "sam", "classifier", "anomaly")
MAX_LINES = 600
HEAVY = (
    "torch",
    "torchvision",
    "ultralytics",
    "segment_anything",
    "faiss",
    "label_studio_sdk",
    "cv2",
    "pycocotools",
    "matplotlib",
)
# a library and the folders that may import it at all
OWNERS = {
    "ultralytics": ("models/yolo",),
    "segment_anything": ("models/sam",),
    "label_studio_sdk": ("review",),
    "faiss": ("models/anomaly",),
}
# what each stage may import from pipeline (besides itself)
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "models": {"core", "data", "evaluation"},
    "evaluation": {"core", "data"},
    "review": {"core", "data"},
    "inspection": {"core", "data", "models", "evaluation", "review"},
    "cli": {"core", "data", "models", "evaluation", "review", "inspection"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()
assert len(MODULES) > 30, f"found only {len(MODULES)} modules under {PKG}: the rules would check nothing"


def _resolve(name: str) -> str | None:
    """The pipeline module an imported name lives in (``pipeline.a.b.func`` -> ``pipeline.a.b``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Absolute names imported by a module (``from a import b`` gives ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import (use absolute pipeline.* imports)"
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _graph() -> dict[str, set[str]]:
    graph = {}
    for mod, path in MODULES.items():
        deps = {_resolve(n) for n in _imports(path) if n.startswith("pipeline")}
        deps.discard(None)
        deps.discard(mod)
        # importing pipeline.a.b runs pipeline/a/__init__.py: a package's __init__ is not an edge back
        graph[mod] = {d for d in deps if not mod.startswith(d + ".")}
    return graph


def _stage(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def _family(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[2] if len(parts) > 3 and parts[1] == "models" and parts[2] in FAMILIES else None


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_stages_import_in_one_direction():
    bad = []
    for mod, deps in _graph().items():
        stage = _stage(mod)
        if stage not in ALLOWED:
            continue
        for d in deps:
            other = _stage(d)
            if other and other != stage and other not in ALLOWED[stage]:
                bad.append(f"{mod} imports {d}")
    assert not bad, "\n".join(bad)


def test_model_families_do_not_import_each_other():
    bad = []
    for mod, deps in _graph().items():
        fam = _family(mod)
        for d in deps:
            other = _family(d)
            if fam and other and other != fam:
                bad.append(f"{mod} imports {d}")
    assert not bad, "\n".join(bad)


def test_heavy_libraries_only_where_they_belong():
    bad = []
    for path in MODULES.values():
        rel = path.relative_to(PKG).as_posix()
        for name in _imports(path):
            lib = name.split(".")[0]
            owners = OWNERS.get(lib)
            if owners and not rel.startswith(tuple(o + "/" for o in owners)):
                bad.append(f"{rel} imports {name}")
    assert not bad, "\n".join(bad)


def test_light_stages_import_no_heavy_library_at_module_level():
    bad = []
    for mod, path in MODULES.items():
        if _stage(mod) in ("cli", "core", "data", "evaluation", "review") or mod == "pipeline":
            top = {n.split(".")[0] for n in _imports(path, top_level_only=True)}
            bad += [f"{path.relative_to(PKG)} imports {lib} at module level" for lib in sorted(top & set(HEAVY))]
    assert not bad, "\n".join(bad)


def test_no_module_over_600_lines():
    long = {str(p.relative_to(PKG)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_rules_see_function_level_imports(tmp_path):
    """The parser counts imports inside functions (they hide cycles, they do not remove them)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from pipeline.models.yolo import train\n    import torch\n")
    assert {"pipeline.models.yolo", "pipeline.models.yolo.train", "torch"} <= _imports(f)
    assert "torch" not in _imports(f, top_level_only=True)
