"""Rank 0 tells the other ranks what to do (run a step, stop) through the rendezvous key-value store.

Why not a collective: an idle worker would wait in it for the next request, and collectives time out (they
must, so that a dead rank cannot hang a run). A store key can be waited on for as long as the server is idle,
and the wait fails at once if rank 0's process (which hosts the store) dies. The same store carries a
worker's error report to rank 0, on one machine (spawn) or several (torchrun).

Trust: the store is a plain TCP key-value server that anyone who reaches its port can write to, and our
messages are pickles, which run code when loaded. So every value we write is sealed with an HMAC-SHA256 over
the key and the bytes, keyed by a secret made per launch (spawned workers get it through their spawn
arguments, torchrun ranks from ``DITSERVE_CONTROL_SECRET``); a reader checks the tag before it unpickles
anything, and refuses the value otherwise. The store itself listens only on the address given
(``host_store``): torch's TCPStore would otherwise listen on every interface whatever host it is given.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import pickle
import secrets
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from ditserve.errors import ParallelConfigError

#: how long an idle worker waits for the next message (it is woken by any message, including "stop")
IDLE_WAIT = timedelta(days=365)
#: the environment variable torchrun ranks read the shared control secret from (hex)
SECRET_ENV = "DITSERVE_CONTROL_SECRET"
#: bytes of a generated secret, and the fewest a given one may have (HMAC-SHA256 gains nothing beyond 32)
SECRET_BYTES = 32
MIN_SECRET_BYTES = 16
TAG_BYTES = hashlib.sha256().digest_size
CONFIG_KEY = "ditserve/config"


class ForgedMessageError(RuntimeError):
    """A store value whose tag does not match: written by someone without the launch's secret."""


class MessageKind(enum.Enum):
    STEP = "step"
    STOP = "stop"


@dataclass
class Message:
    kind: MessageKind
    #: the requests admitted before this step (``RequestSpec``)
    specs: list[Any] = field(default_factory=list)
    #: ids of resident requests dropped before this step
    drop: list[str] = field(default_factory=list)
    #: ids of the residents that run this step (None: all)
    run: list[str] | None = None


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def secret_from_env() -> bytes:
    """The control secret every torchrun rank must share; missing or short is a start-up error."""
    text = os.environ.get(SECRET_ENV, "")
    if not text:
        raise ParallelConfigError(
            f"{SECRET_ENV} is not set: under torchrun every rank needs the same control secret, e.g. "
            f"export {SECRET_ENV}=$(python -c 'import secrets; print(secrets.token_hex(32))') on every machine "
            "(see ditserve/parallel/README.md, 'Several machines')", param=SECRET_ENV)
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise ParallelConfigError(f"{SECRET_ENV} must be hex digits (e.g. secrets.token_hex(32))",
                                  param=SECRET_ENV) from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ParallelConfigError(f"{SECRET_ENV} has {len(secret)} bytes; at least {MIN_SECRET_BYTES} "
                                  f"({2 * MIN_SECRET_BYTES} hex digits) are needed", param=SECRET_ENV)
    return secret


def _tag(secret: bytes, key: str, payload: bytes) -> bytes:
    # the key is covered too: a value copied to another key (an old batch replayed as the next one) fails
    return hmac.new(secret, key.encode() + b"\0" + payload, hashlib.sha256).digest()


def put_sealed(store: Any, secret: bytes, key: str, payload: bytes) -> None:
    store.set(key, _tag(secret, key, payload) + payload)


def get_sealed(store: Any, secret: bytes, key: str) -> bytes:
    """The payload under ``key``, only if its tag is ours (checked in constant time)."""
    value = store.get(key)
    tag, payload = value[:TAG_BYTES], value[TAG_BYTES:]
    if len(tag) != TAG_BYTES or not hmac.compare_digest(tag, _tag(secret, key, payload)):
        raise ForgedMessageError(f"refused the value of {key!r} in the control store: its tag does not match this "
                                 "launch's secret (someone else wrote it); nothing of it was unpickled")
    return payload


def put_object(store: Any, secret: bytes, key: str, value: Any) -> None:
    put_sealed(store, secret, key, pickle.dumps(value))


def get_object(store: Any, secret: bytes, key: str) -> Any:
    return pickle.loads(get_sealed(store, secret, key))  # noqa: S301 - authenticated just above


def host_store(host: str, port: int, world_size: int, timeout: timedelta) -> Any:
    """Rank 0's TCPStore, listening on ``host`` only (port 0: a free one, read back from ``.port``).

    TCPStore binds every interface whatever host it is given (``ss -ltnp`` shows ``*:<port>``), so we bind
    the listening socket ourselves and hand it over; the store owns and closes it from then on."""
    family, kind, protocol, _name, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, protocol) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        bound_port = sock.getsockname()[1]
        listen_fd = sock.detach()
    try:
        return dist.TCPStore(host, bound_port, world_size, is_master=True, timeout=timeout,
                             wait_for_workers=False, master_listen_fd=listen_fd)
    except BaseException:
        os.close(listen_fd)
        raise


class ControlChannel:
    """Numbered messages from rank 0 to ``readers`` workers. The last worker to read a message deletes it:
    rank 0 cannot know when a message was read, since a step may finish on rank 0 without any collective
    (one that only drops requests), and deleting a message a late worker has not read yet would leave that
    worker waiting for it forever."""

    def __init__(self, store: Any, secret: bytes, readers: int) -> None:
        self.store = store
        self.secret = secret
        self.readers = readers
        self.count = 0

    def _key(self, index: int) -> str:
        return f"ditserve/message/{index}"

    def _read_count_key(self, index: int) -> str:
        return f"ditserve/read/{index}"

    def send(self, message: Message) -> None:
        put_object(self.store, self.secret, self._key(self.count), message)
        self.count += 1

    def receive(self) -> Message:
        key = self._key(self.count)
        self.store.wait([key], IDLE_WAIT)
        message = get_object(self.store, self.secret, key)
        if self.store.add(self._read_count_key(self.count), 1) == self.readers:
            self.store.delete_key(key)
            self.store.delete_key(self._read_count_key(self.count))
        self.count += 1
        return message


def started_key(rank: int) -> str:
    """Set by a worker once its process is up (imports done), before it joins the process group."""
    return f"ditserve/started/{rank}"


def _error_key(rank: int) -> str:
    return f"ditserve/error/{rank}"


def report_error(store: Any, secret: bytes, rank: int, text: str) -> None:
    put_sealed(store, secret, _error_key(rank), text.encode())


def reported_errors(store: Any, secret: bytes, ranks: range) -> dict[int, str]:
    """The error reports of the given ranks (those that wrote one with the launch's secret)."""
    errors = {}
    for rank in ranks:
        key = _error_key(rank)
        try:
            if store.check([key]):
                errors[rank] = get_sealed(store, secret, key).decode(errors="replace")
        except ForgedMessageError:
            errors[rank] = "(a forged error report was refused)"
        except RuntimeError:  # the store itself may be gone when everything is failing
            break
    return errors
