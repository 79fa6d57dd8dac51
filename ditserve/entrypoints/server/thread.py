"""Run the server in a background thread of this process (tests, benchmarks, notebooks).

    with ServerThread(create_app(engine, settings)) as server:
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused").images.generate(...)
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

from ditserve.entrypoints.server.connections import ConnectionLimits, uvicorn_options


class ServerThread:
    """One uvicorn server on ``host`` and a free port; ``stop()`` runs the app's shutdown as Ctrl-C would."""

    def __init__(self, app: Any, host: str = "127.0.0.1", start_timeout_s: float = 30.0) -> None:
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        self.port: int = sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        limits = app.state.server.settings.connections if hasattr(app.state, "server") else ConnectionLimits()
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5,
                                                    **uvicorn_options(limits)))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                        name=f"ditserve-http-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
