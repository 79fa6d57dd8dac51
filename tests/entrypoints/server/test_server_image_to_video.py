"""Image-to-video over HTTP: ``/v1/videos`` and ``/v1/videos/sync`` with an ``input_reference`` upload on a Wan2.2
I2V-A14B server give the video the engine makes offline from the same image, prompt and seed."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.media import video_bytes
from ditserve.entrypoints.server.thread import ServerThread
from ditserve.testing import tiny_pipeline_dir
from tests.entrypoints.server.conftest import make_engine, start
from tests.entrypoints.server.test_server_video_forms import frames_of, wait_done

FIELDS = {"prompt": "a ball", "size": "32x32", "num_frames": "5", "fps": "4", "num_inference_steps": "2",
          "seed": "6"}


@pytest.fixture(scope="module")
def i2v_engine() -> Iterator[DiffusionEngine]:
    engine = make_engine(tiny_pipeline_dir("wan_i2v_a14b"), limits={"max_steps": 400, "max_image_size": 64,
                                                                    "max_n": 1, "max_frames": 9})
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def i2v_server(i2v_engine: DiffusionEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    server = start(i2v_engine, tmp_path_factory.mktemp("i2v-server"))
    yield server
    server.stop()


def offline_mp4(engine: DiffusionEngine, png: bytes) -> bytes:
    """The same request run by the engine directly, encoded as the server encodes it."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    params = OmniDiffusionSamplingParams(height=32, width=32, num_frames=5, fps=4, num_inference_steps=2, seed=6)
    request = engine.make_request("a ball", params, [image])
    output = engine.generate([request])[0]
    return video_bytes(output.videos[0], output.fps)


#: mean |difference| (of 255) above which two decoded MP4s show different videos: another input image moves it by
#: about 8. The same video decodes identically (the encoder runs without mbtree, see media.video_bytes)
DIFFERENT_VIDEO_MEAN = 2.0


def mean_difference(first: list[np.ndarray], second: list[np.ndarray]) -> float:
    assert len(first) == len(second)
    return float(np.abs(np.stack(first).astype(int) - np.stack(second).astype(int)).mean())


def upload(data: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("input_reference", ("first.png", data, "image/png"))]


def test_video_job_with_an_input_reference_equals_the_offline_run(i2v_server: ServerThread, i2v_engine: DiffusionEngine,
                                                                 png: Callable[..., bytes]) -> None:
    first = png(48, 40, 1)
    created = httpx.post(f"{i2v_server.url}/v1/videos", data=FIELDS, files=upload(first), timeout=60)
    assert created.status_code == 200, created.text
    job = wait_done(i2v_server, created.json()["id"])
    assert job["status"] == "completed", job
    content = httpx.get(f"{i2v_server.url}/v1/videos/{job['id']}/content", timeout=60)
    assert content.status_code == 200
    frames = frames_of(content.content)
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)
    assert mean_difference(frames, frames_of(offline_mp4(i2v_engine, first))) == 0
    # the bound can fail: the same request with another first frame is further away
    assert mean_difference(frames, frames_of(offline_mp4(i2v_engine, png(48, 40, 4)))) > DIFFERENT_VIDEO_MEAN


def test_sync_video_follows_its_input_reference(i2v_server: ServerThread, png: Callable[..., bytes]) -> None:
    answers = [httpx.post(f"{i2v_server.url}/v1/videos/sync", data=FIELDS, files=upload(png(32, 32, seed)),
                          timeout=60) for seed in (2, 3)]
    assert all(a.status_code == 200 and a.headers["content-type"] == "video/mp4" for a in answers), answers[0].text
    first, second = (np.stack(frames_of(a.content)).astype(int) for a in answers)
    assert np.abs(first - second).max() > 15  # the image reached the model


def test_a_missing_input_reference_is_a_400_naming_it(i2v_server: ServerThread) -> None:
    for route in ("/v1/videos", "/v1/videos/sync"):
        response = httpx.post(f"{i2v_server.url}{route}", data=FIELDS, timeout=60)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "input_reference"
        assert "input image" in response.json()["error"]["message"]


