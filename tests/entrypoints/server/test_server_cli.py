"""``ditserve serve``: flags become the engine config and server settings; the server runs and closes."""

from __future__ import annotations

from typing import Any

import pytest

from ditserve.entrypoints.cli import build_parser
from ditserve.entrypoints.server import cli as serve_cli


def parse(*argv: str) -> Any:
    return build_parser().parse_args(["serve", *argv])


def test_flags_become_engine_limits_and_settings(tiny_flux_dir: str, tmp_path: Any) -> None:
    args = parse(tiny_flux_dir, "--max-steps", "3", "--max-image-size", "96", "--max-n", "2", "--max-frames", "9",
                 "--max-batch-size", "1", "--max-queue", "5", "--max-body-mb", "0.5", "--output-dir", str(tmp_path),
                 "--served-model-name", "mine", "--api-key", "k", "--cache-backend", "tea_cache",
                 "--cache-config", '{"rel_l1_thresh": 0.2}', "--port", "9001", "--log-level", "debug")
    config = serve_cli.engine_config(args)
    assert (config.limits.max_steps, config.limits.max_image_size, config.limits.max_n,
            config.limits.max_frames) == (3, 96, 2, 9)
    assert (config.max_batch_size, config.max_queue_size) == (1, 5)
    assert config.cache_backend == "tea_cache" and config.cache_config == {"rel_l1_thresh": 0.2}
    settings = serve_cli.server_settings(args)
    assert settings.served_model_name == "mine" and settings.api_key == "k"
    assert settings.max_body_bytes == 512 * 1024 and settings.output_dir == tmp_path
    assert (args.host, args.port, args.server_log_level) == ("127.0.0.1", 9001, "debug")


def test_vllm_omni_recipe_flags_reach_the_engine(tiny_flux_dir: str) -> None:
    # the mirrored system's recipes: `vllm serve MODEL --omni --flow-shift 1.0 --boundary-ratio 1.0 ...`
    args = parse(tiny_flux_dir, "--omni", "--port", "8098", "--flow-shift", "1.0", "--boundary-ratio", "0.9",
                 "--enforce-eager")
    config = serve_cli.engine_config(args)
    assert (config.flow_shift, config.boundary_ratio, config.enforce_eager) == (1.0, 0.9, True)


def test_defaults_name_the_folder_and_read_the_key_from_the_environment(
        tiny_flux_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DITSERVE_API_KEY", "from-env")
    args = parse(tiny_flux_dir + "/")
    assert serve_cli.served_model_name(args) == "flux"
    assert serve_cli.server_settings(args).api_key == "from-env"
    assert serve_cli.served_model_name(parse()) == "ditserve-shapes"  # no MODEL: the bundled demo


def test_bad_limits_are_one_line_errors(tiny_flux_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    from ditserve.entrypoints.cli import main

    assert main(["serve", tiny_flux_dir, "--max-body-mb", "0"]) == 2
    assert "max-body-mb" in capsys.readouterr().err
    assert main(["serve", tiny_flux_dir, "--max-steps", "0"]) == 2
    assert "max_steps" in capsys.readouterr().err


def test_serve_runs_uvicorn_over_the_app_and_closes_the_engine(
        tiny_flux_dir: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn
    from fastapi.testclient import TestClient

    seen: dict[str, Any] = {}

    def fake_run(app: Any, **kwargs: Any) -> None:
        seen.update(kwargs)
        with TestClient(app, base_url="http://localhost") as http:  # the Host a local client sends
            seen["models"] = http.get("/v1/models").json()
        seen["engine"] = app.state.server.engine

    monkeypatch.setattr(uvicorn, "run", fake_run)
    args = parse(tiny_flux_dir, "--port", "8123", "--output-dir", str(tmp_path))
    assert serve_cli.run_serve(args) == 0
    assert seen["port"] == 8123 and seen["host"] == "127.0.0.1"
    # the connection limits reach uvicorn, with their stated defaults
    assert (seen["limit_concurrency"], seen["timeout_keep_alive"], seen["h11_max_incomplete_event_size"]) == (
        256, 5, 16384)
    assert seen["http"].header_timeout_s == 15.0
    assert seen["models"]["data"][0]["id"] == "flux"
    with pytest.raises(Exception, match="closed"):
        seen["engine"].submit(seen["engine"].make_request("x"))


def test_text_limits_and_video_retention_flags(tmp_path: Any) -> None:
    args = parse("--max-prompt-chars", "100", "--max-negative-prompt-chars", "50", "--video-ttl", "0.5")
    config = serve_cli.engine_config(args)
    assert (config.limits.max_prompt_chars, config.limits.max_negative_prompt_chars) == (100, 50)
    assert serve_cli.server_settings(args).video_ttl_s == 1800
    assert serve_cli.server_settings(parse("--video-ttl", "0")).video_ttl_s is None  # 0 keeps them
    assert serve_cli.server_settings(parse()).video_ttl_s == 24 * 3600
