"""The documentation site: it builds strictly, every page is in the navigation, and every example runs.

Examples are found by mktestdocs. A page's ```bash blocks run first, each in `bash -e -u -o pipefail` (they
make files, such as latents folders, that Python examples read), then its ```python blocks, in order, in one
fresh interpreter (later blocks use earlier names). They run in a scratch folder that
holds what the examples name, so they run as printed:
- test weights under the release's file names (`F8C4_M_256.safetensors` ...): the S decoder size, to keep the
  examples fast; loading reads the architecture from the tensor shapes, never from the name;
- a local Hugging Face Hub on 127.0.0.1 (HF_ENDPOINT) serving those files as `facebook/SSDD`;
- small images (`cat.png`, `photos/`, an ImageFolder `train/`) cut from the bundled sample.
A block that cannot run here says so in its title, `title="Not run by the tests: <reason>"`, which the site
shows above the block; test_every_code_block_runs_or_says_why checks that no other block escapes.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _local_hub import local_hub

mktestdocs = pytest.importorskip("mktestdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
NOT_RUN = 'title="Not run by the tests: '
FENCE = re.compile(r"^\s*```(.*)$")


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _blocks(page: Path, lang: str) -> list[str]:
    return mktestdocs.grab_code_blocks(page.read_text(encoding="utf-8"), lang=lang)


RUNNABLE = [p for p in PAGES if _blocks(p, "python") or _blocks(p, "bash")]


def test_every_code_block_runs_or_says_why():
    """Code fences: python/bash run here (or `python exec="on"` when the site builds); any other python or
    shell fence must carry the not-run title with a reason; other languages (text, json, yaml) are not code."""
    shell_like = {"python", "py", "bash", "sh", "shell", "console", "pycon", "zsh"}
    bad = []
    for page in PAGES:
        opening = True
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            m = FENCE.match(line)
            if not m:
                continue
            if opening:
                info = m.group(1).strip()
                lang, _, rest = info.partition(" ")
                ok = (info in ("python", "bash", 'python exec="on"') or lang not in shell_like
                      or (lang in ("python", "bash") and rest.startswith(NOT_RUN) and len(rest) > len(NOT_RUN) + 5))
                if not ok:
                    bad.append(f"{_name(page)}:{n}: ```{info}")
            opening = not opening
    assert not bad, "code blocks neither run by the tests nor titled 'Not run by the tests: <reason>':\n" + \
        "\n".join(bad)
    assert RUNNABLE, "no runnable example found"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, make_checkpoint):
    """The folder the examples run in (copied per page) and their environment, with the local Hub up."""
    from PIL import Image

    base = tmp_path_factory.mktemp("docs-examples")
    weights = base / "F8C4_M_256.safetensors"
    shutil.copy(make_checkpoint("f8c4", "S", 0), weights)
    sample = Image.open(ROOT / "ssdd_runtime" / "assets" / "sample.png").convert("RGB")
    w, h = sample.size

    def crop(i, size=64):
        x, y = (i * 97) % (w - size), (i * 53) % (h - size)
        return sample.crop((x, y, x + size, y + size))

    crop(0).save(base / "cat.png")
    for folder, names in {"photos": ["p1.png", "p2.png"], "train/cat": ["c1.png", "c2.png"],
                          "train/dog": ["d1.png"], "imagenet_val_subset": ["i1.png", "i2.png", "i3.png"]}.items():
        (base / folder).mkdir(parents=True)
        for i, name in enumerate(names, 1):
            crop(i + len(folder)).save(base / folder / name)
    decoder_only = tmp_path_factory.mktemp("sdvae") / "SDVAE_M_256.safetensors"
    from safetensors.torch import save_file

    from ssdd_runtime.testing import test_state_dict

    save_file(test_state_dict(None, "S", 0), str(decoder_only), metadata={"format": "pt"})
    files = {("main", "F8C4/F8C4_M_256.safetensors"): weights.read_bytes(),
             ("main", "SDVAE/SDVAE_M_256.safetensors"): decoder_only.read_bytes()}
    with local_hub(files, {"main": "c" * 40}) as endpoint:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path_factory.mktemp("hf-home")),
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                   MPLBACKEND="Agg", PYTHONUNBUFFERED="1",
                   XDG_CACHE_HOME=str(tmp_path_factory.mktemp("xdg-cache")))
        env.pop("TRITON_INTERPRET", None)
        yield base, env


@pytest.mark.parametrize("page", RUNNABLE, ids=_name)
def test_examples_run(page, scratch, tmp_path):
    base, env = scratch
    cwd = tmp_path / "work"
    shutil.copytree(base, cwd)
    for i, block in enumerate(_blocks(page, "bash"), 1):
        res = subprocess.run(["bash", "-e", "-u", "-o", "pipefail", "-c", block], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, (f"{_name(page)}: bash block {i} failed\n{block}\n"
                                     f"{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    python = _blocks(page, "python")
    if python:
        script = cwd / "examples.py"
        script.write_text("\n\n".join(python), encoding="utf-8")
        res = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, f"{_name(page)}: python examples failed\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"


def test_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: a broken link, a page missing from the navigation, an unresolved API reference
    or a failing generated block fails the build. Then the generated parts are checked in the HTML."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    site = tmp_path / "site"
    shutil.rmtree(ROOT / "build" / "docs-src", ignore_errors=True)  # as in a fresh clone: the hook lays it out first
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "is not included in the \"nav\"" not in res.stderr, res.stderr
    for page in (ROOT / "docs").rglob("*.md"):
        rel = page.relative_to(ROOT / "docs").with_suffix("")
        html = site / ("index.html" if rel.name == "index" else rel / "index.html")
        assert html.exists(), f"{page} was not built"
    from ssdd_runtime.cli import build_parser

    cli = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name in commands:
        assert f"ssdd {name}</code>" in cli, f"CLI reference lacks `ssdd {name}`"
    bench = (site / "evidence" / "benchmarks" / "index.html").read_text(encoding="utf-8")
    for result in (ROOT / "benchmarks" / "results").glob("*.json"):
        assert result.name in bench, f"benchmark page does not cite {result.name}"
    api = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    assert 'id="ssdd_runtime.SSDD.decode"' in api and "doc-signature" in api
