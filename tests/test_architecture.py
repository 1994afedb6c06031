"""The data flow of design.md: model modules do not import each other; heavy libraries stay in theirs."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pipeline"
FAMILIES = {"yolo", "sam", "classifier", "anomaly"}
# a heavy library and the folders allowed to import it
OWNERS = {
    "ultralytics": {"models/yolo"},
    "segment_anything": {"models/sam"},
    "label_studio_sdk": {"review"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _module_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_model_families_do_not_import_each_other():
    for fam in FAMILIES:
        others = tuple(f"pipeline.models.{m}" for m in FAMILIES - {fam})
        for path in (PKG / "models" / fam).glob("*.py"):
            bad = {i for i in _imports(path) if i.startswith(others)}
            assert not bad, f"{path} imports {bad}"


def test_heavy_libraries_only_in_their_module():
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).as_posix()
        for lib, owners in OWNERS.items():
            if not any(rel.startswith(o + "/") for o in owners):
                assert not any(i == lib or i.startswith(lib + ".") for i in _imports(path)), f"{rel} imports {lib}"


def test_cli_imports_nothing_heavy_at_module_level():
    heavy = {"torch", "torchvision", "cv2", "ultralytics", "segment_anything", "pycocotools", "matplotlib", "faiss"}
    assert not (_module_level_imports(PKG / "cli" / "app.py") & heavy)
