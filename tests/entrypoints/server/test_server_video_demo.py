"""The bundled video model is served by its name with no download, and answers a clip of its own language."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import av
import httpx
import numpy as np
import pytest

from ditserve.demo import DEMO_VIDEO_MODEL_NAME
from ditserve.demo.video_language import heldout_clips
from ditserve.entrypoints.server.thread import ServerThread
from ditserve.models.loader import resolve_model_path
from tests.entrypoints.server.conftest import make_engine, start


@pytest.fixture(scope="module")
def video_demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    engine = make_engine(DEMO_VIDEO_MODEL_NAME, limits={"max_steps": 50, "max_image_size": 128, "max_n": 1,
                                                        "max_frames": 9})
    server = start(engine, tmp_path_factory.mktemp("video-demo"), served_model_name=DEMO_VIDEO_MODEL_NAME)
    yield server
    server.stop()
    engine.close()


def test_the_bundled_video_model_answers_a_clip_by_name(video_demo_server: ServerThread) -> None:
    clip = heldout_clips(1)[0]
    answer = httpx.post(f"{video_demo_server.url}/v1/videos/sync",
                        json={"prompt": clip.to_prompt(), "num_inference_steps": 3, "seed": 0}, timeout=120)
    assert answer.status_code == 200, answer.text
    with av.open(io.BytesIO(answer.content)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    # the model's own size and frame count, from its ditserve_defaults.json
    assert len(frames) == 9 and frames[0].shape == (128, 128, 3)
    corners = np.stack([frame[:8, :8].reshape(-1, 3).mean(axis=0) for frame in frames])
    assert np.abs(corners - corners[0]).max() < 30  # one background through the clip, not noise


def test_the_video_model_resolves_to_its_folder() -> None:
    assert Path(resolve_model_path(DEMO_VIDEO_MODEL_NAME)).name == DEMO_VIDEO_MODEL_NAME
