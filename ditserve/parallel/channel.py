"""Rank 0 tells the other ranks what to do (run a step, stop) through the rendezvous key-value store.

Why not a collective: an idle worker would wait in it for the next request, and collectives time out (they
must, so that a dead rank cannot hang a run). A store key can be waited on for as long as the server is idle,
and the wait fails at once if rank 0's process (which hosts the store) dies. The same store carries a
worker's error report to rank 0, on one machine (spawn) or several (torchrun).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

#: how long an idle worker waits for the next message (it is woken by any message, including "stop")
IDLE_WAIT = timedelta(days=365)


@dataclass
class Message:
    #: "step" or "stop"
    kind: str
    #: the requests admitted before this step (``RequestSpec``)
    specs: list[Any] = field(default_factory=list)
    #: ids of resident requests dropped before this step
    drop: list[str] = field(default_factory=list)
    #: ids of the residents that run this step (None: all)
    run: list[str] | None = None


class ControlChannel:
    def __init__(self, store: Any) -> None:
        self.store = store
        self.count = 0

    def _key(self, index: int) -> str:
        return f"ditserve/message/{index}"

    def send(self, message: Message) -> None:
        self.store.set(self._key(self.count), pickle.dumps(message))
        if self.count:
            # every rank read the previous message before the step it carried could finish
            self.store.delete_key(self._key(self.count - 1))
        self.count += 1

    def receive(self) -> Message:
        key = self._key(self.count)
        self.store.wait([key], IDLE_WAIT)
        self.count += 1
        return pickle.loads(self.store.get(key))


def started_key(rank: int) -> str:
    """Set by a worker once its process is up (imports done), before it joins the process group."""
    return f"ditserve/started/{rank}"


def report_error(store: Any, rank: int, text: str) -> None:
    store.set(f"ditserve/error/{rank}", text.encode())


def reported_errors(store: Any, ranks: range) -> dict[int, str]:
    """The error reports of the given ranks (those that wrote one)."""
    errors = {}
    for rank in ranks:
        key = f"ditserve/error/{rank}"
        try:
            if store.check([key]):
                errors[rank] = store.get(key).decode()
        except RuntimeError:  # the store itself may be gone when everything is failing
            break
    return errors
