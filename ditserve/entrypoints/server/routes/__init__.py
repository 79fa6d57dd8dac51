"""The HTTP routes, one module per resource, each adding its routes to the app."""

from ditserve.entrypoints.server.routes import chat, images, loras, system, videos

#: in the order their routes are matched
ROUTE_MODULES = (system, loras, images, chat, videos)
