"""Issue 10: whatever the input or fault, `ssdd` prints one line on stderr and exits 2, writes nothing half-way,
never writes outside -o or over an input, and a NaN never leaves silently.

CLI cases run in subprocesses through `DRIVER`: one Python process that calls `ssdd_runtime.cli.main` once per
argv (as `ssdd` does) and reports each exit status, stdout and stderr; an exception escaping `main` is recorded as
status 1 with its traceback, which is exactly what the checks forbid. Grouping cases keeps the file fast on a
small CPU. A full disk is an RLIMIT_FSIZE cap; interruptions are real signals sent to the process; an audit hook
in the child records every file opened for writing and every rename, so the tests can check that final names only
ever appear through a rename.
"""
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssdd_runtime import io

PNG_SIG = b"\x89PNG\r\n\x1a\n"

# Runs [argv, fsize] cases through cli.main in one process (as `ssdd` does: exit status = main's return) and prints
# one JSON line [[rc, out, err], ...]; fsize, when not null, caps the size of any file written during that case
# (RLIMIT_FSIZE: Python ignores SIGXFSZ, so writes beyond it fail with EFBIG, like a full disk). With $SSDD_AUDIT
# set, an audit hook logs every file opened for writing and every rename there, one JSON line per event.
DRIVER = r"""
import contextlib, io, json, os, resource, signal, sys, traceback
# as in an interactive shell, whatever this test process inherited: a shell that starts pytest in the background
# without job control leaves SIGINT ignored, and Python then never raises KeyboardInterrupt for it
signal.signal(signal.SIGINT, signal.default_int_handler)
if os.environ.get("SSDD_AUDIT"):
    log = open(os.environ["SSDD_AUDIT"], "a", buffering=1)
    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, os.PathLike)):
            mode, flags = args[1], args[2]
            writes = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writes:
                log.write(json.dumps(["open", os.path.abspath(os.fspath(args[0]))]) + "\n")
        elif event == "os.rename":
            src, dst = (os.path.abspath(os.fspath(a)) for a in args[:2])
            log.write(json.dumps(["rename", src, dst]) + "\n")
    sys.addaudithook(hook)
from ssdd_runtime.cli import main
results, rc = [], 0
for argv, fsize in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if fsize is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, hard))
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            rc = 1
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    results.append([rc, out.getvalue(), err.getvalue()])
    sys.__stderr__.write(err.getvalue())
print("RESULTS " + json.dumps(results))
sys.exit(rc)
"""


def _env(**extra):
    env = dict(os.environ)
    env.pop("SSDD_DEBUG", None)
    return {**env, **extra}


def _driver(cases, cwd, *, audit=None, popen=False, env=None):
    cmd = [sys.executable, "-c", DRIVER, json.dumps([c if isinstance(c[0], list) else [c, None] for c in cases])]
    env = _env(**({"SSDD_AUDIT": str(audit)} if audit else {}), **(env or {}))
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def _run_many(cases, cwd, *, audit=None):
    """Results [rc, stdout, stderr] of each case: an argv, or [argv, fsize]."""
    res = _driver(cases, cwd, audit=audit)
    line = next((l for l in res.stdout.splitlines()[::-1] if l.startswith("RESULTS ")), None)
    assert line is not None, res.stderr[-3000:]
    return json.loads(line[len("RESULTS "):])


def _assert_error(result, *fragments, cmd=None):
    """Exit 2, exactly one line on stderr, no traceback, each fragment in that line."""
    rc, out, err = result
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (cmd, rc, err)
    for f in fragments:
        assert f in lines[0], (cmd, f, lines[0])
    return lines[0]


