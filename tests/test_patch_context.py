"""Relative position and jigsaw: their targets against the geometry of a coordinate-encoded image.

Each pixel of the synthetic images stores its own row (red) and column (green), so a patch says where it was cut.
An *oracle* classifier reads that and names the true class by a written-out rule (the paper's Fig. 2 layout for
relative position, "which permutation undoes the shuffle" for jigsaw); the method's own loss and evaluation must
then find it right every time — a label off by one, a neighbour table or a shuffle read the wrong way round drops
the oracle to chance.
"""
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sslhub.data.augment import ViewConfig
from sslhub.data.grid import PatchGuards
from sslhub.methods.base import Batch
from sslhub.methods.jigsaw import Jigsaw, JigsawConfig, max_min_hamming_permutations, shuffle_tiles
from sslhub.methods.relative_position import RelativePosition, RelativePositionConfig
from sslhub.models.backbone import Backbone, EncoderConfig

SIZE = 32
STILL = dict(size=SIZE, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0, jitter_p=0.0, gray_p=0.0)
# The paper's Fig. 2: where the neighbour is relative to the centre (row step, column step) → label
FIG2 = {(-1, -1): 0, (-1, 0): 1, (-1, 1): 2, (0, -1): 3, (0, 1): 4, (1, -1): 5, (1, 0): 6, (1, 1): 7}
ENC = EncoderConfig(arch="resnet18", cifar_stem=True, image_size=SIZE, model_args={"channels": [8, 8, 8, 8], "layers": [1, 1, 1, 1]},
                    mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def coordinate_images(n: int) -> torch.Tensor:
    """uint8 ``(n, 3, 32, 32)``: red = 7·row, green = 7·column, blue = 7·(sample index mod 32)."""
    r = torch.arange(SIZE).view(1, 1, SIZE, 1).expand(n, 1, SIZE, SIZE)
    c = torch.arange(SIZE).view(1, 1, 1, SIZE).expand(n, 1, SIZE, SIZE)
    i = (torch.arange(n) % SIZE).view(n, 1, 1, 1).expand(n, 1, SIZE, SIZE)
    return (torch.cat([r, c, i], 1) * 7).to(torch.uint8)


def corner(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (row, column) a patch ``(…, 3, h, w)`` in [0, 1] was cut at, read from its top-left pixel."""
    return (p[..., 0, 0, 0] * 255 / 7).round().long(), (p[..., 1, 0, 0] * 255 / 7).round().long()


def relpos(**kw) -> RelativePosition:
    cfg = RelativePositionConfig(guards=PatchGuards(colour="none", pixelate_p=0.0), views=ViewConfig(**STILL),
                                 patch_dim=8, hidden_dim=8, **kw)
    torch.manual_seed(0)
    return RelativePosition(Backbone(ENC), cfg)


def corner_tower(seen: dict):
    """A stand-in tower: each patch's feature is the (row, column) it was cut at; the patches are kept in ``seen``."""
    def tower(p: torch.Tensor, own_statistics: bool = False) -> torch.Tensor:
        seen.setdefault("p", []).append(p)
        r, c = corner(p)
        return torch.stack([r, c], -1).float()  # (n, K, 2)
    return tower


def fig2_oracle(centre: torch.Tensor, neighbour: torch.Tensor) -> torch.Tensor:
    """Features (row, column) of centres and neighbours ``(m, 2)`` → logits naming Fig. 2's label of the
    neighbour's place (steps larger than the jitter count: cells are 10 px apart, the jitter ±1 px)."""
    d = neighbour - centre
    step = torch.where(d.abs() > 5, torch.sign(d), torch.zeros_like(d)).long()
    labels = torch.tensor([FIG2.get((int(a), int(b)), 0) for a, b in step.tolist()])  # (0, 0): unreadable
    return F.one_hot(labels, 8).float() * 50


@pytest.mark.parametrize("all_neighbours", [False, True])
def test_relative_position_labels_match_the_geometry_in_training_and_evaluation(all_neighbours):
    m = relpos(all_neighbours=all_neighbours)
    seen = {}
    m.tower, m.classify = corner_tower(seen), fig2_oracle
    out = m.loss(Batch(coordinate_images(64), rng=torch.Generator().manual_seed(0), seed=11, offset=0))
    assert out["relpos_acc"] == 1.0 and out["loss"] < 1e-6
    p = seen["p"][0]
    assert p.shape[1:] == ((9 if all_neighbours else 2), 3, 7, 7)  # 7-px patches: 2/3 of the 10-px cells
    r, c = corner(p)
    centre = 4 if all_neighbours else 0
    for v in (r[:, centre], c[:, centre]):  # inside the middle cell: 10 … 20 px from a grid origin at 0 … 2 px
        assert v.min() >= 10 and (v + 7).max() <= 22
    if not all_neighbours:
        labels = fig2_oracle(torch.stack([r[:, 0], c[:, 0]], 1).float(), torch.stack([r[:, 1], c[:, 1]], 1).float())
        assert len(labels.argmax(1).unique()) == 8  # every neighbour drawn
        far = torch.maximum((r[:, 1] - r[:, 0]).abs(), (c[:, 1] - c[:, 0]).abs())
        assert far.min() >= 7 + 1 and far.max() <= 10 + 2  # a gap of at least 1 px, ±1 px of jitter
    m.tower = corner_tower({})
    assert m.evaluate(coordinate_images(20), None)["relpos_acc"] == 1.0  # all 8 neighbours of every image


def test_relative_position_guards_reach_the_tower():
    """With the paper's guards on, two of three channels of each patch carry only noise around the mean."""
    cfg = RelativePositionConfig(guards=PatchGuards(colour="drop", pixelate_p=0.0), views=ViewConfig(**STILL),
                                 patch_dim=8, hidden_dim=8)
    m = RelativePosition(Backbone(ENC), cfg)
    seen = {}
    m.tower, m.classify = corner_tower(seen), fig2_oracle
    images = torch.randint(0, 256, (16, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    m.loss(Batch(images, rng=torch.Generator().manual_seed(0), seed=3, offset=0))
    spread = seen["p"][0].flatten(-2).std(-1, unbiased=False).sort(-1).values  # (16, 2, 3): per channel, in a patch
    assert (spread[..., 2] > 0.1).all()  # the kept channel: the image's own pixels
    assert (spread[..., :2] <= 0.02 * spread[..., 2:]).all()  # the dropped two: noise of ~1/100 its std (49 px)


def test_relative_position_trains_and_reports_accuracy():
    m = relpos()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    images = torch.randint(0, 256, (16, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = m.loss(Batch(images, rng=torch.Generator().manual_seed(0)))
    assert math.isclose(out["loss"].item(), math.log(8), rel_tol=0.2)  # about chance at init
    out["loss"].backward()
    opt.step()
    m.eval()
    res = m.evaluate(images, None)
    assert set(res) == {"relpos_acc", "relpos_acc_guarded"} and all(0 <= v <= 1 for v in res.values())


# ----------------------------------------------------------------------------------------------- jigsaw
def jigsaw(**kw) -> Jigsaw:
    cfg = JigsawConfig(views=ViewConfig(**STILL), tile_dim=8, hidden_dim=8, **kw)
    torch.manual_seed(0)
    return Jigsaw(Backbone(ENC), cfg)


def test_permutation_set_has_the_claimed_minimal_hamming_distance():
    perms = max_min_hamming_permutations(100, 0)
    assert perms.shape == (100, 9)
    assert all(sorted(p) == list(range(9)) for p in perms.tolist())
    d = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    off = d[~np.eye(100, dtype=bool)]
    assert off.min() == 6  # the greedy set's minimal distance (module docstring)
    # a random set of 100 is much closer: the greedy choice is what makes the puzzles distinguishable
    rnd = np.array([np.random.default_rng(s).permutation(9) for s in range(100)])
    dr = (rnd[:, None, :] != rnd[None, :, :]).sum(-1)[~np.eye(100, dtype=bool)]
    assert dr.min() <= 3
    # deterministic in the seed, another seed another set
    assert np.array_equal(max_min_hamming_permutations.__wrapped__(100, 0), perms)
    assert not np.array_equal(max_min_hamming_permutations(100, 1), perms)


@pytest.mark.slow
def test_permutation_set_of_1000_has_minimal_distance_5():
    perms = max_min_hamming_permutations(1000, 0)
    assert len({tuple(p) for p in perms.tolist()}) == 1000
    d = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    assert d[~np.eye(1000, dtype=bool)].min() == 5


def jigsaw_oracle(m: Jigsaw):
    """Logits naming the permutation that undoes the shuffle: tile at shuffled position s came from grid cell
    (row // 10, column // 10) of its corner, so perm[s] is that cell; the label is its row in the set."""
    table = {tuple(p): k for k, p in enumerate(m.permutations.tolist())}

    def logits(shuffled: torch.Tensor) -> torch.Tensor:
        r, c = corner(shuffled)  # (n, 9)
        cells = (r // 10) * 3 + c // 10
        labels = torch.tensor([table[tuple(x)] for x in cells.tolist()])
        return F.one_hot(labels, m.cfg.num_permutations).float() * 50

    return logits


def test_jigsaw_label_inverts_the_shuffle_in_training_and_evaluation():
    m = jigsaw(num_permutations=30)
    images = coordinate_images(48)
    seen = {}
    oracle = jigsaw_oracle(m)

    def spy(shuffled):
        seen["s"] = shuffled
        return oracle(shuffled)

    m.logits = spy
    out = m.loss(Batch(images, rng=torch.Generator().manual_seed(0), seed=5, offset=0))
    assert out["jigsaw_acc"] == 1.0 and out["loss"] < 1e-6
    shuffled = seen["s"]
    labels = oracle(shuffled).argmax(1)
    assert len(labels.unique()) > 15  # many of the 30 permutations drawn
    restored = shuffle_tiles(shuffled, m.permutations[labels].argsort(1))  # undo with the label
    r, c = corner(restored)
    assert torch.equal((r // 10) * 3 + c // 10, torch.arange(9).expand(48, 9))  # back in grid order
    assert shuffled.shape[-1] == 8  # tiles of 0.85 × 10-px cells
    m.logits = oracle
    assert m.evaluate(coordinate_images(40), None)["jigsaw_acc"] == 1.0


def test_jigsaw_tiles_are_normalised_on_their_own_before_the_tower():
    m = jigsaw(num_permutations=10)
    seen = {}
    m.backbone.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    images = torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    m.loss(Batch(images, rng=torch.Generator().manual_seed(0)))
    x = seen["x"]  # (4·9, 3, 8, 8)
    assert x.shape == (36, 3, 8, 8)
    assert torch.allclose(x.mean(dim=(-2, -1)), torch.zeros(36, 3), atol=1e-4)
    assert torch.allclose(x.std(dim=(-2, -1), unbiased=False), torch.ones(36, 3), atol=1e-2)


def test_the_permutation_set_is_part_of_the_checkpoint():
    """A run resumed (or joined by another process) with a different perm_seed keeps the set it started with."""
    a, b = jigsaw(num_permutations=20, perm_seed=0), jigsaw(num_permutations=20, perm_seed=9)
    assert not torch.equal(a.permutations, b.permutations)
    assert "permutations" in a.state_dict()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.permutations, b.permutations)


@pytest.mark.parametrize("make,name", [(relpos, "relative_position_pairs.png"), (jigsaw, "jigsaw_puzzles.png")])
def test_pictures_show_the_puzzles_of_each_image(make, name):
    """The run folder's / card's picture: one row per image (8 at most), a PNG that opens, a caption with the
    share the model got right; the oracle gets every one right."""
    m = make()
    m.tower, m.classify = corner_tower({}), fig2_oracle
    if isinstance(m, Jigsaw):
        m.logits = jigsaw_oracle(m)
    png, caption = m.pictures(coordinate_images(10), "test images")[name]
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.height > 8 * 96  # 8 rows of at least 96 px
    assert "100%" in caption and "test images" in caption
