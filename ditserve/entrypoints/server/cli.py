"""``ditserve serve [MODEL]``: the OpenAI-compatible server (flags in the style of ``vllm serve --omni``)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from ditserve.entrypoints.cli import add_engine_arguments, engine_kwargs

API_KEY_ENV = "DITSERVE_API_KEY"
LOG_LEVELS = ("debug", "info", "warning", "error")
#: a folder in the Hugging Face hub cache: ``.../models--<org>--<name>/snapshots/<revision>``
HUB_CACHE_PREFIX = "models--"


def register(subparsers: Any) -> None:
    from ditserve.config import Limits
    from ditserve.entrypoints.server.connections import ConnectionLimits
    from ditserve.entrypoints.server.protocol import MAX_IMAGES_PER_REQUEST
    from ditserve.entrypoints.server.state import DEFAULT_VIDEO_TTL_S

    limits = Limits()
    connections = ConnectionLimits()
    parser = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    parser.add_argument("model", nargs="?", default=None,
                        help="diffusers folder or hub id (default: the bundled demo model)")
    # vLLM's switch from its language-model engine to the diffusion one; ditserve has only the latter
    parser.add_argument("--omni", action="store_true",
                        help="accepted for vLLM-Omni command lines: ditserve always serves a diffusion model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV})")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="the model ids clients may send, all listed by /v1/models; the first names the model "
                             "in answers (default: the folder's name and, where known, its hub id)")
    parser.add_argument("--max-batch-size", type=int, default=4,
                        help="compatible concurrent requests run together up to this many (1: no batching)")
    parser.add_argument("--max-steps", type=int, default=limits.max_steps)
    parser.add_argument("--max-image-size", type=int, default=limits.max_image_size,
                        help="largest height or width a request may ask for, or upload")
    # the API's own ceiling (OpenAI's and the mirrored system's) by default; the engine's default is lower
    parser.add_argument("--max-n", type=int, default=MAX_IMAGES_PER_REQUEST,
                        help=f"most images per request (at most {MAX_IMAGES_PER_REQUEST} over HTTP)")
    parser.add_argument("--max-frames", type=int, default=limits.max_frames)
    parser.add_argument("--max-prompt-chars", type=int, default=limits.max_prompt_chars)
    parser.add_argument("--max-negative-prompt-chars", type=int, default=limits.max_negative_prompt_chars)
    parser.add_argument("--max-body-mb", type=float, default=32.0, help="larger request bodies are refused (413)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests allowed to wait; more are refused with 429")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="video jobs' database and MP4 files, one server per folder; used by video models only "
                             "(default: ~/.cache/ditserve/server); a given folder is checked before the model loads")
    parser.add_argument("--video-ttl", type=float, default=DEFAULT_VIDEO_TTL_S / 3600,
                        help="hours a finished video job (row and MP4) is kept; 0 keeps them forever (default: 24)")
    parser.add_argument("--allowed-hosts", type=comma_list, default=[],
                        help="comma-separated Host names accepted besides localhost, 127.0.0.1, ::1 and --host "
                             "(*.example.com for sub-domains, * for any); others are refused (DNS rebinding)")
    parser.add_argument("--allowed-origins", type=comma_list, default=[],
                        help="comma-separated web origins (https://app.example.com) whose pages may call the API "
                             "(CORS); requests from other pages are refused with 403 (default: none)")
    parser.add_argument("--header-timeout", type=float, default=connections.header_timeout_s,
                        help="seconds a client has to send a complete request head; then the connection closes")
    parser.add_argument("--body-timeout", type=float, default=connections.body_timeout_s,
                        help="seconds a client has to send a whole request body; then 408")
    parser.add_argument("--timeout-keep-alive", type=int, default=connections.keep_alive_s,
                        help="seconds an idle keep-alive connection stays open")
    parser.add_argument("--limit-concurrency", type=int, default=connections.max_connections,
                        help="connections and requests served at once; more requests get 503")
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="fetch http(s) image URLs that clients send (chat image_url parts, edits' url); off: "
                             "only data URLs. The server then fetches any address a client names, its own network's "
                             "included")
    parser.add_argument("--log-level", dest="server_log_level", default=None, choices=LOG_LEVELS)
    parser.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                        help="a folder requests and /v1/loras/load may take LoRA paths from (repeatable; symlinks "
                             "are resolved first); without one, only --lora adapters can be used")
    parser.add_argument("--lora", action="append", default=[], type=name_and_path, metavar="NAME=PATH",
                        help="a LoRA loaded at start under NAME (repeatable); with --lora-backend distill, fused")
    parser.add_argument("--max-loras", type=int, default=8, help="LoRA adapters kept loaded at once (LRU)")
    parser.add_argument("--lora-backend", default="peft", choices=["peft", "distill"],
                        help="peft: LoRAs chosen per request (default); distill: --lora adapters fused at start")
    add_engine_arguments(parser)
    parser.set_defaults(func=run_serve)


def name_and_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PATH")
    return name, path


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def served_model_names(args: argparse.Namespace) -> list[str]:
    """The names clients may use: ``--served-model-name``'s, or the folder's name and the hub id it came from
    (a hub id given as MODEL, or read from a hub-cache path), so a client naming either is served."""
    if args.served_model_name:
        return list(dict.fromkeys(args.served_model_name))
    if args.model is None:
        from ditserve.demo import DEMO_MODEL_NAME

        return [DEMO_MODEL_NAME]
    path = Path(args.model.rstrip("/"))
    hub_id = hub_id_of(args.model)
    if hub_id is not None and any(part.startswith(HUB_CACHE_PREFIX) for part in path.parts):
        # a hub-cache folder is named by its revision hash: the hub id is the name, then its last part
        return list(dict.fromkeys([hub_id, hub_id.rsplit("/", 1)[-1]]))
    names = [path.name or args.model]
    if hub_id is not None:
        names.append(hub_id)
    return list(dict.fromkeys(names))


def hub_id_of(model: str) -> str | None:
    """``org/name`` when MODEL is a hub id, or a folder of the hub cache (``models--org--name/snapshots/x``)."""
    path = Path(model.rstrip("/"))
    for part in reversed(path.parts):
        if part.startswith(HUB_CACHE_PREFIX) and part.count("--") >= 2:
            return part[len(HUB_CACHE_PREFIX):].replace("--", "/", 1)
    if not path.exists() and len(path.parts) == 2 and not model.startswith((".", "/")):
        return model.rstrip("/")
    return None


def served_model_name(args: argparse.Namespace) -> str:
    return served_model_names(args)[0]


def engine_config(args: argparse.Namespace) -> Any:
    from ditserve.config import OmniDiffusionConfig

    limits = {"max_steps": args.max_steps, "max_image_size": args.max_image_size, "max_n": args.max_n,
              "max_frames": args.max_frames, "max_prompt_chars": args.max_prompt_chars,
              "max_negative_prompt_chars": args.max_negative_prompt_chars}
    named = dict(args.lora)
    # a served engine takes request paths only from --lora-dir folders: an empty list allows none
    lora = {"lora_dir": list(args.lora_dir), "max_loras": args.max_loras, "lora_backend": args.lora_backend}
    if args.lora_backend == "distill":
        lora["lora_path"] = list(named.values()) or None
    else:
        lora["loras"] = named or None
    return OmniDiffusionConfig.from_kwargs({**engine_kwargs(args), "max_batch_size": args.max_batch_size,
                                            "max_queue_size": args.max_queue, "limits": limits, **lora})


def server_settings(args: argparse.Namespace) -> Any:
    from ditserve.entrypoints.server.connections import ConnectionLimits
    from ditserve.entrypoints.server.state import DEFAULT_OUTPUT_DIR, ServerSettings
    from ditserve.errors import InvalidParameterError

    if args.max_body_mb <= 0:
        raise InvalidParameterError(f"--max-body-mb={args.max_body_mb} must be > 0", param="max_body_mb")
    if args.video_ttl < 0:
        raise InvalidParameterError(f"--video-ttl={args.video_ttl} must be >= 0 (hours; 0 keeps videos)",
                                    param="video_ttl")
    for flag in ("header_timeout", "body_timeout", "timeout_keep_alive", "limit_concurrency"):
        if getattr(args, flag) <= 0:
            raise InvalidParameterError(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be > 0", param=flag)
    connections = ConnectionLimits(header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                                   keep_alive_s=args.timeout_keep_alive, max_connections=args.limit_concurrency)
    names = served_model_names(args)
    return ServerSettings(served_model_name=names[0], aliases=names[1:], allow_remote_images=args.allow_remote_images,
                          api_key=args.api_key or None,
                          output_dir=args.output_dir or DEFAULT_OUTPUT_DIR, max_body_mb=args.max_body_mb,
                          host=args.host, allowed_hosts=args.allowed_hosts, allowed_origins=args.allowed_origins,
                          connections=connections, video_ttl_s=args.video_ttl * 3600 or None)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ditserve.engine.engine import DiffusionEngine
    from ditserve.entrypoints.server.app import create_app
    from ditserve.entrypoints.server.connections import uvicorn_options
    from ditserve.entrypoints.server.videos import VideoStore

    if args.server_log_level:
        logging.getLogger().setLevel(args.server_log_level.upper())
    settings = server_settings(args)
    # a folder given on the command line is checked (and locked) before the model loads, which takes minutes
    store = VideoStore(args.output_dir) if args.output_dir is not None else None
    try:
        engine = DiffusionEngine(engine_config(args))
    except BaseException:
        if store is not None:
            store.close()
        raise
    try:
        app = create_app(engine, settings, store)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.server_log_level or "info",
                    **uvicorn_options(settings.connections))
    finally:
        engine.close()
    return 0
