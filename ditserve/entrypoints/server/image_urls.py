"""Input images given as URLs (chat ``image_url`` parts, the ``url`` fields of edits): data URLs always;
http(s) URLs only when the operator starts the server with ``--allow-remote-images``, and then fetched with a
size cap, a time limit and no redirects.

Why remote images are off by default: fetching a URL a client chose makes the server a proxy into whatever
network it sits in (its loopback and private addresses included). An operator who turns them on accepts that;
the README says so.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from dataclasses import dataclass

import httpx

from ditserve.entrypoints.server.errors import APIError

DATA_SCHEME = "data:"
REMOTE_SCHEMES = ("http://", "https://")
BASE64_MARKER = ";base64"
#: seconds a remote image may take to arrive, in all (connection, redirects refused, body)
REMOTE_IMAGE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RemoteImagePolicy:
    """Whether http(s) image URLs are fetched, and the limits of one fetch."""

    allowed: bool = False
    max_bytes: int = 32 * 1024 * 1024
    timeout_s: float = REMOTE_IMAGE_TIMEOUT_S


def data_url_bytes(url: str, field: str) -> bytes:
    """The bytes of a base64 ``data:`` URL (the image format is checked when it is decoded)."""
    header, separator, payload = url.partition(",")
    if not separator or not header.endswith(BASE64_MARKER):
        raise APIError(400, f"{field}: a data URL must be base64, like 'data:image/png;base64,<data>'",
                       param=field, code="invalid_image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{field}: the data URL's payload is not valid base64", param=field,
                       code="invalid_image_url") from None


async def remote_image_bytes(url: str, field: str, policy: RemoteImagePolicy) -> bytes:
    """GET ``url`` (no redirects) and return at most ``policy.max_bytes`` of it; every failure is a 400."""

    async def fetch() -> bytes:
        async with httpx.AsyncClient(follow_redirects=False, timeout=policy.timeout_s) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise APIError(400, f"{field}: fetching the image URL answered HTTP {response.status_code} "
                                        "(redirects are not followed)", param=field, code="invalid_image_url")
                received = bytearray()
                async for chunk in response.aiter_bytes():
                    received.extend(chunk)
                    if len(received) > policy.max_bytes:
                        raise APIError(400, f"{field}: the remote image is over {policy.max_bytes} bytes",
                                       param=field, code="invalid_image_url")
                return bytes(received)

    try:
        return await asyncio.wait_for(fetch(), policy.timeout_s)
    except asyncio.TimeoutError:  # not the builtin before Python 3.11
        raise APIError(400, f"{field}: the remote image did not arrive within {policy.timeout_s:g} s",
                       param=field, code="invalid_image_url") from None
    except (httpx.HTTPError, httpx.InvalidURL) as error:  # InvalidURL is no HTTPError
        raise APIError(400, f"{field}: the image URL could not be fetched ({type(error).__name__})",
                       param=field, code="invalid_image_url") from None


async def image_url_bytes(url: str, field: str, policy: RemoteImagePolicy) -> bytes:
    if url.startswith(DATA_SCHEME):
        return data_url_bytes(url, field)
    if url.lower().startswith(REMOTE_SCHEMES):
        if not policy.allowed:
            raise APIError(400, f"{field}: remote image URLs are off on this server; send the image as a data URL "
                                "(data:image/png;base64,...) or start the server with --allow-remote-images",
                           param=field, code="remote_images_disabled")
        return await remote_image_bytes(url, field, policy)
    raise APIError(400, f"{field}: an image URL must be a data URL (data:image/png;base64,...) or http(s)",
                   param=field, code="invalid_image_url")
