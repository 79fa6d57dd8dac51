from dataclasses import replace

import numpy as np
import pytest
import torch

from ditserve.demo.edit_checker import evaluate_edits, score_edit
from ditserve.demo.edit_language import EditKind, parse_instruction, sample_edits
from ditserve.demo.edit_train import edit_layouts
from ditserve.demo.language import parse_prompt
from ditserve.demo.render import rasterize, render, render_batch, to_pil
from ditserve.errors import InvalidParameterError

SOURCE = parse_prompt("a small red circle at the top left and a large blue square in the center on a black background")
INSTRUCTIONS = {
    EditKind.RECOLOR: "make the red circle green",
    EditKind.MOVE: "move the square to the bottom right",
    EditKind.REMOVE: "remove the small circle",
    EditKind.ADD: "add a small yellow triangle on the right",
    EditKind.BACKGROUND: "change the background to purple",
}


@pytest.mark.parametrize("kind", list(EditKind))
def test_true_edit_passes_and_the_unedited_input_fails(kind):
    edit = parse_instruction(INSTRUCTIONS[kind], SOURCE)
    assert edit.kind is kind
    done = score_edit(render(edit.target), edit)
    assert done.applied and done.kept and done.correct and done.target.correct
    untouched = score_edit(render(edit.source), edit)
    assert not untouched.applied and not untouched.correct


def test_an_edit_that_also_changes_something_else_is_applied_but_not_kept():
    edit = parse_instruction("make the red circle green", SOURCE)
    also_recoloured = replace(edit.target, objects=(edit.target.objects[0], replace(edit.target.objects[1], color="orange")))
    wrong = score_edit(render(also_recoloured), edit)
    assert wrong.applied and not wrong.kept and not wrong.correct
    with_extra = replace(edit.target, objects=(*edit.target.objects, parse_prompt("a small white square on the left on a black background").objects[0]))
    assert not score_edit(render(with_extra), edit).kept
    # the move keeps its object but forgets to clear the old cell: not applied
    move = parse_instruction("move the square to the bottom right", SOURCE)
    both = replace(move.target, objects=(*move.target.objects, replace(SOURCE.objects[1], color="green")))
    assert not score_edit(render(both), move).applied


def test_wrong_colour_fails_recolour():
    edit = parse_instruction("make the red circle green", SOURCE)
    wrong = parse_instruction("make the red circle yellow", SOURCE)
    assert not score_edit(render(wrong.target), edit).correct


def test_true_edits_pass_at_every_kind_with_jitter_and_inputs_fail():
    edits = sample_edits(120, seed=7, split="all")
    source, target = edit_layouts(edits, 0.04, torch.Generator().manual_seed(0))
    figures = evaluate_edits(to_pil(rasterize(target)), edits)
    assert figures["pass_rate"] >= 0.97
    assert all(figures[f"{k.value}_edits"] > 0 for k in EditKind)
    assert evaluate_edits(to_pil(rasterize(source)), edits)["pass_rate"] == 0.0


def test_jitter_moves_an_untouched_object_alike_in_both_pictures():
    edit = parse_instruction("remove the small circle", SOURCE)
    source, target = edit_layouts([edit], 0.04, torch.Generator().manual_seed(1))
    # the square is slot 1 of the source and slot 0 of the target: same jittered centre
    assert torch.equal(source.center[0, 1], target.center[0, 0])
    source_pixels = np.asarray(to_pil(rasterize(source))[0]).astype(int)
    target_pixels = np.asarray(to_pil(rasterize(target))[0]).astype(int)
    changed = np.abs(source_pixels - target_pixels).sum(-1) > 0
    assert changed.any() and not changed[40:88, 40:88].any()  # only the circle's corner changed


def test_bad_input_is_refused():
    edit = parse_instruction("remove the small circle", SOURCE)
    with pytest.raises(InvalidParameterError, match="pair up"):
        evaluate_edits([render(edit.target)], [edit, edit])
    with pytest.raises(InvalidParameterError) as error:
        score_edit(render(edit.target), "remove the small circle")
    assert error.value.param == "edit"
    with pytest.raises(InvalidParameterError, match="jitter"):
        edit_layouts([edit], 0.5, torch.Generator())
    assert render_batch([edit.target]).shape == (1, 3, 128, 128)
