"""``/v1/chat/completions`` for diffusion models: the last user message is the prompt and its ``image_url``
parts the input images; generation fields at the top level or nested in ``extra_body``; the answer is a chat
completion whose message holds one ``image_url`` data URL per image."""

from __future__ import annotations

import base64
import http.server
import io
import threading
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
from PIL import Image

from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.server.thread import ServerThread

Connect = Callable[..., openai.OpenAI]
Png = Callable[..., bytes]
SMALL = {"size": "64x64", "num_inference_steps": 1, "seed": 5}


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def image_of(url: str) -> Image.Image:
    header, _, payload = url.partition(",")
    assert header.startswith("data:image/") and header.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def chat(server: ServerThread, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60)


def assert_400(response: httpx.Response, param: str | None, *words: str) -> dict:
    assert response.status_code == 400, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error
    return error


def test_openai_client_chat_makes_n_images_as_data_urls(image_server: ServerThread, connect: Connect) -> None:
    completion = connect(image_server).chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "you draw"},
                                {"role": "user", "content": [{"type": "text", "text": "a red square"}]}],
        extra_body={**SMALL, "n": 2})
    parts = completion.choices[0].message.content
    assert isinstance(parts, list) and len(parts) == 2
    images = [image_of(part["image_url"]["url"]) for part in parts]
    assert [image.size for image in images] == [(64, 64)] * 2 and images[0].format == "PNG"
    assert parts[0]["image_url"]["url"] != parts[1]["image_url"]["url"]
    extra = completion.model_extra or {}
    assert extra["seed"] == 5 and extra["timings"]["denoise_s"] > 0 and "cache_stats" in extra
    assert completion.object == "chat.completion" and completion.choices[0].finish_reason == "stop"


def test_nested_extra_body_equals_flattened_fields(image_server: ServerThread) -> None:
    message = [{"role": "user", "content": "a blue dot"}]
    nested = chat(image_server, {"messages": message, "extra_body": SMALL})
    flat = chat(image_server, {"messages": message, **SMALL})
    assert nested.status_code == 200, nested.text
    url = nested.json()["choices"][0]["message"]["content"][0]["image_url"]["url"]
    assert url == flat.json()["choices"][0]["message"]["content"][0]["image_url"]["url"]
    # the same field twice with two values is ambiguous: refused, naming it
    clash = chat(image_server, {"messages": message, "seed": 1, "extra_body": {**SMALL, "seed": 2}})
    assert clash.status_code == 400 and "extra_body.seed" in clash.json()["error"]["message"]


def test_prompt_is_the_last_user_message(image_server: ServerThread) -> None:
    def first_image(messages: list[dict]) -> str:
        response = chat(image_server, {"messages": messages, **SMALL})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"][0]["image_url"]["url"]

    last = first_image([{"role": "user", "content": "a cat"}, {"role": "assistant", "content": "ok"},
                        {"role": "user", "content": "a dog"}])
    assert last == first_image([{"role": "user", "content": "a dog"}])
    assert last != first_image([{"role": "user", "content": "a cat"}])


def test_image_format_and_compression(image_server: ServerThread) -> None:
    def jpeg(**fields: object) -> tuple[bytes, dict]:
        response = chat(image_server, {"messages": [{"role": "user", "content": "x"}], **SMALL, **fields})
        assert response.status_code == 200, response.text
        body = response.json()
        url = body["choices"][0]["message"]["content"][0]["image_url"]["url"]
        assert url.startswith("data:image/jpeg;base64,")
        return base64.b64decode(url.partition(",")[2]), body

    small, body = jpeg(image_format="jpg", output_compression=5)
    large, _ = jpeg(output_format="JPEG", output_compression=95)
    assert len(small) < len(large) and body["ignored_fields"] is None
    refused = chat(image_server, {"messages": [{"role": "user", "content": "x"}], **SMALL, "image_format": "png",
                                  "output_format": "webp"})
    assert_400(refused, "image_format")


def test_chat_fields_without_meaning_are_accepted_and_named(image_server: ServerThread) -> None:
    message = [{"role": "user", "content": "x"}]
    plain = chat(image_server, {"messages": message, **SMALL}).json()
    sent = {"user": "u", "temperature": 0.7, "top_p": 0.9, "max_tokens": 10, "max_completion_tokens": 10,
            "modalities": ["image"], "presence_penalty": 0.1, "frequency_penalty": 0.1, "stop": ["\n"],
            "logprobs": False, "stream_options": {"include_usage": True}, "store": False, "metadata": {"k": "v"}}
    chatty = chat(image_server, {"messages": message, **SMALL, **sent}).json()
    assert chatty["ignored_fields"] == list(sent)
    assert chatty["choices"] == plain["choices"]
    # neither OpenAI nor the mirrored system defines it: still refused, by name
    assert_400(chat(image_server, {"messages": message, "guidance_rescale": 0.7}), "guidance_rescale")


def test_return_stage_metrics_adds_the_stage_durations(image_server: ServerThread) -> None:
    # the mirrored system's serving benchmark (--return-stage-metrics) reads metrics.stage_durations and
    # metrics.peak_memory_mb, both as numbers
    message = [{"role": "user", "content": "x"}]
    plain = chat(image_server, {"messages": message, **SMALL}).json()
    assert plain["metrics"] is None
    body = chat(image_server, {"messages": message, "extra_body": {**SMALL, "return_stage_metrics": True}}).json()
    metrics = body["metrics"]
    assert set(metrics["stage_durations"]) == {"encode", "denoise", "decode"}
    assert metrics["stage_durations"]["denoise"] == body["timings"]["denoise_s"] > 0
    assert metrics["peak_memory_mb"] == 0.0  # a CPU server measured no accelerator memory
    assert body["ignored_fields"] is None and body["choices"] == plain["choices"]


