"""The runtime never imports the training stack: proven in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("torch", "transformers", "optimum", "sentence_transformers", "bge_onnx_export", "onnx", "onnxscript")

_SCRIPT = """
import json, sys
import bge_onnx, bge_onnx.cli
embedder = bge_onnx.Embedder(sys.argv[1], device="cpu")
embedder.encode(["torch-free"]); embedder.encode_queries("q")
bge_onnx.Reranker(sys.argv[2], device="cpu").rerank("q", ["a", "b"])
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_runtime_loads_no_training_stack(exported):
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(exported["bert-cls"]), str(exported["xlmr-rerank"])],
        capture_output=True, text=True, timeout=120, check=True,
    )
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "onnxruntime" in loaded and "tokenizers" in loaded  # the check itself sees real imports
    assert loaded.isdisjoint(FORBIDDEN), sorted(loaded & set(FORBIDDEN))
    # a local folder needs no hub client either: it is imported only for repo ids
    assert "huggingface_hub" not in loaded


def test_graph_rewrites_load_without_torch():
    # fusions, pooling, first-token cut and quantisation need no torch: a torch-free caller can import them
    script = (
        "import json, sys; import bge_onnx_export.rewrite, bge_onnx_export.precision, bge_onnx_export.probes; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "onnx" in loaded and "bge_onnx_export" in loaded
    assert loaded.isdisjoint({"torch", "transformers", "optimum"}), sorted(loaded & {"torch", "transformers"})



def test_nothing_below_the_command_line_imports_it():
    """Arrows point down: only __main__ imports bge_onnx.cli (the adapters and files.py once did, for install_hint)."""
    import ast
    from pathlib import Path

    import bge_onnx

    def imported(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        if isinstance(node, ast.ImportFrom):
            base = "bge_onnx." * bool(node.level) + (node.module or "")
            return [base.rstrip(".")] + [f"{base}.{alias.name}".replace("..", ".") for alias in node.names]
        return []

    importers = {path.name for path in Path(bge_onnx.__file__).parent.rglob("*.py")
                 for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if "bge_onnx.cli" in imported(node)}
    assert importers == {"__main__.py"}


def test_nothing_below_the_package_root_imports_it():
    """Arrows point down: a module inside bge_onnx takes what it needs from the module that defines it (the version
    from _version.py), never from the package root, which imports them all."""
    import ast
    from pathlib import Path

    import bge_onnx

    root = Path(bge_onnx.__file__).parent
    submodules = {p.stem for p in root.glob("*.py")} | {p.name for p in root.iterdir() if p.is_dir()}
    offenders = []
    for path in root.rglob("*.py"):
        if path.parent == root and path.name in ("__init__.py", "__main__.py"):
            continue
        depth = len(path.relative_to(root).parts)  # 1 in bge_onnx/, 2 in bge_onnx/serve/
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            to_root = isinstance(node, ast.ImportFrom) and (
                (node.level == depth and node.module is None) or (node.level == 0 and node.module == "bge_onnx"))
            if to_root:
                offenders += [f"{path.relative_to(root)}: {alias.name}" for alias in node.names
                              if alias.name not in submodules]
    assert offenders == []
