"""Real uvicorn servers on 127.0.0.1 (one thread each, a free port each) over tiny engines, shared per session.

Engines are built once and may back several apps (the app does not own its engine): a plain one, one behind
an API key, one with tight limits for the schema fuzzer, one without batching for the load comparison.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from PIL import Image

from ditserve.config import OmniDiffusionConfig
from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.server import ServerSettings, create_app
from ditserve.entrypoints.server.thread import ServerThread
from ditserve.testing import tiny_pipeline_dir

IMAGE_LIMITS = {"max_steps": 400, "max_image_size": 64, "max_n": 4, "max_frames": 9}
API_KEY = "sk-ditserve-test"


def make_engine(model_dir: str, max_batch_size: int = 4, limits: dict[str, int] | None = None) -> DiffusionEngine:
    return DiffusionEngine(OmniDiffusionConfig(model=model_dir, max_batch_size=max_batch_size, max_queue_size=64,
                                               limits=limits or IMAGE_LIMITS))


def start(engine: DiffusionEngine, output_dir: Path, **settings: Any) -> ServerThread:
    settings.setdefault("served_model_name", "tiny")
    settings.setdefault("max_body_mb", 4.0)
    return ServerThread(create_app(engine, ServerSettings(output_dir=output_dir, **settings)))


def random_png(width: int = 32, height: int = 32, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def png() -> Callable[..., bytes]:
    """``png(width, height, seed)``: the bytes of a random RGB PNG."""
    return random_png


def openai_client(server: ServerThread, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def connect() -> Callable[..., openai.OpenAI]:
    """``connect(server, api_key="unused")``: an official OpenAI client for a test server."""
    return openai_client


@pytest.fixture(scope="session")
def serve() -> Callable[..., ServerThread]:
    """``serve(engine, output_dir, **settings)``: start another server (stop it yourself)."""
    return start


@pytest.fixture(scope="session")
def api_key() -> str:
    return API_KEY


@pytest.fixture(scope="session")
def image_engine(tiny_flux_dir: str) -> Iterator[DiffusionEngine]:
    engine = make_engine(tiny_flux_dir)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def image_server(image_engine: DiffusionEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    server = start(image_engine, tmp_path_factory.mktemp("image-server"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def secured_server(image_engine: DiffusionEngine,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    server = start(image_engine, tmp_path_factory.mktemp("secured-server"), api_key=API_KEY)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def edit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    engine = make_engine(tiny_pipeline_dir("qwen_image_edit"))
    server = start(engine, tmp_path_factory.mktemp("edit-server"))
    yield server
    server.stop()
    engine.close()


@pytest.fixture(scope="session")
def video_engine() -> Iterator[DiffusionEngine]:
    engine = make_engine(tiny_pipeline_dir("wan"), limits={"max_steps": 400, "max_image_size": 64, "max_n": 1,
                                                         "max_frames": 9})
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def video_server(video_engine: DiffusionEngine,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    server = start(video_engine, tmp_path_factory.mktemp("video-server"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def unbatched_server(tiny_flux_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """The tiny FLUX engine again, with batching off (max_batch_size=1), for the load comparison."""
    engine = make_engine(tiny_flux_dir, max_batch_size=1)
    server = start(engine, tmp_path_factory.mktemp("unbatched-server"))
    yield server
    server.stop()
    engine.close()
