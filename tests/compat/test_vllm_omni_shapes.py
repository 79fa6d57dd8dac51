"""Requests shaped as vLLM-Omni's documented clients send them (its serving docs: chat completions, image
generation, image edit, videos), replayed against ditserve unchanged. Written by us from that documentation;
no client code is copied. Each test names the documented example it replays."""

from __future__ import annotations

import base64
import io
import re
import time
from typing import Any

import av
import httpx
import openai
from PIL import Image

from ditserve.entrypoints.server.thread import ServerThread


def png_bytes(width: int = 64, height: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url_image(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)


# ---------------------------------------------------------------------------------------------- chat completions
def test_chat_curl_with_nested_extra_body(t2i_server: ServerThread) -> None:
    """Chat Completions API, "curl / Python requests": generation fields nested in a JSON ``extra_body``."""
    response = httpx.post(f"{t2i_server.url}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "A beautiful landscape painting"}],
        "extra_body": {"num_inference_steps": 2, "seed": 42, "height": 32, "width": 64}}, timeout=60)
    assert response.status_code == 200, response.text
    url = response.json()["choices"][0]["message"]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,") and data_url_image(url).size == (64, 32)


def test_chat_openai_sdk_with_extra_body(t2i_server: ServerThread) -> None:
    """Chat Completions API, "OpenAI Python SDK": ``extra_body=`` keyword, model named by its hub id."""
    response = client(t2i_server).chat.completions.create(
        model="Qwen/Qwen-Image", messages=[{"role": "user", "content": "A beautiful landscape painting"}],
        extra_body={"num_inference_steps": 2, "seed": 42, "size": "64x64", "negative_prompt": "blurry",
                    "true_cfg_scale": 4.0})
    content = response.choices[0].message.content
    assert data_url_image(content[0]["image_url"]["url"]).size == (64, 64)
    assert response.model == "Qwen/Qwen-Image"


def test_chat_image_to_image_with_a_data_url(edit_server: ServerThread) -> None:
    """Image-to-image through chat: a text part and an ``image_url`` part with a base64 data URL."""
    image = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    response = httpx.post(f"{edit_server.url}/v1/chat/completions", json={
        "model": "Qwen/Qwen-Image-Edit",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Convert this image to watercolor style"},
                                                  {"type": "image_url", "image_url": {"url": image}}]}],
        "extra_body": {"num_inference_steps": 2, "true_cfg_scale": 4.0, "negative_prompt": "low quality",
                       "seed": 0}}, timeout=60)
    assert response.status_code == 200, response.text
    assert data_url_image(response.json()["choices"][0]["message"]["content"][0]["image_url"]["url"]).size == (64, 64)


def test_chat_text_to_video_as_the_serving_benchmark_sends_it(video_server: ServerThread) -> None:
    """The serving benchmark's default backend (chat completions) for t2v: size, frames, steps, seed and fps in
    a nested ``extra_body``; success is a 200 whose first content part is an object."""
    response = httpx.post(f"{video_server.url}/v1/chat/completions", json={
        "model": "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "messages": [{"role": "user", "content": "A cat on a bench"}],
        "extra_body": {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2, "seed": 0, "fps": 4}},
        timeout=60)
    assert response.status_code == 200, response.text
    first = response.json()["choices"][0]["message"]["content"][0]
    assert isinstance(first, dict) and first["video_url"]["url"].startswith("data:video/mp4;base64,")


# ---------------------------------------------------------------------------------------------- images
def test_image_generation_requests_json(t2i_server: ServerThread) -> None:
    """Image Generation API, "Using Python": top-level extension fields, ``n`` images."""
    response = httpx.post(f"{t2i_server.url}/v1/images/generations", json={
        "prompt": "a black and white cat wearing a princess tiara", "size": "64x64", "num_inference_steps": 2,
        "seed": 42, "n": 4, "user": "docs-example"}, timeout=60)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == 4 and Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"]))).size == (64, 64)