def test_two_input_references_are_refused(i2v_server: ServerThread, png: Callable[..., bytes]) -> None:
    response = httpx.post(f"{i2v_server.url}/v1/videos", data=FIELDS, files=upload(png(32, 32, 0)) + upload(png()),
                          timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "input_reference"
    assert "at most 1" in response.json()["error"]["message"]


def test_the_model_card_says_video(i2v_server: ServerThread) -> None:
    (card,) = httpx.get(f"{i2v_server.url}/v1/models", timeout=30).json()["data"]
    assert card["kind"] == "video" and card["default_num_frames"] == 81


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_json_input_reference_as_a_data_url_equals_the_upload(i2v_server: ServerThread,
                                                              png: Callable[..., bytes]) -> None:
    first = png(48, 40, 4)
    uploaded = httpx.post(f"{i2v_server.url}/v1/videos/sync", data=FIELDS, files=upload(first), timeout=60)
    as_json = {**FIELDS, "num_frames": 5, "fps": 4, "num_inference_steps": 2, "seed": 6,
               "input_reference": data_url(first)}
    answered = httpx.post(f"{i2v_server.url}/v1/videos/sync", json=as_json, timeout=60)
    assert uploaded.status_code == answered.status_code == 200, answered.text
    assert mean_difference(frames_of(uploaded.content), frames_of(answered.content)) == 0


def test_json_input_reference_must_be_a_data_url_string(i2v_server: ServerThread, video_server: ServerThread,
                                                        png: Callable[..., bytes]) -> None:
    as_json = {"prompt": "a ball", "size": "32x32", "num_frames": 5}
    for reference, message in (({"url": "x"}, "data URL string"), ("not a url", "input_reference")):
        response = httpx.post(f"{i2v_server.url}/v1/videos", json={**as_json, "input_reference": reference},
                              timeout=60)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "input_reference" and message in response.text
    # a text-to-video model takes none, in JSON as in a form
    response = httpx.post(f"{video_server.url}/v1/videos", json={**as_json, "input_reference": data_url(png())},
                          timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "input_reference"
    assert "takes no input image" in response.text


def test_chat_with_an_image_url_part_equals_the_video_route(i2v_server: ServerThread,
                                                            png: Callable[..., bytes]) -> None:
    first = png(32, 32, 5)
    fields = {"width": 32, "height": 32, "num_frames": 5, "fps": 4, "num_inference_steps": 2, "seed": 6}
    content = [{"type": "text", "text": "a ball"}, {"type": "image_url", "image_url": {"url": data_url(first)}}]
    response = httpx.post(f"{i2v_server.url}/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": content}], "extra_body": fields}, timeout=60)
    assert response.status_code == 200, response.text
    (part,) = response.json()["choices"][0]["message"]["content"]
    assert part["type"] == "video_url"
    mp4 = base64.b64decode(part["video_url"]["url"].partition(",")[2])
    sync = httpx.post(f"{i2v_server.url}/v1/videos/sync", json={"prompt": "a ball", **fields,
                                                               "input_reference": data_url(first)}, timeout=60)
    assert sync.status_code == 200
    assert mean_difference(frames_of(mp4), frames_of(sync.content)) == 0


def test_image_reference_is_the_first_frame_in_json_and_forms(i2v_server: ServerThread,
                                                                png: Callable[..., bytes]) -> None:
    """The mirrored system's typed ``image_reference`` ({"image_url": ...}; in a form, the same object as JSON
    text) gives the video the same first frame as an ``input_reference`` upload."""
    first = png(48, 40, 4)
    uploaded = httpx.post(f"{i2v_server.url}/v1/videos/sync", data=FIELDS, files=upload(first), timeout=60)
    reference = {"image_url": data_url(first)}
    as_json = {**FIELDS, "num_frames": 5, "fps": 4, "num_inference_steps": 2, "seed": 6, "image_reference": reference}
    in_json = httpx.post(f"{i2v_server.url}/v1/videos/sync", json=as_json, timeout=60)
    in_form = httpx.post(f"{i2v_server.url}/v1/videos/sync", data={**FIELDS, "image_reference": json.dumps(reference)},
                         timeout=60)
    assert uploaded.status_code == in_json.status_code == in_form.status_code == 200, (in_json.text, in_form.text)
    frames = frames_of(uploaded.content)
    assert mean_difference(frames, frames_of(in_json.content)) == 0
    assert mean_difference(frames, frames_of(in_form.content)) == 0
    # and it really reached the model: another image makes another video
    other = {**as_json, "image_reference": {"image_url": data_url(png(48, 40, 5))}}
    moved = httpx.post(f"{i2v_server.url}/v1/videos/sync", json=other, timeout=60)
    assert mean_difference(frames, frames_of(moved.content)) > DIFFERENT_VIDEO_MEAN


def test_image_reference_refusals_name_the_field(i2v_server: ServerThread, png: Callable[..., bytes]) -> None:
    as_json = {"prompt": "a ball", "size": "32x32", "num_frames": 5}
    url = data_url(png())
    cases = [({"image_reference": {"file_id": "file-1"}}, "image_reference.file_id", "no uploaded files"),
             ({"image_reference": {}}, "image_reference", "exactly one"),
             ({"image_reference": {"image_url": url}, "input_reference": url}, "image_reference", "not both")]
    for extra, param, words in cases:
        response = httpx.post(f"{i2v_server.url}/v1/videos", json={**as_json, **extra}, timeout=60)
        assert response.status_code == 400, response.text[:300]
        error = response.json()["error"]
        assert error["param"] == param and words in error["message"], error
    both = httpx.post(f"{i2v_server.url}/v1/videos", data={**FIELDS, "image_reference": json.dumps({"image_url": url})},
                      files=upload(png()), timeout=60)
    assert both.status_code == 400 and both.json()["error"]["param"] == "image_reference", both.text[:300]
