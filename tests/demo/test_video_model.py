import json

import numpy as np
from diffusers import WanPipeline

from ditserve.demo import demo_video_model_path
from ditserve.demo.evaluation import load_sampling_defaults
from ditserve.demo.video_evaluation import generate_clips
from ditserve.demo.video_language import heldout_clips
from ditserve.demo.video_model import TEMPORAL_COMPRESSION


def test_bundled_video_model_loads_with_diffusers_and_makes_a_clip():
    folder = demo_video_model_path()
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    defaults = load_sampling_defaults(folder)
    assert defaults["height"] == defaults["width"] == 128 and defaults["num_frames"] == 9
    pipe = WanPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.scale_factor_temporal == TEMPORAL_COMPRESSION
    clip = heldout_clips(1)[0]
    video = generate_clips(pipe, [clip], frames=9, num_inference_steps=3, guidance_scale=defaults["guidance_scale"])
    assert video.shape == (1, 3, 9, 128, 128)
    # even at 3 steps the frames show the prompt's background colour, the same in every frame, not noise
    corners = video[0, :, :, :8, :8].mean(dim=(2, 3))  # (3, frames): the top-left corner's colour per frame
    assert float((corners - corners[:, :1]).abs().max()) < 0.1
    assert np.isfinite(video.numpy()).all()