def test_prompt_mode_fields_in_extra_body_are_named(image_server: ServerThread) -> None:
    body = chat(image_server, {"messages": [{"role": "user", "content": "x"}],
                               "extra_body": {**SMALL, "bot_task": "think", "use_system_prompt": "dynamic"}})
    assert body.status_code == 200, body.text[:300]
    assert body.json()["ignored_fields"] == ["bot_task", "use_system_prompt"]


def test_stream_is_a_clear_400(image_server: ServerThread, connect: Connect) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        connect(image_server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                      stream=True)
    assert raised.value.body["param"] == "stream" and "not supported" in raised.value.body["message"]


@pytest.mark.parametrize("messages, param", [
    ([{"role": "system", "content": "only a system message"}], "messages"),
    ([{"role": "user", "content": [{"type": "text", "text": "  "}]}], "messages[0].content"),
])
def test_messages_without_a_prompt_are_400(image_server: ServerThread, messages: list, param: str) -> None:
    assert_400(chat(image_server, {"messages": messages}), param)


def test_input_images_go_to_edit_models_only(image_server: ServerThread, edit_server: ServerThread,
                                            png: Png) -> None:
    content = [{"type": "text", "text": "make it red"},
               {"type": "image_url", "image_url": {"url": data_url(png(64, 32))}}]
    message = [{"role": "user", "content": content}]
    assert_400(chat(image_server, {"messages": message, **SMALL}), "messages", "takes no input image")
    edited = chat(edit_server, {"messages": message, "num_inference_steps": 1, "seed": 3})
    assert edited.status_code == 200, edited.text
    # no size: the input's 2:1 aspect ratio, shrunk to the server's 64-pixel limit
    out = image_of(edited.json()["choices"][0]["message"]["content"][0]["image_url"]["url"])
    assert out.size == (64, 32)
    assert_400(chat(edit_server, {"messages": [{"role": "user", "content": "no image"}]}), "image")


@pytest.mark.parametrize("url, code", [
    ("data:image/png,notbase64", "invalid_image_url"),
    ("data:image/png;base64,@@@", "invalid_image_url"),
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "invalid_image"),
    ("ftp://example.com/a.png", "invalid_image_url"),
    ("http://127.0.0.1:9/a.png", "remote_images_disabled"),
    ("https://[not-a-host/a.png", "remote_images_disabled"),
])
def test_bad_image_urls_are_400_naming_the_part(edit_server: ServerThread, url: str, code: str) -> None:
    content = [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}]
    error = assert_400(chat(edit_server, {"messages": [{"role": "user", "content": content}]}),
                       "messages[0].content[1].image_url")
    assert error["code"] == code


@pytest.fixture(scope="module")
def png_site(png: Png) -> Iterator[str]:
    """A loopback web server with /in.png, /big.png (over 4 MiB) and /moved (a redirect)."""
    small = png(64, 64, 9)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/in.png")
                self.end_headers()
                return
            body = small if self.path == "/in.png" else b"\0" * (5 * 1024 * 1024)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()


@pytest.fixture(scope="module")
def remote_edit_server(tmp_path_factory: pytest.TempPathFactory, serve: Callable[..., ServerThread],
                       edit_server: ServerThread) -> Iterator[ServerThread]:
    engine: DiffusionEngine = edit_server.app.state.server.engine
    server = serve(engine, tmp_path_factory.mktemp("remote"), allow_remote_images=True)
    yield server
    server.stop()


def test_remote_images_with_the_flag_have_limits(remote_edit_server: ServerThread, png_site: str) -> None:
    def edit(url: str) -> httpx.Response:
        content = [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}]
        return chat(remote_edit_server, {"messages": [{"role": "user", "content": content}], **SMALL})

    assert edit(f"{png_site}/in.png").status_code == 200
    assert_400(edit(f"{png_site}/moved"), "messages[0].content[1].image_url", "HTTP 302")
    assert_400(edit(f"{png_site}/big.png"), "messages[0].content[1].image_url", "over 4194304 bytes")
    # httpx refuses these before connecting, with an error that is no HTTPError
    assert_400(edit("http://[::1/a.png"), "messages[0].content[1].image_url", "InvalidURL")


def test_chat_on_a_video_model_answers_an_mp4_video_url(video_server: ServerThread) -> None:
    fields = {"width": 32, "height": 32, "num_frames": 5, "fps": 4, "num_inference_steps": 1, "seed": 8}
    response = chat(video_server, {"messages": [{"role": "user", "content": "a ball"}], "extra_body": fields})
    assert response.status_code == 200, response.text
    (part,) = response.json()["choices"][0]["message"]["content"]
    assert part["type"] == "video_url" and part["video_url"]["url"].startswith("data:video/mp4;base64,")
    mp4 = base64.b64decode(part["video_url"]["url"].partition(",")[2])
    sync = httpx.post(f"{video_server.url}/v1/videos/sync", json={"prompt": "a ball", **fields}, timeout=60)
    assert sync.status_code == 200 and mp4 == sync.content
    # input images: this text-to-video model takes none
    content = [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}]
    assert_400(chat(video_server, {"messages": [{"role": "user", "content": content}]}), "messages",
               "takes no input image")


def test_video_fields_on_an_image_model_meet_its_rules(image_server: ServerThread) -> None:
    response = chat(image_server, {"messages": [{"role": "user", "content": "x"}], **SMALL, "num_frames": 5})
    assert_400(response, "num_frames", "only for video models")
