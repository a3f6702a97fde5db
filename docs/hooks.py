"""MkDocs hook: lay out the package as it installs, for mkdocstrings.

setup.py's `package_dir` installs kernels/, export/ and benchmarks/ as ssdd_runtime.kernels/.export/.benchmarks,
which a static reader of the source tree cannot see. This hook copies the sources into
`build/docs-src/ssdd_runtime` following setup.py's own PACKAGES table (copies, not links: griffe resolves links
back to the source tree), and mkdocstrings reads the API from there.
"""
import ast
import shutil
from pathlib import Path

from mkdocs.plugins import event_priority


def _packages(setup_py: Path) -> dict[str, str]:
    for node in ast.walk(ast.parse(setup_py.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PACKAGES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError(f"no PACKAGES table in {setup_py}")


@event_priority(100)  # before mkdocstrings' on_config: a first build (no copy yet) failed when the copy came later
def on_config(config):
    root = Path(config.config_file_path).parent
    out = root / "build" / "docs-src"
    shutil.rmtree(out, ignore_errors=True)
    for name, folder in sorted(_packages(root / "setup.py").items()):
        target = out.joinpath(*name.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for item in (root / folder).iterdir():
            if item.suffix == ".py" or item.suffix == ".pyi":
                shutil.copy2(item, target / item.name)
    return config
