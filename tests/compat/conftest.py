"""Servers for replaying the mirrored system's (vLLM-Omni's) client request shapes: the tiny FLUX (text to
image), Qwen-Image-Edit (edits) and Wan (video) pipelines behind real uvicorn servers on 127.0.0.1, named by
hub ids as a user of that system names them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ditserve.config import OmniDiffusionConfig
from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.server import ServerSettings, create_app
from ditserve.entrypoints.server.thread import ServerThread
from ditserve.testing import tiny_pipeline_dir

LIMITS = {"max_steps": 50, "max_image_size": 64, "max_n": 10, "max_frames": 9}


def _serve(model_dir: str, names: list[str], output_dir: str) -> tuple[DiffusionEngine, ServerThread]:
    engine = DiffusionEngine(OmniDiffusionConfig(model=model_dir, max_queue_size=16, limits=LIMITS))
    settings = ServerSettings(served_model_name=names[0], aliases=names[1:], output_dir=output_dir, max_body_mb=4.0)
    return engine, ServerThread(create_app(engine, settings))


@pytest.fixture(scope="package")
def t2i_server(tiny_flux_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    engine, server = _serve(tiny_flux_dir, ["Qwen-Image", "Qwen/Qwen-Image"], str(tmp_path_factory.mktemp("t2i")))
    yield server
    server.stop()
    engine.close()


@pytest.fixture(scope="package")
def edit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    engine, server = _serve(tiny_pipeline_dir("qwen_image_edit"), ["Qwen-Image-Edit", "Qwen/Qwen-Image-Edit"],
                            str(tmp_path_factory.mktemp("edit")))
    yield server
    server.stop()
    engine.close()


@pytest.fixture(scope="package")
def video_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    engine, server = _serve(tiny_pipeline_dir("wan"), ["Wan2.2-T2V-A14B-Diffusers", "Wan-AI/Wan2.2-T2V-A14B-Diffusers"],
                            str(tmp_path_factory.mktemp("video")))
    yield server
    server.stop()
    engine.close()
