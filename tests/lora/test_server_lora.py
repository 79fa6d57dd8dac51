"""LoRA over HTTP: the ``lora`` field of image generations, ``/v1/loras`` (list, hot load, unload) behind the API
key, and bad paths answered in OpenAI's error shape."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image

from ditserve import LoRARequest
from ditserve.config import OmniDiffusionConfig, OmniDiffusionSamplingParams
from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.server import ServerSettings, create_app
from ditserve.entrypoints.server.thread import ServerThread
from ditserve.testing.compare import max_abs_diff

API_KEY = "sk-lora-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BODY = {"prompt": "a red circle", "size": "64x64", "num_inference_steps": 3, "seed": 2}


@pytest.fixture(scope="module")
def allowed(tmp_path_factory: pytest.TempPathFactory, peft_lora, file_lora) -> Path:
    folder = tmp_path_factory.mktemp("served_loras")
    shutil.copytree(peft_lora.path, folder / "ink")
    shutil.copy(file_lora.path, folder / "chalk.safetensors")
    return folder


@pytest.fixture(scope="module")
def engine(tiny_flux_dir: str, allowed: Path, peft_lora) -> DiffusionEngine:
    config = OmniDiffusionConfig(model=tiny_flux_dir, lora_dir=[str(allowed)], max_loras=3,
                                 loras={"startup": str(peft_lora.path)})
    engine = DiffusionEngine(config)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine: DiffusionEngine, tmp_path_factory: pytest.TempPathFactory) -> ServerThread:
    app = create_app(engine, ServerSettings(served_model_name="tiny", api_key=API_KEY,
                                            output_dir=tmp_path_factory.mktemp("out")))
    with ServerThread(app) as thread:
        yield thread


def post(server: ServerThread, route: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json=body, headers=AUTH if headers is None else headers, timeout=60)


def image_of(response: httpx.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))).convert("RGB")


def test_generation_with_a_lora_equals_the_engine(server: ServerThread, engine: DiffusionEngine) -> None:
    served = image_of(post(server, "/v1/images/generations", {**BODY, "lora": {"name": "startup", "scale": 0.5}}))
    base = image_of(post(server, "/v1/images/generations", BODY))
    params = OmniDiffusionSamplingParams(height=64, width=64, num_inference_steps=3, seed=2)
    offline = engine.generate([engine.make_request("a red circle", params, lora=LoRARequest("startup"),
                                                   lora_scale=0.5)])[0].images[0]
    assert max_abs_diff(served, offline) == 0
    assert max_abs_diff(served, base) > 15


def test_a_new_lora_by_path_inside_the_folder(server: ServerThread) -> None:
    lora = {"name": "chalk", "path": "chalk.safetensors", "int_id": 7}
    image_of(post(server, "/v1/images/generations", {**BODY, "lora": lora}))
    listed = httpx.get(f"{server.url}/v1/loras", headers=AUTH).json()["data"]
    assert {"chalk", "startup"} <= {card["name"] for card in listed}
    assert next(card for card in listed if card["name"] == "chalk")["int_id"] == 7


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "link_out"])
def test_paths_outside_the_folder_are_403(server: ServerThread, allowed: Path, tmp_path: Path, path: str) -> None:
    (allowed / "link_out").unlink(missing_ok=True)
    (allowed / "link_out").symlink_to(tmp_path)
    response = post(server, "/v1/images/generations", {**BODY, "lora": {"name": "escape", "path": path}})
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["type"] == "permission_error" and error["code"] == "lora_path_not_allowed"
    assert error["param"] == "lora.path" and "'escape'" in error["message"]


def test_bad_loras_are_400_naming_the_lora(server: ServerThread, allowed: Path) -> None:
    (allowed / "broken.safetensors").write_bytes(b"not safetensors")
    cases = [({"name": "nobody"}, "'nobody' is not loaded"),
             ({"name": "broken", "path": "broken.safetensors"}, "'broken'"),
             ({"name": "bad name!"}, "lora.name"),
             ({"name": "startup", "scale": 100.0}, "lora.scale")]
    for lora, message in cases:
        response = post(server, "/v1/images/generations", {**BODY, "lora": lora})
        assert response.status_code == 400, response.text
        assert message in response.json()["error"]["message"]


def test_hot_load_and_unload_need_the_api_key(server: ServerThread) -> None:
    body = {"name": "hot", "path": "ink", "int_id": 3}
    assert post(server, "/v1/loras/load", body, headers={}).status_code == 401
    loaded = post(server, "/v1/loras/load", body)
    assert loaded.status_code == 200 and loaded.json()["name"] == "hot" and loaded.json()["rank"] == 4
    image_of(post(server, "/v1/images/generations", {**BODY, "lora": {"name": "hot"}}))
    assert post(server, "/v1/loras/unload", {"name": "hot"}, headers={}).status_code == 401
    remaining = post(server, "/v1/loras/unload", {"name": "hot"})
    assert remaining.status_code == 200 and "hot" not in {card["name"] for card in remaining.json()["data"]}
    gone = post(server, "/v1/images/generations", {**BODY, "lora": {"name": "hot"}})
    assert gone.status_code == 400
    assert post(server, "/v1/loras/load", {"name": "x", "path": "../ink"}).status_code == 403


def test_serve_flags_become_the_lora_config(tiny_flux_dir: str, tmp_path: Path) -> None:
    from ditserve.entrypoints.cli import build_parser
    from ditserve.entrypoints.server import cli as serve_cli

    def config_of(*argv: str) -> OmniDiffusionConfig:
        return serve_cli.engine_config(build_parser().parse_args(["serve", tiny_flux_dir, *argv]))

    config = config_of("--lora-dir", str(tmp_path), "--lora-dir", "/srv/b", "--lora", "ink=/srv/b/ink",
                       "--lora", "chalk=/srv/b/c.safetensors", "--max-loras", "3")
    assert config.lora_dir == [str(tmp_path), "/srv/b"] and config.max_loras == 3
    assert config.loras == {"ink": "/srv/b/ink", "chalk": "/srv/b/c.safetensors"} and config.lora_backend == "peft"
    assert config_of().lora_dir == []  # a server without --lora-dir takes no path from a client
    fused = config_of("--lora-backend", "distill", "--lora", "fast=/srv/b/lightning.safetensors")
    assert fused.lora_path == ["/srv/b/lightning.safetensors"] and fused.loras is None
    with pytest.raises(SystemExit):
        config_of("--lora", "no-equals-sign")


def test_multipart_forms_carry_the_lora_as_json() -> None:
    from ditserve.entrypoints.server.errors import APIError
    from ditserve.entrypoints.server.generation import json_form_fields
    from ditserve.entrypoints.server.protocol import ImageEditFields, VideoCreateFields, validate_fields

    form = {"prompt": "p", "n": "1", "lora": '{"name": "ink", "scale": 0.5}'}
    fields = validate_fields(ImageEditFields, json_form_fields(form), strict=False)
    assert (fields.lora.name, fields.lora.scale, fields.lora.path) == ("ink", 0.5, None)
    video = validate_fields(VideoCreateFields, json_form_fields({"prompt": "p", "lora": '{"name": "a"}'}),
                            strict=False)
    assert video.lora.name == "a"
    with pytest.raises(APIError, match="lora must be a JSON object"):
        json_form_fields({"lora": "{not json"})
    with pytest.raises(APIError) as refused:
        validate_fields(ImageEditFields, json_form_fields({**form, "lora": '{"name": "a", "x": 1}'}),
                        strict=False)
    assert refused.value.param == "lora.x"


def test_an_engine_without_lora_dir_takes_no_path_over_http(tiny_flux_dir: str, tmp_path: Path, peft_lora) -> None:
    engine = DiffusionEngine(OmniDiffusionConfig(model=tiny_flux_dir))  # offline default: lora_dir=None
    try:
        app = create_app(engine, ServerSettings(served_model_name="tiny", output_dir=tmp_path))
        with ServerThread(app) as server:
            for route, body in (("/v1/loras/load", {"name": "x", "path": str(peft_lora.path)}),
                                ("/v1/images/generations", {**BODY, "lora": {"name": "x", "path": str(peft_lora.path)}})):
                response = post(server, route, body, headers={})
                assert response.status_code == 403 and response.json()["error"]["param"] == "lora.path"
            assert httpx.get(f"{server.url}/v1/loras").json()["data"] == []
    finally:
        engine.close()
