"""Hub loading through the real huggingface_hub client against a local HTTP server (no network, no mocks)."""
import os
import subprocess
import sys
import textwrap

import pytest

from _local_hub import local_hub

REPO = "facebook/SSDD"
COMMITS = {"main": "a" * 40, "v1": "b" * 40}


@pytest.fixture(scope="module")
def hub(make_checkpoint):
    """Serve two revisions of a fake facebook/SSDD on 127.0.0.1: main holds the S test weights, v1 other ones."""
    files = {("main", "F8C4/F8C4_S_256.safetensors"): make_checkpoint("f8c4", "S", 0).read_bytes(),
             ("v1", "F8C4/F8C4_S_256.safetensors"): make_checkpoint("f8c4", "S", 1).read_bytes()}

    with local_hub(files, COMMITS, REPO) as endpoint:
        yield endpoint


def run(code, **env):
    """Run in a fresh interpreter: huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE at import time."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | env
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                          text=True, timeout=300)


LOAD = """
    import torch
    from ssdd_runtime import SSDD
    from ssdd_runtime.testing import test_tensor
    m = SSDD.from_pretrained("facebook/SSDD", "F8C4/F8C4_S_256.safetensors", revision={revision!r})
    key = "decoder.conv_out.weight"
    seed = [s for s in (0, 1) if torch.equal(m.state_dict()[key], test_tensor(key, (3, 64, 3, 3), s))]
    print("OK", m.decoder_config.size, "seed", seed, m.checkpoint)
"""


def test_download_fill_cache_then_load_offline(hub, tmp_path):
    home = str(tmp_path / "hf")
    online = run(LOAD.format(revision=None), HF_ENDPOINT=hub, HF_HOME=home)
    assert online.returncode == 0, online.stderr
    assert "OK S seed [0]" in online.stdout and COMMITS["main"] in online.stdout
    tagged = run(LOAD.format(revision="v1"), HF_ENDPOINT=hub, HF_HOME=home)
    assert "OK S seed [1]" in tagged.stdout, tagged.stderr

    # Offline: both revisions come from the cache; the server is not asked (endpoint points nowhere).
    for revision, seed in ((None, 0), ("v1", 1)):
        offline = run(LOAD.format(revision=revision), HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=home,
                      HF_HUB_OFFLINE="1")
        assert f"OK S seed [{seed}]" in offline.stdout, offline.stderr


def test_offline_with_empty_cache_names_the_file_and_the_fix(tmp_path):
    res = run(LOAD.format(revision=None), HF_HOME=str(tmp_path / "empty"), HF_HUB_OFFLINE="1")
    assert res.returncode != 0
    assert "FileNotFoundError: facebook/SSDD/F8C4/F8C4_S_256.safetensors is not in the Hugging Face cache" in res.stderr
    assert "offline mode is on" in res.stderr and "hf download facebook/SSDD F8C4/F8C4_S_256.safetensors" in res.stderr


def test_unknown_file_and_revision(hub, tmp_path):
    code = """
        from ssdd_runtime import SSDD
        for args in [("nope.safetensors", None), ("F8C4/F8C4_S_256.safetensors", "v9")]:
            try:
                SSDD.from_pretrained("facebook/SSDD", args[0], revision=args[1])
            except FileNotFoundError as e:
                print("ERR", e)
    """
    res = run(code, HF_ENDPOINT=hub, HF_HOME=str(tmp_path / "hf"))
    assert "ERR facebook/SSDD/nope.safetensors does not exist" in res.stdout, res.stderr
    assert "ERR revision 'v9' not found" in res.stdout, res.stderr


def test_repo_without_filename_lists_known_files():
    from ssdd_runtime import SSDD

    with pytest.raises(ValueError, match="needs filename=.*demo_f8c4_M_128.safetensors"):
        SSDD.from_pretrained("facebook/SSDD")
