"""What every route shares: the server's settings and its state (engine, video jobs, metrics, model card)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends
from fastapi import Request as HTTPRequest
from PIL import Image

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.server.connections import ConnectionLimits
from ditserve.entrypoints.server.errors import APIError
from ditserve.entrypoints.server.image_urls import RemoteImagePolicy, image_url_bytes
from ditserve.entrypoints.server.metrics import ServerMetrics
from ditserve.entrypoints.server.protocol import GenerationOptions, ModelCard
from ditserve.entrypoints.server.security import normalise_origin
from ditserve.entrypoints.server.uploads import (
    MAX_INPUT_IMAGES,
    check_upload_count,
    decode_blob,
    decode_permits,
    read_images,
)
from ditserve.entrypoints.server.videos import VideoJobRunner, VideoStore
from ditserve.errors import InvalidParameterError, check_text
from ditserve.models.base import InputImages, ModelKind
from ditserve.request import Request

logger = logging.getLogger(__name__)


DEFAULT_OUTPUT_DIR = Path.home() / ".cache" / "ditserve" / "server"


DEFAULT_VIDEO_TTL_S = 24 * 3600.0


@dataclass
class ServerSettings:
    #: the model's name in answers; clients may also use any of ``aliases``
    served_model_name: str
    #: clients must send ``Authorization: Bearer <api_key>`` on /v1 routes; None: no authentication
    api_key: str | None = None
    #: video jobs' database and MP4 files (used, and locked, only by servers of video models)
    output_dir: Path = field(default_factory=lambda: DEFAULT_OUTPUT_DIR)
    #: finished video jobs (rows and files) are removed this long after they ended; None keeps them
    video_ttl_s: float | None = DEFAULT_VIDEO_TTL_S
    max_body_mb: float = 32.0
    #: the address the server listens on: a Host header naming it is accepted, as are loopback names
    host: str = "127.0.0.1"
    #: other Host names accepted (``*.example.com``, or ``*`` for any: behind a proxy that checks them)
    allowed_hosts: list[str] = field(default_factory=list)
    #: web origins (``https://app.example.com``) whose pages may call the API; other pages are refused
    allowed_origins: list[str] = field(default_factory=list)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    #: other names clients may give the model (a hub id, the folder's name); /v1/models lists them all
    aliases: list[str] = field(default_factory=list)
    #: fetch http(s) image URLs (chat image_url parts, edits' url fields); data URLs are always accepted
    allow_remote_images: bool = False

    def __post_init__(self) -> None:
        try:
            self.allowed_origins = [normalise_origin(origin) for origin in self.allowed_origins]
        except ValueError as error:
            raise InvalidParameterError(f"allowed_origins: {error}", param="allowed_origins") from None

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def model_names(self) -> list[str]:
        return list(dict.fromkeys([self.served_model_name, *self.aliases]))

    @property
    def remote_images(self) -> RemoteImagePolicy:
        return RemoteImagePolicy(allowed=self.allow_remote_images, max_bytes=self.max_body_bytes)


# where a request for each kind of model goes, said when it went to another route
ROUTES_OF_KIND = {ModelKind.IMAGE: "POST /v1/images/generations or /v1/chat/completions",
                  ModelKind.EDIT: "POST /v1/images/edits or /v1/chat/completions",
                  ModelKind.VIDEO: "POST /v1/videos or /v1/chat/completions"}


class ServerState:
    """What the routes share: the engine, the settings, the video jobs, the metrics, the model card."""

    def __init__(self, engine: DiffusionEngine, settings: ServerSettings, store: VideoStore | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.kind: ModelKind = engine.adapter.kind
        self.defaults = engine.adapter.resolve_params(OmniDiffusionSamplingParams())
        self.metrics = ServerMetrics(engine.queue_depth)
        #: video jobs exist only on servers of video models; the others neither need nor lock the folder
        self.store: VideoStore | None = None
        self.videos: VideoJobRunner | None = None
        if self.kind is ModelKind.VIDEO:
            self.store = store if store is not None else VideoStore(settings.output_dir)
            self.videos = VideoJobRunner(engine, self.store)
        elif store is not None:
            store.close()
        self.created = int(time.time())
        self.decoding = asyncio.Semaphore(decode_permits(engine.config.limits.max_image_size))
        #: ids of the requests this server is waiting on: a client's X-Request-Id must name one request at a time
        self.in_flight: set[str] = set()

    def accepted_uploads(self) -> int:
        """How many input images this model takes, known before any upload is decoded. The rule is the
        adapters' ``validate_inputs`` (edit and image-to-video models take images, up to ``max_input_images``;
        the others none), which judges the decoded images again in ``make_request``."""
        adapter = self.engine.adapter
        if adapter.input_images is InputImages.NONE:
            return 0
        most = adapter.max_input_images
        return MAX_INPUT_IMAGES if most is None else min(most, MAX_INPUT_IMAGES)

    async def read_uploads(self, uploads: list[Any], field: str) -> list[Image.Image]:
        check_upload_count(uploads, field, self.accepted_uploads(), self.settings.served_model_name, self.kind)
        return await read_images(uploads, field, self.engine.config.limits.max_image_size, self.decoding,
                                 self.engine.adapter.input_image_mode.value)

    async def read_image_urls(self, urls: list[tuple[str, str]]) -> list[Image.Image]:
        """Images given as (field, URL) pairs, fetched (data URLs decoded) one at a time and then decoded; the
        caller has counted them (``check_upload_count``)."""
        images = []
        for name, url in urls:
            data = await image_url_bytes(url, name, self.settings.remote_images)
            images.append(await decode_blob(data, name, self.engine.config.limits.max_image_size, self.decoding,
                                            self.engine.adapter.input_image_mode.value))
        return images

    def auto_size(self, images: list[Image.Image]) -> dict[str, int]:
        """``size=auto`` for an edit: the size the model picks for these inputs (their aspect ratio at its pixel
        budget, in its multiple), shrunk to fit ``--max-image-size`` when it is over; {} keeps the model's own
        choice untouched."""
        adapter = self.engine.adapter
        if not adapter.takes_output_size:
            # the model sizes its output from the input itself (and refuses a size)
            return {}
        chosen = adapter.complete_params(Request(prompt="", params=self.defaults, images=images))
        width, height, limit = chosen.width, chosen.height, self.engine.config.limits.max_image_size
        if not width or not height or max(width, height) <= limit:
            return {}
        scale, multiple = limit / max(width, height), adapter.size_multiple
        return {"width": max(multiple, int(width * scale) // multiple * multiple),
                "height": max(multiple, int(height * scale) // multiple * multiple)}

    def check_texts(self, prompt: str, fields: GenerationOptions) -> None:
        """The engine's text limits, checked before uploads are decoded (``make_request`` checks them again)."""
        limits = self.engine.config.limits
        check_text("prompt", prompt, limits.max_prompt_chars)
        if fields.negative_prompt is not None:
            check_text("negative_prompt", fields.negative_prompt, limits.max_negative_prompt_chars)

    def model_cards(self) -> list[ModelCard]:
        d = self.defaults
        size = f"{d.width}x{d.height}" if d.width and d.height else "auto"
        return [ModelCard(id=name, created=self.created, kind=self.kind.value,
                          default_size=size, default_num_inference_steps=d.num_inference_steps,
                          default_num_frames=d.num_frames if self.kind is ModelKind.VIDEO else None)
                for name in self.settings.model_names]

    def check_model(self, model: str | None) -> None:
        names = self.settings.model_names
        if model is not None and model not in names:
            raise APIError(404, f"model {model!r} is not served here; this server serves {names[0]!r}"
                                + (f" (also named {names[1:]})" if len(names) > 1 else ""),
                           param="model", code="model_not_found")

    def require_kind(self, kind: ModelKind, route: str) -> None:
        if self.kind is kind:
            return
        raise APIError(400, f"{route} needs {kind.with_article} model; {self.settings.served_model_name!r} is "
                            f"{self.kind.with_article} model: use {ROUTES_OF_KIND[self.kind]}", param="model",
                       code="unsupported_for_model")


def get_state(request: HTTPRequest) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]
