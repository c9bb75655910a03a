"""Masked image modeling (MAE, SimMIM) against written-out references: masks, the encoder on visible patches, the
decoder's un-shuffling, the losses as per-patch / per-pixel loops, the fixed sin-cos positions, and FLOPs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TINY_VIT_ENCODER
from torch.utils.flop_counter import FlopCounterMode

from sslhub.errors import InputError
from sslhub.methods.base import Batch
from sslhub.methods.mae import MAE, mae_loss
from sslhub.methods.simmim import SimMIM, simmim_loss
from sslhub.models import patches as P
from sslhub.train.recipe import recipe_from_dict

VIT = {"arch": "vit_tiny_patch16_224", "image_size": 32,
       "model_args": {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}}  # an 8x8 grid of patches


def build(name: str, encoder: dict | None = None, **args):
    views = {"size": (encoder or VIT)["image_size"], "scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip_p": 0.0}
    if name == "mae":
        args = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, **args}
    r = recipe_from_dict({"method": name, "encoder": encoder or VIT, "method_args": {"views": views, **args}})
    torch.manual_seed(0)
    cls = MAE if name == "mae" else SimMIM
    return cls.create(r.encoder, r.method_args).eval()


def images(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ masks
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_random_mask_hides_exactly_round_ratio_L_different_per_sample(ratio):
    L = 64
    m = P.random_mask(16, L, ratio, torch.Generator().manual_seed(0))
    assert m.dtype == torch.bool and m.shape == (16, L)
    assert (m.sum(1) == round(ratio * L)).all()
    assert len({tuple(r.tolist()) for r in m}) == 16  # every sample its own mask
    # every position is hidden about `ratio` of the time over many samples (no position is favoured)
    many = P.random_mask(4000, L, ratio, torch.Generator().manual_seed(1)).float().mean(0)
    assert (many - ratio).abs().max() < 0.05


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_block_mask_is_exact_and_blocky(ratio):
    grid = (8, 8)
    m = P.block_mask(32, grid, ratio, torch.Generator().manual_seed(0))
    assert (m.sum(1) == round(ratio * 64)).all()
    r = P.random_mask(32, 64, ratio, torch.Generator().manual_seed(0))

    def boundary(mask):  # neighbouring patches, one hidden and one visible
        g = mask.reshape(-1, *grid)
        return ((g[:, :, 1:] ^ g[:, :, :-1]).sum() + (g[:, 1:] ^ g[:, :-1]).sum()).item()

    assert boundary(m) < 0.6 * boundary(r)  # blocks: less than half the boundary of random masks (measured 0.42-0.44)


def test_coarse_mask_hides_whole_cells():
    m = P.coarse_mask(8, (8, 8), 2, 0.6, torch.Generator().manual_seed(0)).reshape(8, 4, 2, 4, 2)
    cells = m.permute(0, 1, 3, 2, 4).reshape(8, 16, 4)
    assert ((cells.all(-1)) | (~cells.any(-1))).all()  # each 2x2 cell all hidden or all visible
    assert (cells.all(-1).sum(1) == round(0.6 * 16)).all()


def test_a_mask_that_hides_nothing_is_an_error():
    with pytest.raises(InputError, match="hides 0"):
        build("simmim", mask_ratio=0.1, mask_patch_size=16)  # 4 cells x 0.1 rounds to 0
    with pytest.raises(InputError, match="needs a timm Vision Transformer"):
        build("mae", encoder={"arch": "resnet18", "image_size": 32})


def test_masks_depend_on_the_place_in_the_global_batch_not_on_the_split():
    m = build("mae")
    x = images(8)
    whole = m.mask_for(Batch(x, seed=5, offset=0))
    halves = torch.cat([m.mask_for(Batch(x[:4], seed=5, offset=0)), m.mask_for(Batch(x[4:], seed=5, offset=4))])
    assert torch.equal(whole, halves)
    assert not torch.equal(whole, m.mask_for(Batch(x, seed=6, offset=0)))


# ------------------------------------------------------------------ patches and positions
def test_patchify_layout_and_round_trip():
    x = torch.randn(2, 3, 8, 12)
    p = P.patchify(x, 4)
    assert p.shape == (2, 6, 48)
    # patch (row 1, col 2) = index 1*3 + 2, flattened as (row, col, channel)
    want = x[1, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1)
    assert torch.equal(p[1, 5], want)
    assert torch.equal(P.unpatchify(p, 4, (2, 3)), x)


def test_sincos_positions_match_the_written_out_formula():
    dim, (gh, gw) = 16, (3, 5)
    emb = P.sincos_pos_embed_2d(dim, (gh, gw), n_prefix=1).numpy()
    assert emb.shape == (1 + gh * gw, dim) and not emb[0].any()
    q = dim // 4
    for r in range(gh):
        for c in range(gw):
            e = emb[1 + r * gw + c]
            for k in range(q):
                w = 1.0 / 10000 ** (k / q)
                assert e[k] == pytest.approx(math.sin(c * w), abs=1e-6)  # first half: the column
                assert e[q + k] == pytest.approx(math.cos(c * w), abs=1e-6)
                assert e[2 * q + k] == pytest.approx(math.sin(r * w), abs=1e-6)  # second half: the row
                assert e[3 * q + k] == pytest.approx(math.cos(r * w), abs=1e-6)


def test_mae_encoder_positions_are_fixed_and_frozen():
    m = build("mae")
    pos = m.vit.pos_embed
    assert not pos.requires_grad
    assert torch.allclose(pos[0], P.sincos_pos_embed_2d(32, (8, 8), 1), atol=1e-6)


# ------------------------------------------------------------------ the encoder on visible patches
def test_encode_visible_without_a_mask_is_timms_forward():
    m = build("mae")
    x = torch.randn(3, 3, 32, 32)
    none = torch.zeros(3, 64, dtype=torch.bool)
    assert torch.allclose(P.encode_visible(m.vit, x, none), m.vit.forward_features(x), atol=1e-5)


def test_mae_encoder_sees_only_visible_patches():
    m = build("mae")
    x = m.eval_images(images(4))
    mask = m.draw_mask(4, torch.Generator().manual_seed(0))
    seen = []
    hook = m.vit.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    out = P.encode_visible(m.vit, x, mask)
    hook.remove()
    visible = 64 - round(0.75 * 64)
    assert seen == [torch.Size([4, 1 + visible, 32])] and out.shape == (4, 1 + visible, 32)
    # the hidden patches' pixels do not reach the encoder
    px = P.mask_to_pixels(mask, 4, (8, 8))
    noisy = x * (1 - px) + torch.randn_like(x) * px
    assert torch.allclose(P.encode_visible(m.vit, noisy, mask), out, atol=1e-6)


def test_mae_decoder_unshuffles_to_grid_order():
    """With every layer of the decoder the identity, its output is the encoder's visible tokens back in their grid
    positions and the mask token at the hidden ones."""
    m = build("mae")
    dec = m.decoder
    dec.embed = torch.nn.Identity()
    dec.blocks = torch.nn.Sequential()
    dec.norm = torch.nn.Identity()
    dec.pred = torch.nn.Identity()
    dec.pos_embed.zero_()
    mask = m.draw_mask(3, torch.Generator().manual_seed(2))
    K = int((~mask[0]).sum())
    latent = torch.randn(3, 1 + K, 32)
    out = dec(latent, mask)
    for i in range(3):
        vis = [j for j in range(64) if not mask[i, j]]
        for k, j in enumerate(vis):
            assert torch.equal(out[i, j], latent[i, 1 + k])
        for j in range(64):
            if mask[i, j]:
                assert torch.equal(out[i, j], dec.mask_token[0, 0])


# ------------------------------------------------------------------ losses against loops
@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_is_the_per_patch_loop_over_hidden_patches(norm_pix):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 8, 8, generator=g)
    pred = torch.randn(3, 4, 48, generator=g)
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    total, count = 0.0, 0
    for i in range(3):
        for r in range(2):
            for c in range(2):
                j = r * 2 + c
                if not mask[i, j]:
                    continue
                t = x[i, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].permute(1, 2, 0).reshape(-1).double()
                if norm_pix:
                    t = (t - t.mean()) / math.sqrt(float(((t - t.mean()) ** 2).sum() / (t.numel() - 1)) + 1e-6)
                total += float(((pred[i, j].double() - t) ** 2).mean())
                count += 1
    got = mae_loss(pred, P.patchify(x, 4), mask, norm_pix)
    assert got.item() == pytest.approx(total / count, rel=1e-5)
    # visible patches do not count: changing their prediction changes nothing
    pred2 = pred.clone()
    pred2[~mask] += 10
    assert mae_loss(pred2, P.patchify(x, 4), mask, norm_pix).item() == pytest.approx(got.item(), rel=1e-6)


def test_simmim_loss_is_l1_over_hidden_pixels():
    g = torch.Generator().manual_seed(1)
    x, rec = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    mask = torch.tensor([[1, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)
    total = n = 0.0
    for i in range(2):
        for j in range(4):
            if mask[i, j]:
                r, c = divmod(j, 2)
                total += float((rec[i, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4]
                                - x[i, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4]).abs().sum())
                n += 16  # pixels (the sum runs over 3 channels, divided by 3 below)
    got = simmim_loss(rec, x, P.mask_to_pixels(mask, 4, (2, 2)))
    assert got.item() == pytest.approx(total / (n + 1e-5) / 3, rel=1e-5)


def test_simmim_replaces_hidden_patch_embeddings_by_the_mask_token():
    """Reference: timm's own forward_features with a hook that swaps the hidden patches' embeddings."""
    m = build("simmim")
    x = m.eval_images(images(3))
    mask = m.draw_mask(3, torch.Generator().manual_seed(0))
    assert (mask.sum(1) == 4 * round(0.6 * 16)).all()  # 2x2-patch cells: 10 of 16 cells, 40 of 64 patches
    w = mask[..., None].float()
    hook = m.vit.patch_embed.register_forward_hook(lambda mod, inp, out: out * (1 - w) + m.mask_token * w)
    want = m.vit.forward_features(x)
    hook.remove()
    assert torch.allclose(P.encode_with_mask_token(m.vit, x, mask, m.mask_token), want, atol=1e-5)
    # and with it the loss: L1 on the hidden pixels of the 1x1-conv + pixel-shuffle prediction
    z = want[:, 1:].transpose(1, 2).reshape(3, 32, 8, 8)
    rec = torch.nn.functional.pixel_shuffle(m.decoder[0](z), 4)
    loss, _ = m.pixel_loss(x, mask)
    assert loss.item() == pytest.approx(simmim_loss(rec, x, P.mask_to_pixels(mask, 4, (8, 8))).item(), rel=1e-5)


# ------------------------------------------------------------------ cost
def flops(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def test_mae_encoder_at_75_percent_costs_under_0_3_of_the_unmasked_one_and_a_step_less_than_simmim():
    enc = {"arch": "vit_tiny_patch16_224", "image_size": 64, "model_args": {"patch_size": 8, "depth": 2}}
    mae, simmim = build("mae", enc, decoder_dim=128, decoder_depth=2, decoder_heads=4), build("simmim", enc)
    x = mae.eval_images(images(4, 64))
    mask = mae.draw_mask(4, torch.Generator().manual_seed(0))
    full = flops(lambda: mae.vit.forward_features(x))
    masked = flops(lambda: P.encode_visible(mae.vit, x, mask))
    assert masked <= 0.3 * full, f"MAE encoder at 75 %: {masked / full:.3f} of the unmasked encoder"
    b = Batch(images(4, 64), seed=0)
    mae_step = flops(lambda: mae.loss(b)["loss"].backward())
    simmim_step = flops(lambda: simmim.loss(Batch(images(4, 64), seed=0))["loss"].backward())
    assert mae_step < simmim_step


# ------------------------------------------------------------------ export, reload, pictures
def test_reconstruction_panels_paste_the_visible_patches():
    m = build("mae")
    x = images(2)
    mask = m.draw_mask(2, torch.Generator().manual_seed(0))
    orig, masked, rec, pasted = m.reconstruction_panels(x, mask)
    px = P.mask_to_pixels(mask, 4, (8, 8)).bool().expand(-1, 3, -1, -1)
    assert torch.equal(pasted[~px], orig[~px]) and torch.equal(pasted[px], rec[px])
    assert (masked[px].float() - 128).abs().max() <= 1  # hidden patches grey
    assert np.array_equal(orig.numpy(), x.numpy())  # at the encoder's size, no resize: the original pixels


# ------------------------------------------------------------------ a peer library: lightly's MAE pieces
def test_patches_positions_and_visible_encoding_agree_with_lightly():
    """lightly (a peer SSL library; its MAE follows the official code) on the same weights: patchify, the 2-D
    sin-cos table and a timm ViT encoding only the kept tokens."""
    import copy

    lightly_utils = pytest.importorskip("lightly.models.utils")
    from lightly.models.modules import MaskedVisionTransformerTIMM

    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(P.patchify(x, 4), lightly_utils.patchify(x, 4))
    want = lightly_utils.get_2d_sincos_pos_embed(32, 8, cls_token=True)
    assert np.allclose(P.sincos_pos_embed_2d(32, (8, 8), 1).numpy(), want, atol=1e-6)

    m = build("mae")
    peer = MaskedVisionTransformerTIMM(vit=copy.deepcopy(m.vit))
    peer.vit.load_state_dict(m.vit.state_dict())  # the same weights, whatever the wrapper initialised
    mask = m.draw_mask(3, torch.Generator().manual_seed(1))
    keep = P.keep_indices(mask)
    idx_keep = torch.cat([torch.zeros(3, 1, dtype=torch.long), keep + 1], dim=1)  # lightly counts the class token
    with torch.no_grad():
        assert torch.allclose(P.encode_visible(m.vit, x, mask), peer.encode(x, idx_keep=idx_keep), atol=1e-5)


def test_mae_initialisation_is_xavier_uniform_with_sincos_positions():
    """MAE's official init (``mae_init``): Xavier-uniform linear layers, zero biases — not timm's N(0, 0.02)."""
    m = build("mae")
    for name, lin in [("qkv", m.vit.blocks[0].attn.qkv), ("decoder.pred", m.decoder.pred)]:
        bound = math.sqrt(6 / (lin.in_features + lin.out_features))
        w = lin.weight.abs().max().item()
        assert 0.9 * bound < w <= bound, f"{name}: max |w| {w:.3g}, Xavier bound {bound:.3g}"
        assert not lin.bias.any()
    plain = build("mae", mae_init=False)
    assert plain.vit.blocks[0].attn.qkv.weight.abs().max().item() < 0.1  # timm's truncated N(0, 0.02)