def test_image_generation_save_to_file(t2i_server: ServerThread) -> None:
    """Image Generation API, "Using Python save to file": ``response_format: file`` and the file name read from
    Content-Disposition."""
    response = httpx.post(f"{t2i_server.url}/v1/images/generations", json={
        "prompt": "a dragon", "size": "64x64", "seed": 42, "num_inference_steps": 2, "response_format": "file"},
        timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    match = re.search(r'filename="?(.+)"?', response.headers.get("Content-Disposition", ""))
    assert match is not None and match.group(1).rstrip('"').endswith(".png")
    assert Image.open(io.BytesIO(response.content)).format == "PNG"


def test_image_edit_curl_multipart(edit_server: ServerThread) -> None:
    """Image Edit API, "Using curl": -F model, image, prompt, size, output_format; the X-Request-Id header."""
    response = httpx.post(f"{edit_server.url}/v1/images/edits", files=[
        ("model", (None, "Qwen-Image-Edit")), ("image", ("xx.png", png_bytes(), "image/png")),
        ("prompt", (None, "this bear is wearing sportwear")), ("size", (None, "64x64")),
        ("output_format", (None, "png")), ("num_inference_steps", (None, "2"))], timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"]
    assert response.json()["data"][0]["b64_json"]


def test_image_edit_as_the_serving_benchmark_sends_it(edit_server: ServerThread) -> None:
    """The serving benchmark's ``/v1/images/edits`` endpoint: a multipart form with model, prompt, size,
    response_format, steps, seed and ``bot_task=think`` (its default), the input as an ``image`` file."""
    response = httpx.post(f"{edit_server.url}/v1/images/edits", files=[
        ("model", (None, "Qwen-Image-Edit")), ("prompt", (None, "Random prompt 0 for benchmarking")),
        ("size", (None, "64x64")), ("response_format", (None, "b64_json")), ("num_inference_steps", (None, "2")),
        ("seed", (None, "0")), ("bot_task", (None, "think")),
        ("image", ("random_image_0.png", png_bytes(), "image/png"))], timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["ignored_fields"] == ["bot_task"]
    assert Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))).size == (64, 64)


def test_chat_with_stage_metrics_as_the_serving_benchmark_asks(t2i_server: ServerThread) -> None:
    """The serving benchmark's ``--return-stage-metrics``: ``extra_body.return_stage_metrics`` and the answer's
    ``metrics.stage_durations`` / ``metrics.peak_memory_mb`` read as numbers."""
    response = httpx.post(f"{t2i_server.url}/v1/chat/completions", json={
        "model": "Qwen-Image", "messages": [{"role": "user", "content": "Random prompt 0 for benchmarking"}],
        "extra_body": {"height": 32, "width": 32, "num_inference_steps": 2, "seed": 0,
                       "return_stage_metrics": True}}, timeout=60)
    assert response.status_code == 200, response.text
    metrics = response.json()["metrics"]
    assert all(isinstance(value, float) for value in metrics["stage_durations"].values())
    assert metrics["stage_durations"] and float(metrics["peak_memory_mb"]) >= 0


def test_image_edit_openai_sdk_with_url_list(edit_server: ServerThread) -> None:
    """Image Edit API, "Using OpenAI SDK": ``image=[]``, the images in ``extra_body.url``, stream=False, jpeg
    (without the example's ``guidance_scale=1``: Qwen-Image-Edit uses true_cfg_scale, and ditserve refuses a field
    the model does not use; see the README's differences)."""
    url = "data:image/png;base64," + base64.b64encode(png_bytes(64, 32)).decode()
    result = client(edit_server).images.edit(
        image=[], model="Qwen-Image-Edit", prompt="Change the bear", size="64x64", stream=False,
        output_format="jpeg", extra_body={"url": [url], "num_inference_steps": 2, "seed": 777})
    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).format == "JPEG"


# ---------------------------------------------------------------------------------------------- videos
VIDEO_FORM = {"prompt": "A cinematic tracking shot of a mountain lake at sunrise", "width": "32", "height": "32",
              "num_frames": "5", "fps": "4", "num_inference_steps": "2", "seed": "42"}


