from dataclasses import replace

import pytest
import torch

from ditserve.demo.language import ALL_SIZES, COLORS, NEW_SIZE, SHAPES, SIZES, parse_prompt, sample_scenes
from ditserve.demo.model import build_transformer
from ditserve.demo.object_probe import KINDS, KINDS_WITH_NEW_SIZE, ObjectProbe, object_targets
from ditserve.demo.render import PALETTE, lay_out, object_map, rasterize


def test_object_map_names_the_object_whose_colour_is_drawn():
    scenes = sample_scenes(16, seed=5, split="all")
    layout = lay_out(scenes, jitter=0.04, generator=torch.Generator().manual_seed(2))
    images, visible = rasterize(layout, 128), object_map(layout, 128)
    palette = torch.tensor([PALETTE[c] for c in COLORS], dtype=torch.float32) / 255
    colors = torch.cat([layout.background[:, None], layout.color], dim=1)
    expected = palette[torch.gather(colors, 1, visible.flatten(1))].view(16, 128, 128, 3).permute(0, 3, 1, 2)
    agree = ((images - expected).abs().amax(dim=1) < 1e-6).float().mean()
    # only anti-aliased edge pixels (a blend of two colours) may differ
    assert agree > 0.97
    assert set(visible.unique().tolist()) == {0, 1, 2, 3}


def test_targets_follow_flux_token_order_and_cell_order():
    scene = parse_prompt("a large red square at the top left and a small blue triangle at the bottom right")
    layout = lay_out([scene, scene])
    targets = object_targets(layout, tokens_per_side=8, cells_per_token=4, prompted=[True, False])
    assert targets.color.shape == targets.kind.shape == (2, 64, 16)
    images = rasterize(layout, 128)
    square = 1 + SIZES.index("large") * len(SHAPES) + SHAPES.index("square")
    triangle = 1 + SIZES.index("small") * len(SHAPES) + SHAPES.index("triangle")
    # token (r, c) covers pixel rows 16r..16r+15 and columns 16c..16c+15; cell (i, j) is centred on the corner
    # between pixels 16r+4i+1 and 16r+4i+2 (likewise for columns): where those four pixels agree, they must show
    # the cell's colour
    checked = 0
    for token in range(64):
        row, column = divmod(token, 8)
        for cell in range(16):
            i, j = divmod(cell, 4)
            y, x = 16 * row + 4 * i + 1, 16 * column + 4 * j + 1
            block = images[0, :, y : y + 2, x : x + 2].flatten(1)
            if not torch.equal(block.amax(dim=1), block.amin(dim=1)):
                continue  # an anti-aliased edge
            color = COLORS[targets.color[0, token, cell]]
            assert torch.allclose(block[:, 0] * 255, torch.tensor(PALETTE[color], dtype=torch.float32), atol=1e-3)
            assert targets.kind[0, token, cell].item() == {"white": 0, "red": square, "blue": triangle}[color]
            checked += 1
    assert checked > 0.9 * 64 * 16
    assert {COLORS[c] for c in targets.color[0].unique().tolist()} == {"white", "red", "blue"}
    assert targets.prompted.tolist() == [True, False]
    assert targets[1:].kind.shape == (1, 64, 16)


def _probe_inputs(tokens: int = 64):
    batch = 2
    return {
        "hidden_states": torch.randn(batch, tokens, 64),
        "encoder_hidden_states": torch.randn(batch, 32, 64),
        "pooled_projections": torch.randn(batch, 64),
        "timestep": torch.full((batch,), 0.5),
        "img_ids": torch.zeros(tokens, 3),
        "txt_ids": torch.zeros(32, 3),
        "return_dict": False,
    }


def test_probe_reads_the_forward_pass_and_detaches_cleanly():
    torch.manual_seed(0)
    transformer = build_transformer()
    inputs = _probe_inputs()
    before = transformer(**inputs)[0]
    probe = ObjectProbe(transformer, cells_per_token=4)
    layout = lay_out(sample_scenes(2, seed=1))
    targets = object_targets(layout, 8, 4, prompted=[True, False])
    with pytest.raises(RuntimeError, match="forward pass"):
        probe.loss(targets)
    with torch.no_grad():
        assert torch.equal(transformer(**inputs)[0], before)  # the hook only reads
        loss = probe.loss(targets)
    # an untrained read-out is near chance: log(colours) + log(kinds) on the prompted picture
    assert torch.isfinite(loss) and loss.item() == pytest.approx(torch.log(torch.tensor(8.0 * KINDS)).item(), rel=0.3)
    probe.detach()
    transformer(**inputs)
    with pytest.raises(RuntimeError, match="forward pass"):
        probe.loss(targets)


