"""The OpenAI-compatible HTTP server (``ditserve serve``)."""

from ditserve.entrypoints.server.app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
