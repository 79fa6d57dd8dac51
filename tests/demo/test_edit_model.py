import json

import numpy as np
import torch
from diffusers import FluxKontextPipeline

from ditserve.demo import demo_edit_model_path
from ditserve.demo.edit_evaluation import KONTEXT_SIZING, generate_edits, source_images
from ditserve.demo.edit_language import heldout_edits
from ditserve.demo.evaluation import load_sampling_defaults


def test_bundled_edit_model_loads_with_diffusers_and_edits_a_picture():
    folder = demo_edit_model_path()
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "FluxKontextPipeline"
    defaults = load_sampling_defaults(folder)
    assert defaults["height"] == defaults["width"] == 128
    assert {key: defaults[key] for key in KONTEXT_SIZING} == KONTEXT_SIZING
    pipe = FluxKontextPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    edit = heldout_edits(1)[0]
    image = generate_edits(pipe, [edit], num_inference_steps=3, true_cfg_scale=defaults["true_cfg_scale"])[0]
    assert image.size == (128, 128)
    # even at 3 steps the output follows the input picture (its background colour dominates), not noise
    source = np.asarray(source_images([edit])[0]).astype(float)
    assert np.abs(np.asarray(image).astype(float) - source).mean() < 40
    # the instruction words are single tokens of the bundled tokenizers
    assert len(pipe.tokenizer_2("remove").input_ids) == 2
    assert isinstance(pipe.transformer.x_embedder.weight, torch.nn.Parameter)
