"""The forward context: which request, at which of its steps, each row of a transformer call belongs to.

Caches keep their state per request and per guidance branch, and in a step batch every request is at its own
step of its own schedule, so a hook on the transformer needs, for the call running now: the guidance branch
("cond" / "uncond"), the transformer's name, and for each request whose rows are in the batch its id, step
index and step count. The runner sets this context around every transformer call; hooks read it. A ContextVar
keeps concurrent engines in different threads apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from ditserve.request import Request


@dataclass(frozen=True)
class RowOwner:
    """One request in a transformer call: its rows are consecutive, ``num_rows`` of them (one per output)."""

    request_id: str
    step_index: int
    num_steps: int
    num_rows: int = 1
    #: the ``Request`` itself, where the caller has it: a cache that decides for a whole batch (cache-dit)
    #: asks the adapter whether the batch runs guidance
    request: Request | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ForwardContext:
    #: the requests of the call, in row order
    owners: tuple[RowOwner, ...]
    #: "cond" or "uncond"
    branch: str = "cond"
    #: name of the transformer being called (Wan2.2 A14B has "transformer" and "transformer_2")
    transformer_name: str = "transformer"
    #: set while a cache runs a block on some rows of the call only (the others reuse their residual): the rows
    #: of the whole call that the running sub-batch holds, in order; per-row LoRA layers select by it
    rows: tuple[int, ...] | None = None
    #: values derived from this context alone, computed once per call by whoever needs them (the LoRA row
    #: groups): a new call has a new context, so nothing here outlives its call
    memo: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def row_request_ids(self) -> tuple[str, ...]:
        """The request id of each row."""
        return tuple(owner.request_id for owner in self.owners for _ in range(owner.num_rows))

    @property
    def row_owners(self) -> tuple[RowOwner, ...]:
        """The owner of each row (one copy of the rows: a call that stacks copies repeats this pattern)."""
        return tuple(owner for owner in self.owners for _ in range(owner.num_rows))

    def narrowed(self, rows: list[int]) -> ForwardContext:
        """This context for a sub-batch holding ``rows`` of the call (rows of the sub-batch it narrows, if any)."""
        outer = self.rows
        selected = tuple(rows) if outer is None else tuple(outer[row] for row in rows)
        return dataclasses.replace(self, rows=selected, memo={})


_current: ContextVar[ForwardContext | None] = ContextVar("ditserve_forward_context", default=None)


def current_forward_context() -> ForwardContext | None:
    return _current.get()


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def move_current(ctx: ForwardContext) -> None:
    """Replace the context inside a ``forward_context`` block (a pipeline that runs its own loop moves on to its
    next step from a callback); the block's exit restores what was there before it."""
    if _current.get() is None:
        raise RuntimeError("move_current needs an enclosing forward_context block")
    _current.set(ctx)