def test_kind_of_an_unprompted_picture_does_not_count():
    # With the prompt dropped, the picture's shapes cannot be known from the text: no kind loss there.
    torch.manual_seed(0)
    transformer = build_transformer()
    probe = ObjectProbe(transformer, cells_per_token=4)
    targets = object_targets(lay_out(sample_scenes(2, seed=1)), 8, 4, prompted=[True, False])
    changed = type(targets)(targets.color, targets.kind.clone(), targets.prompted)
    changed.kind[1] = (changed.kind[1] + 1) % KINDS
    inputs = _probe_inputs()
    losses = []
    for t in (targets, changed, type(targets)(targets.color, changed.kind, torch.tensor([True, True]))):
        with torch.no_grad():
            transformer(**inputs)
            losses.append(probe.loss(t).item())
    assert losses[0] == losses[1] and losses[2] != losses[0]


def test_the_new_size_is_a_kind_of_its_own_for_the_lora_probe():
    layout = lay_out([parse_prompt(f"a {NEW_SIZE} red circle in the center")])
    targets = object_targets(layout, 8, 4, prompted=[True])
    medium_circle = 1 + ALL_SIZES.index(NEW_SIZE) * len(SHAPES) + SHAPES.index("circle")
    assert KINDS <= medium_circle < KINDS_WITH_NEW_SIZE
    assert set(targets.kind.unique().tolist()) == {0, medium_circle}
    torch.manual_seed(0)
    transformer = build_transformer()
    probe = ObjectProbe(transformer, cells_per_token=4, kinds=KINDS_WITH_NEW_SIZE)
    inputs = {**_probe_inputs(), "hidden_states": torch.randn(1, 64, 64), "encoder_hidden_states": torch.randn(1, 32, 64),
              "pooled_projections": torch.randn(1, 64), "timestep": torch.full((1,), 0.5)}
    with torch.no_grad():
        transformer(**inputs)
        assert torch.isfinite(probe.loss(targets))


def test_the_change_read_out_reads_both_pictures_and_only_prompted_edits():
    torch.manual_seed(0)
    transformer = build_transformer()
    targets = object_targets(lay_out(sample_scenes(2, seed=1)), 8, 4, prompted=[True, False])
    changed = torch.zeros(2, 64, 16, dtype=torch.bool)
    changed[:, 10:12] = True
    targets = replace(targets, changed=changed)
    edit_inputs = _probe_inputs(tokens=128)  # 64 edited-picture tokens, then the input picture's 64
    plain = ObjectProbe(transformer, cells_per_token=4)
    transformer(**edit_inputs)
    with pytest.raises(RuntimeError, match="reads_change"):
        plain.losses(targets)
    plain.detach()
    probe = ObjectProbe(transformer, cells_per_token=4, reads_change=True)
    transformer(**_probe_inputs(tokens=64))
    with pytest.raises(RuntimeError, match="input picture"):
        probe.losses(targets)
    transformer(**edit_inputs)
    losses = probe.losses(targets)
    # untrained: near chance on either side of the balanced cross-entropy
    assert losses.changed.item() == pytest.approx(0.69, rel=0.3)
    transformer.zero_grad()
    losses.changed.backward()
    assert transformer.transformer_blocks[-1].attn.to_q.weight.grad.abs().sum() > 0  # it teaches the transformer
    # the read-out is scored on the edited picture's tokens and on the input picture's: a read-out right on one
    # of them and wrong on the other is not right
    flipped = changed.clone()
    flipped[1] = ~flipped[1]  # an unprompted edit: its cells do not count
    with torch.no_grad():
        transformer(**edit_inputs)
        again = probe.losses(replace(targets, changed=flipped)).changed
    assert again.item() == pytest.approx(losses.changed.item(), rel=1e-5)
    probe.detach()
