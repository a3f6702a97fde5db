"""Windowed relative-position attention kernel vs its dense-SDPA reference (three-way check)."""
import pytest
import torch
from _kernel_checks import DEVICE, DTYPES, assert_three_way, requires_triton

from ssdd_runtime.kernels import _dispatch, attention

pytestmark = requires_triton


def make(B, heads, grid, dh, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = grid[0] * grid[1]
    q, k, v = (torch.randn(B, heads, N, dh, generator=g).to(DEVICE, dtype) for _ in range(3))
    table = (0.5 * torch.randn(15, 15, heads, generator=g)).to(DEVICE)
    return q, k, v, table


def check(B, heads, grid, dh, dtype):
    q, k, v, table = make(B, heads, grid, dh, dtype)
    out = attention.window_attention(q, k, v, table, grid, use_triton=True)
    out_pt = attention.window_attention_ref(q, k, v, table, grid)
    out_ref = attention.window_attention_ref(q, k, v, table, grid, upcast=True)
    assert_three_way(out, out_pt, out_ref, dtype, f"window_attention B={B} heads={heads} grid={grid} dh={dh}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,heads,grid,dh", [
    (2, 4, (5, 7), 24),     # grid smaller than the window: every pair attends
    (1, 6, (19, 11), 40),   # odd, non-square, larger than the window in one direction
    (1, 4, (17, 18), 72),   # window active in both directions, SSDD-M head_dim
])
def test_window_attention_matches_reference(B, heads, grid, dh, dtype):
    check(B, heads, grid, dh, dtype)


@pytest.mark.parametrize("dh", [8, 48, 64, 96, 128])
def test_window_attention_head_dims(dh):
    """Every head-dim split the kernel special-cases (D0 + D1): 8 -> 16 (padded), 48 -> 32 + 16, 64 -> 64,
    96 -> 64 + 32, 128 -> 128; 24, 40 and 72 (16 + 16, 32 + 16, 64 + 16) run in every dtype above."""
    check(1, 4, (9, 6), dh, torch.float32)


@pytest.mark.parametrize("dh", [40, 72])
def test_window_attention_unaligned_strides(dh):
    """Row strides that are not a multiple of 8 elements (q, k, v sliced from wider rows): ALIGN falls back."""
    q, k, v, table = make(1, 4, (6, 9), dh + 1, torch.float32)
    q, k, v = q[..., :dh], k[..., 1:], v[..., :dh]
    assert attention._stride_align(q, k, v) == 1
    out = attention.window_attention(q, k, v, table, (6, 9), use_triton=True)
    out_ref = attention.window_attention_ref(q, k, v, table, (6, 9), upcast=True)
    assert_three_way(out, out_ref, out_ref, torch.float32, "unaligned strides")


@pytest.mark.parametrize("grid,dh", [((21, 37), 40), ((17, 13), 72), ((5, 3), 24)])
def test_window_attention_gpu_tiles(monkeypatch, grid, dh):
    """The GPU tile sizes (4 x 8 queries, 16-key blocks of the flattened footprint: many tiles, partial blocks,
    clipped footprints; a grid narrower than the tile) on grids larger than the window, under the interpreter."""
    monkeypatch.setitem(attention.TILES, "cpu", attention.TILES["cuda"])
    check(1, 2, grid, dh, torch.float32)


def test_window_attention_excludes_outside_window():
    """Keys outside +-7 contribute nothing: changing them leaves every query that cannot see them unchanged."""
    grid = (1, 40)
    q, k, v, table = make(1, 4, grid, 24, torch.float32)
    out = attention.window_attention(q, k, v, table, grid, use_triton=True)
    v2 = v.clone()
    v2[:, :, 30:] += 100.0
    out2 = attention.window_attention(q, k, v2, table, grid, use_triton=True)
    assert torch.equal(out[:, :, :23], out2[:, :, :23])  # queries 0..22 see keys up to 29
    assert (out[:, :, 23:] - out2[:, :, 23:]).abs().amax() > 1.0


def test_dispatch_rules():
    q, k, v, table = make(1, 4, (4, 4), 24, torch.float32)
    ref = attention.window_attention_ref(q, k, v, table, (4, 4))
    assert torch.equal(attention.window_attention(q, k, v, table, (4, 4), use_triton=False), ref)
    if DEVICE == "cpu":  # auto never picks the interpreter
        assert torch.equal(attention.window_attention(q, k, v, table, (4, 4), use_triton=None), ref)
    with pytest.raises(ValueError, match="does not support"):
        attention.window_attention(q.double(), k.double(), v.double(), table, (4, 4), use_triton=True)


def test_forced_triton_on_cpu_without_interpreter_errors(monkeypatch):
    monkeypatch.setattr(_dispatch, "INTERPRETED", False)
    q, k, v, table = make(1, 4, (4, 4), 24, torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        attention.window_attention(q.cpu(), k.cpu(), v.cpu(), table.cpu(), (4, 4), use_triton=True)


def test_custom_op_traces():
    """Registered as torch custom op ssdd::window_attention with a fake impl: opcheck and torch.compile work."""
    q, k, v, table = make(1, 4, (5, 6), 24, torch.float32)
    torch.library.opcheck(attention.window_attention_triton, (q, k, v, table, [5, 6]),
                          test_utils=("test_schema", "test_faketensor"))
    fn = torch.compile(lambda q, k, v, t: attention.window_attention(q, k, v, t, (5, 6), use_triton=True) * 2,
                       backend="aot_eager", fullgraph=True)
    ref = attention.window_attention_ref(q, k, v, table, (5, 6), upcast=True) * 2
    assert (fn(q, k, v, table) - ref).abs().max() <= 1e-4
