import torch

from ditserve.demo.language import COLORS, SHAPES, SIZES, parse_prompt, sample_scenes
from ditserve.demo.model import MAX_SEQUENCE_LENGTH, build_transformer, encode_prompts
from ditserve.demo.text_pretrain import EMPTY, ParsingProbe, parse_targets, parsing_loss, scene_accuracy
from ditserve.demo.train import _with_fresh_text_inputs


def test_parse_targets_put_each_object_in_its_cell():
    scene = parse_prompt("a small red circle at the top left and a large blue triangle at the bottom on a green background")
    targets = parse_targets([scene], torch.device("cpu"))
    assert targets.cell_color[0].tolist() == [
        COLORS.index("red") + 1, *[EMPTY] * 6, COLORS.index("blue") + 1, EMPTY]
    assert targets.shape[0, 0] == SHAPES.index("circle") and targets.shape[0, 7] == SHAPES.index("triangle")
    assert targets.size[0, 0] == SIZES.index("small") and targets.size[0, 7] == SIZES.index("large")
    assert targets.background.tolist() == [COLORS.index("green")]


def _perfect_logits(targets) -> dict[str, torch.Tensor]:
    return {
        "cell_color": torch.nn.functional.one_hot(targets.cell_color, len(COLORS) + 1).float() * 10,
        "shape": torch.nn.functional.one_hot(targets.shape, len(SHAPES)).float() * 10,
        "size": torch.nn.functional.one_hot(targets.size, len(SIZES)).float() * 10,
        "background": torch.nn.functional.one_hot(targets.background, len(COLORS)).float() * 10,
    }


def test_scene_accuracy_counts_a_prompt_right_only_when_everything_is():
    targets = parse_targets(sample_scenes(8, seed=3), torch.device("cpu"))
    logits = _perfect_logits(targets)
    assert scene_accuracy(logits, targets) == 1.0
    occupied = (targets.cell_color[0] != EMPTY).nonzero()[0, 0]
    logits["shape"][0, occupied] = logits["shape"][0, occupied].roll(1)
    assert scene_accuracy(logits, targets) == 7 / 8


@torch.no_grad()
def _features(pipe, scenes):
    tokens, pooled, _ = encode_prompts(pipe, [s.to_prompt() for s in scenes], torch.device("cpu"),
                                       MAX_SEQUENCE_LENGTH)
    return tokens, pooled, parse_targets(scenes, torch.device("cpu"))


def test_bundled_text_encoders_bind_attributes_to_positions(demo_pipeline):
    """A fresh probe, trained on the frozen encoders' features of training prompts, reads held-out prompts.

    The encoders shipped before the parsing stage existed (trained only through the denoising loss) scored 9 %
    here: binding each colour, shape and size to its own position is what that stage teaches.
    """
    torch.manual_seed(0)
    train_tokens, train_pooled, train_targets = _features(demo_pipeline, sample_scenes(1024, seed=1))
    test_tokens, test_pooled, test_targets = _features(demo_pipeline, sample_scenes(256, seed=2, split="heldout"))
    probe = ParsingProbe(train_tokens.shape[-1])
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(150):
        loss = parsing_loss(probe(train_tokens, train_pooled), train_targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert scene_accuracy(probe(test_tokens, test_pooled), test_targets) >= 0.9


def test_continued_training_keeps_the_transformer_but_its_text_inputs():
    trained = build_transformer()
    fresh = _with_fresh_text_inputs(trained)
    torch.testing.assert_close(fresh.transformer_blocks[0].attn.to_q.weight, trained.transformer_blocks[0].attn.to_q.weight)
    torch.testing.assert_close(fresh.x_embedder.weight, trained.x_embedder.weight)
    assert not torch.equal(fresh.context_embedder.weight, trained.context_embedder.weight)
    assert not torch.equal(fresh.time_text_embed.text_embedder.linear_1.weight,
                           trained.time_text_embed.text_embedder.linear_1.weight)

