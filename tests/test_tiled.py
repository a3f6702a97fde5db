"""Tiled decode against the untiled one: exact GroupNorm statistics, halos covering the receptive field."""
import pytest
import torch

from conftest import assert_close
from ssdd_runtime import SSDD, tiled
from ssdd_runtime.testing import test_state_dict


def test_tiled_decode_equals_untiled(s_model):
    """Non-square 32x128 image, 4 tiles of 4 latent pixels across (the up path's 5-pixel halo leaves interior crop
    edges on every tile). Bound: float reassociation only. Tiles change conv input sizes (oneDNN picks other
    algorithms) and the GroupNorm statistics are merged in fp64 instead of F.group_norm's fp32 pass; measured
    2.3e-6 max abs on outputs of max |v| ~ 5 (relative ~5e-7), so 2e-5 leaves a 10x margin for other CPUs."""
    z = torch.randn(1, 4, 4, 16, generator=torch.Generator().manual_seed(0))
    ref = s_model.decode(z, steps=1, generator=torch.Generator().manual_seed(1))
    out = s_model.decode(z, steps=1, generator=torch.Generator().manual_seed(1), tile=4)
    assert len(tiled.tiles(4, 16, 4, 5)) == 4
    assert_close(out, ref, atol=2e-5, rtol_l2=2e-6, name="tiled decode")


@pytest.fixture(scope="module")
def s_decoder_only():
    return SSDD.from_state_dict(test_state_dict(None, "S", 0))


@pytest.mark.parametrize("r,grid", [(1, (20, 36)), (2, (24, 40))])
def test_token_tiled_transformer_is_exact(s_decoder_only, r, grid):
    """The middle transformer run block by block over token tiles with a 7-token halo (r = 1 and 2 tokens per
    latent pixel: f8 and f16) equals the whole-grid transformer: the window gives keys beyond +-7 exactly zero
    weight. Bound: float reassociation (measured 1.2e-5 / 1.4e-5 max abs, 8e-7 relative L2, outputs |max| 14)."""
    mid = s_decoder_only.decoder.mid_block
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, mid.proj_in.in_features, *grid, generator=g)
    ctx = torch.randn(2, s_decoder_only.decoder_config.levels[0], grid[0] // r, grid[1] // r, generator=g)
    with torch.no_grad():
        ref = mid(y, ctx)
        assert_close(tiled._mid(mid, y, ctx, tile=5), ref, atol=1e-5 * ref.abs().max().item() + 1e-5,
                     rtol_l2=5e-6, name="token-tiled transformer")


def test_chan_merge_matches_whole_statistics():
    class GN:  # the two attributes Stats reads from a GroupNorm leaf
        num_groups, eps = 4, 1e-5

    x = torch.randn(3, 8, 13, 22, generator=torch.Generator().manual_seed(0)) * 3 + 7
    stats = tiled.Stats()
    for part in x.split([5, 6, 2], dim=2):
        for piece in part.split([9, 13], dim=3):
            stats.add(GN, piece.contiguous())
    mean, rstd = stats.finish()[GN]
    var_ref, mean_ref = torch.var_mean(x.double().reshape(3, 4, -1), dim=-1, correction=0)
    torch.testing.assert_close(mean, mean_ref.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(rstd, torch.rsqrt(var_ref + 1e-5).float(), atol=0, rtol=1e-6)


def test_tile_argument_is_validated(s_model):
    z = torch.zeros(1, 4, 4, 4)
    for bad in (0, -2, True, 2.5):
        with pytest.raises(ValueError, match="tile must be a positive integer"):
            s_model.decode(z, steps=1, tile=bad)