def wait_completed(server: ServerThread, video_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = httpx.get(f"{server.url}/v1/videos/{video_id}").json()
        if job["status"] in ("completed", "failed"):
            assert job["status"] == "completed", job
            return job
        time.sleep(0.05)
    raise AssertionError(f"{video_id} did not complete")


def frame_count(mp4: bytes) -> int:
    with av.open(io.BytesIO(mp4)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_video_job_curl_poll_and_download(video_server: ServerThread) -> None:
    """Videos API, "Create a Video Job" / "Poll and Download": -F fields, jq .id, .inference_time_s."""
    created = httpx.post(f"{video_server.url}/v1/videos", files=[(k, (None, v)) for k, v in VIDEO_FORM.items()],
                         timeout=60)
    assert created.status_code == 200, created.text
    job = wait_completed(video_server, created.json()["id"])
    assert job["inference_time_s"] > 0 and job["seconds"] == "1"
    content = httpx.get(f"{video_server.url}/v1/videos/{job['id']}/content")
    assert content.status_code == 200 and frame_count(content.content) == 5


def test_video_sync_curl(video_server: ServerThread) -> None:
    """Videos API, "Synchronous Generation": -F fields, -o output.mp4."""
    response = httpx.post(f"{video_server.url}/v1/videos/sync", files=[(k, (None, v)) for k, v in VIDEO_FORM.items()],
                          timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
    assert frame_count(response.content) == 5


def test_video_urlencoded_form(video_server: ServerThread) -> None:
    """A benchmark client posting the same fields as an urlencoded form."""
    response = httpx.post(f"{video_server.url}/v1/videos/sync", data=VIDEO_FORM, timeout=60)
    assert response.status_code == 200, response.text
    assert frame_count(response.content) == 5


def test_video_job_as_the_serving_benchmark_drives_it(video_server: ServerThread) -> None:
    """The serving benchmark's ``v1/videos`` backend: every field a string in a form without files (sent
    urlencoded), then poll the job, download the content, and delete the job."""
    created = httpx.post(f"{video_server.url}/v1/videos", data=VIDEO_FORM, timeout=60)
    assert created.status_code == 200, created.text
    assert created.json()["id"] and created.json()["status"]
    job = wait_completed(video_server, created.json()["id"])
    # the benchmark compares it with 0: a number, never null
    assert isinstance(job["peak_memory_mb"], float) and job["peak_memory_mb"] >= 0
    assert frame_count(httpx.get(f"{video_server.url}/v1/videos/{job['id']}/content").content) == 5
    assert httpx.delete(f"{video_server.url}/v1/videos/{job['id']}").json()["deleted"] is True
    assert httpx.get(f"{video_server.url}/v1/videos/{job['id']}").status_code == 404


def test_video_extension_fields_as_form_strings(video_server: ServerThread) -> None:
    """Videos API extension fields: negative_prompt, guidance_scale, an empty extra_params JSON object."""
    form = {**VIDEO_FORM, "negative_prompt": "blurry", "guidance_scale": "3.0", "extra_params": "{}"}
    created = httpx.post(f"{video_server.url}/v1/videos", data=form, timeout=60)
    assert created.status_code == 200, created.text
    wait_completed(video_server, created.json()["id"])


def test_openai_sdk_still_works_on_every_route(t2i_server: ServerThread, video_server: ServerThread) -> None:
    """The OpenAI-style calls (images, models, videos) keep working next to the mirrored shapes."""
    api = client(t2i_server)
    assert {m.id for m in api.models.list().data} == {"Qwen-Image", "Qwen/Qwen-Image"}
    assert api.images.generate(model="Qwen-Image", prompt="x", size="64x64", response_format="b64_json",
                               extra_body={"num_inference_steps": 1}).data[0].b64_json
    video = client(video_server).videos.create(prompt="waves", size="32x32",
                                               extra_body={"num_frames": 5, "num_inference_steps": 1})
    wait_completed(video_server, video.id)
