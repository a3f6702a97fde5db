"""MkDocs hook: lay out the package as it installs, for mkdocstrings.

setup.py's `package_dir` installs kernels/, export/ and benchmarks/ as ssdd_runtime.kernels/.export/.benchmarks,
which a static reader of the source tree cannot see. This hook copies the sources into
`build/docs-src/ssdd_runtime` following setup.py's own PACKAGES table (copies, not links: griffe resolves links
back to the source tree), and mkdocstrings reads the API from there.
"""
import ast
import shutil
import sys
from pathlib import Path


def _packages(setup_py: Path) -> dict[str, str]:
    for node in ast.walk(ast.parse(setup_py.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PACKAGES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError(f"no PACKAGES table in {setup_py}")


def on_config(config):
    root = Path(config.config_file_path).parent
    # `python -m mkdocs` from the repository root puts the root on sys.path, and mkdocstrings searches sys.path
    # too: griffe then also sees the source-tree ssdd_runtime/, which has no export/kernels/benchmarks
    # subpackages, and `ssdd_runtime.export.onnx` "could not be found" (griffelib 2.4). Only the laid-out copy
    # may be visible.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root.resolve()]
    out = root / "build" / "docs-src"
    shutil.rmtree(out, ignore_errors=True)
    for name, folder in sorted(_packages(root / "setup.py").items()):
        target = out.joinpath(*name.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for item in (root / folder).iterdir():
            if item.suffix == ".py" or item.suffix == ".pyi":
                shutil.copy2(item, target / item.name)
    return config