def _png(path, size=(32, 32), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


def _bomb(path, w=30000, h=30000):
    """A PNG whose header claims w x h pixels: PIL refuses it at open (decompression bomb check)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    data = PNG_SIG + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    Path(path).write_bytes(data)
    return str(path)


def _complete_png(path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


def _leftovers(folder):
    """Temp files the atomic writer would leave behind had it not cleaned up."""
    return [p for p in Path(folder).rglob("*") if p.name.startswith(".") and ".tmp" in p.name]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, make_checkpoint):
    """A workspace: the test checkpoint, images a/x.png, b/x.png, photo.png, a 2-image latents file."""
    d = tmp_path_factory.mktemp("reliability")
    (d / "a").mkdir()
    (d / "b").mkdir()
    _png(d / "a" / "x.png", seed=1)
    _png(d / "b" / "x.png", seed=2)
    _png(d / "photo.png", seed=3)
    io.save_latents(d / "lat.pt", torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)),
                    {"names": ["cat", "dog"]})
    return d, ["--checkpoint", str(make_checkpoint("f8c4", "S", 0))]


# ---------------------------------------------------------------------------------------------------------
# Arguments and output paths: refused up front, one line, exit 2, nothing written


def test_bad_arguments_and_outputs_are_one_line_errors(ws):
    d, ck = ws
    (d / "afile").write_text("keep me")
    lat = str(d / "lat.pt")
    np.save(d / "int.npy", np.zeros((1, 4, 4, 4), np.int64))
    np.save(d / "bool.npy", np.zeros((1, 4, 4, 4), bool))
    np.save(d / "complex.npy", np.zeros((1, 4, 4, 4), np.complex64))
    np.save(d / "empty.npy", np.zeros((0, 4, 4, 4), np.float32))
    (d / "zero.pt").write_bytes(b"")
    torch.save({"latents": torch.zeros(1, 4, 4, 4), "evil": object()}, d / "pickle.pt")
    (d / "latdir.pt").mkdir(exist_ok=True)
    io.save_latents(d / "escape.pt", torch.zeros(2, 4, 4, 4), {"names": ["../escaped", "/tmp/ssdd-abs-escape"]})
    io.save_latents(d / "abs.pt", torch.zeros(1, 4, 4, 4), {"names": ["/tmp/ssdd-abs-escape"]})
    io.save_latents(d / "nul.pt", torch.zeros(2, 4, 4, 4), {"names": ["ok", "bad\0name"]})
    cases = {
        # OS errors on output
        ("decode", lat, "-o", "afile"): ["-o afile is a file, expected a folder"],
        ("reconstruct", "photo.png", "-o", "afile"): ["-o afile is a file, expected a folder"],
        ("encode", "photo.png", "-o", "nodir/x.pt"): ["output folder nodir does not exist"],
        ("encode", "photo.png", "-o", "a"): ["unknown file type"],
        ("encode", "photo.png", "-o", "adir.pt"): [],  # filled below: a folder with a latents suffix
        ("stats", "a", "-o", "a"): ["-o a is a folder, expected a file name"],
        ("export", "onnx", "-o", "a"): ["-o a is a folder, expected a file name"],
        ("export", "onnx", "-o", "nodir/m.onnx"): ["output folder nodir does not exist"],
        ("bench", "--quick", "--json", "a"): ["--json a is a folder"],
        ("bench", "--quick", "--csv", "nodir/r.csv"): ["output folder nodir does not exist"],
        # devices
        ("encode", "photo.png", "-o", "z.pt", "--device", "bogus"): ["unknown device 'bogus'"],
        ("reconstruct", "photo.png", "-o", "rec", "--device", "bogus"): ["unknown device 'bogus'"],
        ("bench", "--quick", "--device", "bogus"): ["unknown device 'bogus'"],
        # numbers
        ("encode", "photo.png", "-o", "z.pt", "--batch-size", "-1"): ["--batch-size", "integer >= 1", "'-1'"],
        ("decode", lat, "-o", "dec", "--batch-size", "-1"): ["--batch-size", "'-1'"],
        ("decode", lat, "-o", "dec", "--batch-size", "0"): ["--batch-size", "'0'"],
        ("decode", lat, "-o", "dec", "--steps", "0"): ["--steps", "1..10000"],
        ("decode", lat, "-o", "dec", "--steps", str(2 ** 62)): ["--steps", "1..10000"],
        ("decode", lat, "-o", "dec", "--seed", str(2 ** 70)): ["--seed", "0..2**64-1"],
        ("decode", lat, "-o", "dec", "--t-pow-shift", "nan"): ["--t-pow-shift", "positive finite"],
        ("export", "onnx", "-o", "m.onnx", "--t-pow-shift", "nan"): ["--t-pow-shift", "positive finite"],
        ("export", "onnx", "-o", "m.onnx", "--t-pow-shift", "-1"): ["--t-pow-shift", "positive finite"],
        ("tokenize", "a", "-o", "tok", "--batch-size", "0"): ["--batch-size", "'0'"],
        ("tokenize", "a", "-o", "afile"): ["-o afile is a file, expected a folder"],
        ("tokenize", "a", "-o", "tok", "--shard-size", "0"): ["--shard-size"],
        ("detokenize", "a", "-o", "detok", "--steps", "0"): ["--steps", "1..10000"],
        ("detokenize", lat, "-o", "detok"): ["is a file, expected the folder of shards"],
        # latents files
        ("decode", "int.npy", "-o", "dec"): ["latents must be floating point, got torch.int64"],
        ("decode", "bool.npy", "-o", "dec"): ["latents must be floating point, got torch.bool"],
        ("decode", "complex.npy", "-o", "dec"): ["latents must be floating point, got torch.complex64"],
        ("decode", "empty.npy", "-o", "dec"): ["no latents (shape (0, 4, 4, 4))"],
        ("decode", "zero.pt", "-o", "dec"): ["the file is empty (0 bytes)"],
        ("decode", "pickle.pt", "-o", "dec"): ["pickled Python objects"],
        ("decode", "latdir.pt", "-o", "dec"): ["latdir.pt is a folder, expected a latents file"],
        ("decode", "escape.pt", "-o", "dec"): ["'../escaped.png' would leave the output folder"],
        ("decode", "abs.pt", "-o", "dec"): ["'/tmp/ssdd-abs-escape.png' would leave the output folder"],
        ("decode", "nul.pt", "-o", "dec"): ["holds a NUL character"],
        # images
        ("encode", "a", "-o", "z.pt"): ["a is a folder, expected an image file"],
        ("encode", "bomb.png", "-o", "z.pt"): ["bomb.png is refused as a possible decompression bomb"],
        ("reconstruct", "photo.png", "bomb.png", "-o", "rec"): ["decompression bomb"],
        ("encode", "photo.png", "-o", "photo.png"): ["unknown file type '.png'"],
        ("stats", "a", "-o", "a/x.png"): ["is one of the inputs; refusing to overwrite it"],
    }
    (d / "adir.pt").mkdir(exist_ok=True)
    cases[("encode", "photo.png", "-o", "adir.pt")] = ["-o adir.pt is a folder, expected a file name"]
    if not torch.cuda.is_available():
        for cmd in (("encode", "photo.png", "-o", "z.pt"), ("reconstruct", "photo.png", "-o", "rec"), ("bench",)):
            cases[(*cmd, "--device", "cuda")] = ["device 'cuda' is not available here"]
    _bomb(d / "bomb.png")
    before = sorted(str(p) for p in d.rglob("*"))
    results = _run_many([[*c, *ck] if c[0] not in ("bench",) else list(c) for c in cases], cwd=d)
    for (cmd, fragments), result in zip(cases.items(), results):
        _assert_error(result, *fragments, cmd=cmd)
    after = sorted(str(p) for p in d.rglob("*"))
    created = set(after) - set(before)
    # Folders for -o may be created before work starts (empty); no file is written anywhere.
    assert all(Path(p).is_dir() and not any(Path(p).iterdir()) for p in created), created
    assert (d / "afile").read_text() == "keep me"
    assert not (d.parent / "escaped.png").exists() and not Path("/tmp/ssdd-abs-escape.png").exists()


def test_debug_shows_the_traceback(ws):
    d, ck = ws
    argv = ["encode", "photo.png", "-o", "nodir/x.pt", *ck]
    results = _run_many([["--debug", *argv], [*argv, "--debug"]], cwd=d)
    res = _driver([argv], d, env={"SSDD_DEBUG": "1"})
    results.append([res.returncode, res.stdout, res.stderr])
    for rc, out, err in results:
        assert rc == 1 and "Traceback" in err and "nodir does not exist" in err


def test_unwritable_output_folder(ws, monkeypatch, capsys):
    """As root (this CI) permissions are not enforced, so the check is exercised through os.access."""
    from ssdd_runtime.cli import main

    d, ck = ws
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p).name == "ro" else real(p, mode, **kw))
    (d / "ro").mkdir(exist_ok=True)
    assert main(["encode", str(d / "photo.png"), "-o", str(d / "ro" / "z.pt"), *ck]) == 2
    assert "is not writable" in capsys.readouterr().err
    assert main(["decode", str(d / "lat.pt"), "-o", str(d / "ro" / "sub"), *ck]) == 2
    assert "is not writable" in capsys.readouterr().err
    assert not any((d / "ro").iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_output_folder_for_real(ws):
    d, ck = ws
    ro = d / "ro_real"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o500)
    try:
        results = _run_many([["encode", "photo.png", "-o", "ro_real/z.pt", *ck]], cwd=d)
        _assert_error(results[0], "not writable")
    finally:
        ro.chmod(0o700)


# ---------------------------------------------------------------------------------------------------------
# Where outputs go: confined to -o, unique, never an input


def test_outputs_are_confined_unique_and_never_an_input(ws):
    d, ck = ws
    io.save_latents(d / "dup.pt", torch.zeros(3, 4, 4, 4), {"names": ["x", "x", "sub/y"]})
    photo_before = (d / "photo.png").read_bytes()
    cases = [["encode", "a/x.png", "b/x.png", "-o", "same.npy", *ck],
             ["decode", "dup.pt", "-o", "dup_out", *ck],
             ["reconstruct", "a/x.png", "b/x.png", "-o", "rec_same", *ck],
             ["reconstruct", "photo.png", "-o", ".", *ck]]
    results = _run_many(cases, cwd=d)
    for r in results:
        assert r[0] == 0 and "Traceback" not in r[2], r
    assert sorted(p.relative_to(d / "dup_out").as_posix() for p in (d / "dup_out").rglob("*.png")) == \
        ["sub/y.png", "x-1.png", "x.png"]
    assert sorted(p.name for p in (d / "rec_same").iterdir()) == ["x-1.png", "x.png"]
    assert "a/x.png: PSNR" in results[2][1] and "rec_same/x-1.png" in results[2][1]
    assert (d / "photo.png").read_bytes() == photo_before and _complete_png(d / "photo-1.png")
    # encode: the same stems get the same unique names, so a later decode writes both
    z, meta = io.load_latents(d / "same.npy")
    assert z.shape[0] == 2
    os.remove(d / "photo-1.png")


# ---------------------------------------------------------------------------------------------------------
# Faults while writing: disk full, SIGTERM / SIGINT


def test_disk_full_gives_one_line_and_no_partial_file(ws):
    """A full disk mid-write: one line, exit 2, no file left. A symlink to /dev/full at the output name (the
    issue's reproduction) is replaced by the complete file: the atomic rename never writes through a link."""
    d, ck = ws
    out = d / "full"
    out.mkdir(exist_ok=True)
    link = d / "devfull.npy"
    link.unlink(missing_ok=True)
    link.symlink_to("/dev/full")
    cases = [[["decode", "lat.pt", "-o", "full/dec", *ck], 1000],  # below one 32x32 PNG of noise
             [["encode", "photo.png", "-o", "full/z.npy", *ck], 300],  # below the 384-byte .npy
             [["encode", "photo.png", "-o", "full/z.safetensors", *ck], 200],
             [["stats", "a", "-o", "full/s.json", *ck], 100],
             [["encode", "photo.png", "-o", "devfull.npy", *ck], None]]
    results = _run_many(cases, cwd=d)
    for (argv, _), result in zip(cases[:-1], results):
        _assert_error(result, "File too large", cmd=argv)
    left = [p for p in out.rglob("*") if p.is_file()]
    assert not left, left  # neither a truncated file under its final name nor a temp file
    assert results[-1][0] == 0, results[-1]
    assert not link.is_symlink() and io.load_latents(link)[0].shape == (1, 4, 4, 4)


def _events(audit):
    return [json.loads(l) for l in Path(audit).read_text().splitlines()] if Path(audit).exists() else []


def test_interrupted_decode_leaves_only_complete_files(ws, tmp_path):
    """Decode 16 images, then re-run one image per batch and interrupt it (SIGTERM, then SIGINT) once its first
    PNG is renamed into place: every PNG present is complete (from one run or the other, never partial), no temp
    file is left, the error is one line with status 128+signal, and final names only ever come from renames."""
    d, ck = ws
    io.save_latents(tmp_path / "many.safetensors", torch.randn(16, 4, 4, 4, generator=torch.Generator().manual_seed(1)))
    out = tmp_path / "dec"
    argv = ["decode", str(tmp_path / "many.safetensors"), "-o", str(out), *ck]
    ((rc, _, err),) = _run_many([argv], cwd=tmp_path)
    assert rc == 0 and len(list(out.glob("*.png"))) == 16, err
    for sig in (signal.SIGTERM, signal.SIGINT):
        audit = tmp_path / f"audit-{sig.name}.jsonl"
        proc = _driver([[*argv, "--batch-size", "1", "--steps", "3"]], tmp_path, audit=audit, popen=True)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not any(
                e[0] == "rename" and e[2].endswith(".png") for e in _events(audit)):
            time.sleep(0.02)
        assert proc.poll() is None, f"the decode ended before it could be sent {sig.name}"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + sig, (sig, err)
        assert err.strip().count("\n") == 0 and "interrupted" in err and "Traceback" not in err, err
        pngs = sorted(out.glob("*.png"))
        assert len(pngs) == 16 and all(_complete_png(p) for p in pngs)
        assert not _leftovers(out)
        finals = {str(p) for p in pngs}
        events = _events(audit)
        assert not [e for e in events if e[0] == "open" and e[1] in finals]  # nothing opened under a final name
        assert any(e[0] == "rename" and e[2] in finals for e in events)


def test_every_output_kind_is_created_by_rename(ws, tmp_path):
    """Latents (.safetensors, .npy, .pt), PNGs, stats JSON, bench JSON/CSV and an ONNX graph reach their names
    by rename only, and no temp file is left."""
    d, ck = ws
    bench = ["bench", "--models", "ssdd-XS", "--backends", "eager", "--res", "32", "--warmup", "0", "--repeats", "1",
             "--rotate", "1", "--device", "cpu", "--quiet", "--json", "r.json", "--csv", "r.csv"]
    if importlib.util.find_spec("matplotlib"):
        bench += ["--plot", "r.png"]
    runs = [["encode", str(d / "photo.png"), "-o", f"z{s}", *ck] for s in (".safetensors", ".npy", ".pt")]
    runs += [["decode", str(d / "lat.pt"), "-o", "dec", *ck], ["stats", str(d / "a"), "-o", "s.json", *ck], bench]
    finals = [tmp_path / n for n in ("z.safetensors", "z.npy", "z.pt", "s.json", "r.json", "r.csv")]
    finals += [tmp_path / "r.png"] if "--plot" in bench else []
    finals += [tmp_path / "dec" / "cat.png", tmp_path / "dec" / "dog.png"]
    onnx = importlib.util.find_spec("onnxscript") and importlib.util.find_spec("onnxruntime")
    if onnx:
        runs.append(["export", "onnx", "--part", "encoder", "-o", "enc.onnx", *ck])
        finals.append(tmp_path / "enc.onnx")
    audit = tmp_path / "audit.jsonl"
    results = _run_many(runs, tmp_path, audit=audit)
    for argv, (rc, out, err) in zip(runs, results):
        assert rc == 0 and "Traceback" not in err, (argv, err)
    if onnx:
        assert "max abs error" in results[-1][1] and "nan" not in results[-1][1]
    assert all(p.is_file() for p in finals)
    events = _events(audit)
    for p in finals:
        assert not [e for e in events if e[0] == "open" and e[1] == str(p)], p
        assert [e for e in events if e[0] == "rename" and e[2] == str(p)], p
    assert not _leftovers(tmp_path) and not list(tmp_path.glob(".ssdd-*"))


# ---------------------------------------------------------------------------------------------------------
# Bad items in a job


def test_decompression_bomb_is_a_value_error_and_stats_skips_it(ws, tmp_path):
    d, ck = ws
    bomb = _bomb(tmp_path / "bomb.png")
    with pytest.raises(ValueError, match="bomb.png is refused as a possible decompression bomb"):
        io.load_image(bomb)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _png(imgs / "good1.png", seed=4)
    _png(imgs / "good2.png", seed=5)
    _bomb(imgs / "bomb.png")
    ((rc, out, err),) = _run_many([["stats", str(imgs), "-o", str(tmp_path / "s.json"), *ck]], cwd=tmp_path)
    assert rc == 0 and "Traceback" not in err and "skipped" in err and "decompression bomb" in err, err
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["num_images"] == 2 and stats["num_errors"] == 1


# ---------------------------------------------------------------------------------------------------------
# Image loading: high bit depth, float, EXIF orientation


def test_16_bit_grayscale_png_and_tiff_keep_their_range(tmp_path):
    a = (np.arange(32 * 40, dtype=np.uint32).reshape(32, 40) * 51).astype(np.uint16)  # 0 .. 65229
    for name in ("g16.png", "g16.tif"):
        Image.fromarray(a).save(tmp_path / name)
        x = io.load_image(tmp_path / name)
        want = torch.from_numpy(a.astype(np.float64) / 65535 * 2 - 1).float()
        assert x.shape == (1, 3, 32, 40)
        torch.testing.assert_close(x[0, 0], want, atol=1e-6, rtol=0)
        assert torch.equal(x[0, 0], x[0, 2]) and x.max() < 1.0 and x.min() == -1.0  # not saturated


def test_float_tiff_is_read_as_0_to_1(tmp_path):
    a = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(a, mode="F").save(tmp_path / "f.tif")
    x = io.load_image(tmp_path / "f.tif")
    torch.testing.assert_close(x[0, 1], torch.from_numpy(a * 2 - 1), atol=1e-6, rtol=0)
    a[0, 0] = np.nan
    Image.fromarray(a, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match="non-finite pixel values"):
        io.load_image(tmp_path / "nan.tif")


def test_exif_rotated_jpeg_is_loaded_upright(tmp_path):
    a = np.zeros((16, 32, 3), np.uint8)  # 16 high, 32 wide; left half white
    a[:, :16] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(a).save(tmp_path / "rot.jpg", exif=exif, quality=100)
    x = io.load_image(tmp_path / "rot.jpg")
    assert x.shape == (1, 3, 32, 16)  # displayed upright: 32 high, 16 wide
    assert x[0, :, :8].mean() > 0.9 and x[0, :, 24:].mean() < -0.9  # the white half is now on top


def test_folders_are_not_images_or_latents(tmp_path):
    with pytest.raises(ValueError, match="is a folder, expected an image file"):
        io.load_image(tmp_path)
    (tmp_path / "z.pt").mkdir()
    with pytest.raises(ValueError, match="is a folder, expected a latents file"):
        io.load_latents(tmp_path / "z.pt")
