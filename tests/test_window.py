"""The closed-form window bias (spec 3.7 / 9) on any grid, checked against brute force and the official gather."""
import pytest
import torch
import torch.nn.functional as F

import ssdd_runtime.kernels
from conftest import assert_close
from ssdd_runtime.kernels import relative_position_bias, window_attention_ref

W = 7  # +-7 tokens: the (15, 15, heads) table


def official_padded_gather_bias(table, G):
    """Spec 3.7, square grids: pad the table with -1e7 to (2G-1)^2, gather with the Swin-style index."""
    heads = table.shape[-1]
    pad = G - 1 - W
    full = F.pad(table.permute(2, 0, 1), (pad, pad, pad, pad), value=-1e7)  # (heads, 2G-1, 2G-1)
    coords = torch.stack(torch.meshgrid(torch.arange(G), torch.arange(G), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + (G - 1)  # (2, N, N)
    index = rel[0] * (2 * G - 1) + rel[1]
    return full.reshape(heads, -1)[:, index]  # (heads, N, N)


@pytest.mark.parametrize("G", [8, 11, 16])
def test_closed_form_bias_equals_official_gather_on_square_grids(G):
    table = torch.randn(15, 15, 4, generator=torch.Generator().manual_seed(G))
    assert torch.equal(relative_position_bias(table, (G, G)), official_padded_gather_bias(table, G))


def brute_force_window_attention(q, k, v, table, grid):
    """Loop over queries; attend only to the keys inside the +-7 window, with their table bias."""
    Gh, Gw = grid
    B, H, N, d = q.shape
    out = torch.empty_like(q, dtype=torch.float64)
    q, k, v, table = q.double(), k.double(), v.double(), table.double()
    for i in range(N):
        yi, xi = divmod(i, Gw)
        keys = [j for j in range(N) if abs(yi - j // Gw) <= W and abs(xi - j % Gw) <= W]
        b = torch.stack([table[yi - j // Gw + W, xi - j % Gw + W] for j in keys], dim=-1)  # (heads, K)
        logits = q[:, :, i, None, :] @ k[:, :, keys].transpose(-1, -2) / d ** 0.5  # (B, H, 1, K)
        out[:, :, i] = (torch.softmax(logits[:, :, 0] + b, dim=-1)[..., None] * v[:, :, keys]).sum(-2)
    return out


def brute_force_dispatch(q, k, v, table, grid, *, use_triton=None):
    """Stands in for kernels.window_attention inside a whole decode."""
    return brute_force_window_attention(q, k, v, table, grid).to(q.dtype)


@pytest.mark.parametrize("grid", [(12, 20), (20, 9), (3, 5), (1, 1), (16, 16)])
def test_window_attention_ref_equals_brute_force(grid):
    g = torch.Generator().manual_seed(sum(grid))
    N = grid[0] * grid[1]
    q, k, v = (torch.randn(2, 4, N, 8, generator=g) for _ in range(3))
    table = torch.randn(15, 15, 4, generator=g)
    assert_close(window_attention_ref(q, k, v, table, grid), brute_force_window_attention(q, k, v, table, grid),
                 atol=1e-5, name=f"grid {grid}")


def test_non_square_decode_matches_brute_force_attention(s_model, monkeypatch):
    """Latents 12x20 -> 96x160 image: the whole decode with brute-force windowed attention swapped in."""
    z = torch.randn(1, 4, 12, 20, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(1))
    out = s_model.decode(z, noise=noise)
    assert out.shape == (1, 3, 96, 160)

    monkeypatch.setattr(ssdd_runtime.kernels, "window_attention", brute_force_dispatch)
    assert_close(out, s_model.decode(z, noise=noise), atol=1e-4, name="decode with brute-force attention")

    def unwindowed(q, k, v, table, grid, *, use_triton=None):  # keys outside the window not excluded
        bias = relative_position_bias(table, grid)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(bias == -1e7, 0.0)[None])

    monkeypatch.setattr(ssdd_runtime.kernels, "window_attention", unwindowed)
    assert (out - s_model.decode(z, noise=noise)).abs().max() > 1e-3  # the window is active on a 12x20 grid


def test_small_grid_decode_runs_and_is_global(s_model, monkeypatch):
    """Grid 4x6 (< 8): every token pair is inside the window, so attention is global with the table bias."""
    z = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(2))
    out = s_model.decode(z, generator=torch.Generator().manual_seed(3))
    assert out.shape == (2, 3, 32, 48) and torch.isfinite(out).all()
    monkeypatch.setattr(ssdd_runtime.kernels, "window_attention", brute_force_dispatch)
    assert_close(out, s_model.decode(z, generator=torch.Generator().manual_seed(3)), atol=1e-4)


def test_bias_follows_weight_changes(s_model):
    """No cache survives a weight change (the official LRU cache does, spec 6.12)."""
    import copy

    model = copy.deepcopy(s_model)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    noise = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    before = model.decode(z, noise=noise)
    with torch.no_grad():
        for block in model.decoder.mid_block.transformer_blocks:
            block.relative_position_bias.relative_bias_table.mul_(-1)
    after = model.decode(z, noise=noise)
    assert (before - after).abs().max() > 1e-3
