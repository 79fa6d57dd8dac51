"""The forward context: what the denoising loop is doing right now, readable by hooks on the transformer.

Caches need to know which step of how many is running, which guidance branch ("cond" / "uncond") a
transformer call belongs to, and which request each batch row belongs to, so that their state is kept per
request and per branch. The loop sets this context; hooks read it. A ContextVar keeps concurrent engines in
different threads apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class ForwardContext:
    step_index: int
    num_steps: int
    #: "cond" or "uncond"
    branch: str = "cond"
    #: request id of each batch row of the transformer input (length = batch size of one branch)
    row_request_ids: tuple[str, ...] = field(default_factory=tuple)
    #: name of the transformer being called (Wan2.2 A14B has "transformer" and "transformer_2")
    transformer_name: str = "transformer"


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


@contextlib.contextmanager
def branch_context(branch: str, transformer_name: str = "transformer") -> Iterator[ForwardContext | None]:
    """Narrow the current step's context to one guidance branch and transformer."""
    ctx = _current.get()
    if ctx is None:
        yield None
        return
    with forward_context(replace(ctx, branch=branch, transformer_name=transformer_name)) as narrowed:
        yield narrowed
