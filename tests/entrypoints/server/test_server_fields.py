"""Request fields beyond the first release: OpenAI's standard fields (honoured where they mean something here,
otherwise accepted and named in ``ignored_fields``), the mirrored system's fields (passed to the engine, or a
400 naming them when this server cannot honour them), and fields nobody defines (still a 400)."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import httpx
import openai
import pytest
from PIL import Image

from ditserve.entrypoints.server.thread import ServerThread

SMALL = {"prompt": "a dot", "size": "64x64", "num_inference_steps": 1, "seed": 11}
Connect = Callable[..., openai.OpenAI]


def generate(server: ServerThread, **fields: object) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/images/generations", json={**SMALL, **fields}, timeout=60)


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, (response.status_code, response.text[:300])
    return response.json()


def assert_400(response: httpx.Response, param: str, *words: str) -> None:
    assert response.status_code == 400, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert error["param"] == param, error
    assert all(word in error["message"] for word in words), error


def test_openai_fields_without_meaning_are_accepted_and_named(image_server: ServerThread) -> None:
    plain = ok(generate(image_server))
    assert plain["ignored_fields"] is None
    body = ok(generate(image_server, user="u-1", quality="hd", style="vivid", moderation="low", stream=False,
                       background="opaque"))
    assert body["ignored_fields"] == ["user", "quality", "style", "moderation"]
    assert body["data"][0]["b64_json"] == plain["data"][0]["b64_json"]  # they changed nothing


def test_prompt_mode_fields_are_accepted_and_named(image_server: ServerThread) -> None:
    # the mirrored system's knobs for a prompt-reasoning stage (HunyuanImage-3), which no model here has
    plain = ok(generate(image_server))
    sent = {"bot_task": "think", "use_system_prompt": "en_unified", "sys_type": "en_vanilla",
            "system_prompt": "You are an artist."}
    body = ok(generate(image_server, **sent))
    assert body["ignored_fields"] == list(sent)
    assert body["data"][0]["b64_json"] == plain["data"][0]["b64_json"]  # they changed nothing
    # a preset the mirrored system does not define is refused there too
    assert_400(generate(image_server, use_system_prompt="en_bogus"), "use_system_prompt")


def test_output_compression_shrinks_jpeg_and_is_named_ignored_for_png(image_server: ServerThread) -> None:
    low = ok(generate(image_server, output_format="jpeg", output_compression=5))
    high = ok(generate(image_server, output_format="jpeg", output_compression=95))
    assert len(low["data"][0]["b64_json"]) < len(high["data"][0]["b64_json"]) and low["ignored_fields"] is None
    assert ok(generate(image_server, output_compression=50))["ignored_fields"] == ["output_compression"]


@pytest.mark.parametrize("spelling, expected", [("jpg", "JPEG"), ("PNG", "PNG"), ("WebP", "WEBP")])
def test_output_format_is_case_insensitive_with_jpg(image_server: ServerThread, spelling: str,
                                                    expected: str) -> None:
    body = ok(generate(image_server, output_format=spelling))
    assert Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).format == expected


def test_response_format_file_answers_the_image_bytes(image_server: ServerThread) -> None:
    response = generate(image_server, response_format="file", output_format="webp")
    assert response.status_code == 200 and response.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(response.content)).size == (64, 64)
    assert 'filename="' in response.headers["content-disposition"]
    assert_400(generate(image_server, response_format="file", n=2), "response_format", "b64_json")


def test_refusals_name_the_field(image_server: ServerThread) -> None:
    assert_400(generate(image_server, stream=True), "stream", "not supported")
    assert_400(generate(image_server, background="transparent"), "background", "RGBA")
    assert_400(generate(image_server, n=11), "n")  # the API's ceiling, whatever --max-n says
    assert_400(generate(image_server, flow_shift=0), "flow_shift")
    assert_400(generate(image_server, layers=4), "layers", "Layered")
    assert_400(generate(image_server, resolution=640), "resolution", "Layered")
    assert_400(generate(image_server, generator_device="cuda"), "generator_device", "CPU generator")
    assert_400(generate(image_server, extra_params={"eta": 0.5}), "extra_params.eta", "named request fields")
    # a field neither OpenAI nor the mirrored system defines stays refused
    assert_400(generate(image_server, bogus_field=1), "bogus_field")


def test_accepted_mirrored_fields(image_server: ServerThread) -> None:
    plain = ok(generate(image_server))
    same = ok(generate(image_server, generator_device="cpu", extra_params={}))
    assert same["data"][0]["b64_json"] == plain["data"][0]["b64_json"]
    # a request's flow_shift reaches its own scheduler only (one step starts at sigma 1 whatever the shift: two)
    two_steps = ok(generate(image_server, num_inference_steps=2))
    shifted = ok(generate(image_server, num_inference_steps=2, flow_shift=3.0))
    assert shifted["data"][0]["b64_json"] != two_steps["data"][0]["b64_json"]
    assert ok(generate(image_server, num_inference_steps=2))["data"][0]["b64_json"] == two_steps["data"][0]["b64_json"]
    # max_sequence_length reaches the engine: FLUX's own bound answers, not the HTTP schema
    assert_400(generate(image_server, max_sequence_length=600), "max_sequence_length", "512 for FluxPipeline")


def test_n_up_to_the_server_limit(image_server: ServerThread) -> None:
    assert_400(generate(image_server, n=5), "n", "limit of 4")  # the test server's --max-n


def test_openai_client_sends_the_standard_fields(image_server: ServerThread, connect: Connect) -> None:
    result = connect(image_server).images.generate(prompt="a dot", size="64x64", user="someone", quality="high",
                                                   output_format="jpeg", output_compression=40,
                                                   extra_body={"num_inference_steps": 1})
    assert result.model_extra["ignored_fields"] == ["user", "quality"]
    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).format == "JPEG"
