"""The data flow of design.md: model modules do not import each other; heavy libraries stay in theirs."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pipeline"
MODEL_MODULES = {"detection", "segmentation", "classification", "anomaly"}
# a heavy library and the modules allowed to import it
OWNERS = {
    "ultralytics": {"detection"},
    "segment_anything": {"segmentation", "sam_model", "sam_train"},
    "label_studio_sdk": {"labelstudio_client"},
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


def test_model_modules_do_not_import_each_other():
    for mod in MODEL_MODULES:
        path = PKG / f"{mod}.py"
        if not path.exists():
            continue
        others = {f"pipeline.{m}" for m in MODEL_MODULES - {mod}}
        assert not (_imports(path) & others), f"{mod} imports {_imports(path) & others}"


def test_heavy_libraries_only_in_their_module():
    for path in PKG.glob("*.py"):
        for lib, owners in OWNERS.items():
            if path.stem not in owners:
                assert not any(i == lib or i.startswith(lib + ".") for i in _imports(path)), f"{path.name} imports {lib}"


def test_cli_imports_nothing_heavy_at_module_level():
    heavy = {"torch", "torchvision", "cv2", "ultralytics", "segment_anything", "pycocotools", "matplotlib", "faiss"}
    assert not (_module_level_imports(PKG / "cli.py") & heavy)
