"""Exception types of ditserve.

Every error a user can cause is one of these: a subclass of ``ValueError`` or ``TypeError`` (so callers that
already catch those keep working) whose message names the field and what is allowed. The HTTP server maps them
to 4xx answers in OpenAI's error shape.
"""

from __future__ import annotations

from collections.abc import Iterable


class DitServeError(Exception):
    """Base of every error raised on purpose by ditserve."""

    #: the request field the error is about, when there is one (the server reports it as ``param``)
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        if param is not None:
            self.param = param


class InvalidParameterError(DitServeError, ValueError):
    """A value is outside what is allowed (wrong range, unknown name, missing input...)."""


class InvalidTypeError(DitServeError, TypeError):
    """A value has the wrong type."""


class UnknownKeyError(InvalidParameterError):
    """A config or params mapping holds keys we do not know: never silently ignored."""

    def __init__(self, where: str, unknown: Iterable[str], allowed: Iterable[str]) -> None:
        unknown_sorted = sorted(unknown)
        super().__init__(
            f"unknown {where} key(s) {unknown_sorted}; allowed: {sorted(allowed)}",
            param=unknown_sorted[0] if unknown_sorted else None,
        )


class ModelNotFoundError(InvalidParameterError):
    """The model path or id does not point to a diffusers-format folder we can read."""


class UnsupportedModelError(InvalidParameterError):
    """The model exists but ditserve cannot run it (or cannot run a requested feature on it)."""


class CacheConfigError(InvalidParameterError):
    """A cache backend was asked for with a bad config, or on a model it cannot serve."""


class ParallelConfigError(InvalidParameterError):
    """An invalid multi-device configuration."""


class LoRAError(InvalidParameterError):
    """A LoRA that cannot be used: unknown name, unreadable or unsupported file, or targets and shapes that do
    not fit the model. The message names the LoRA; nothing of it was applied."""

    param = "lora"


class LoRAPathError(LoRAError):
    """A LoRA path outside the allowed folders (``lora_dir``); the server answers 403."""


class LoRAInUseError(LoRAError):
    """The LoRA cannot be unloaded: requests that use it are waiting or running; the server answers 409."""


class RequestAbortedError(DitServeError):
    """The request was aborted (by the caller or a disconnecting client) before it finished."""


class EngineClosedError(DitServeError):
    """The engine was closed or its workers died; it accepts no more requests."""


class QueueFullError(DitServeError):
    """The engine's queue is at its limit; the server answers 429."""


class LoRACapacityError(QueueFullError):
    """Every LoRA slot (``max_loras``) holds an adapter that waiting or running requests use; retry later (429)."""

    param = "lora"


def check_choice(field: str, value: object, allowed: Iterable[object]) -> None:
    """Raise InvalidParameterError naming ``field`` unless ``value`` is one of ``allowed``."""
    allowed_list = list(allowed)
    if value not in allowed_list:
        raise InvalidParameterError(f"{field}={value!r} is not allowed; choose one of {allowed_list}", param=field)


def check_keys(where: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """Raise UnknownKeyError if ``given`` has keys outside ``allowed``."""
    allowed_set = set(allowed)
    unknown = set(given) - allowed_set
    if unknown:
        raise UnknownKeyError(where, unknown, allowed_set)


def check_text(field: str, value: str, max_chars: int) -> None:
    """A text field within its length limit and encodable as UTF-8 (tokenizers, SQLite and JSON all need that:
    a lone surrogate such as "\\ud800" passes for a ``str`` but fails deep inside them)."""
    if len(value) > max_chars:
        raise InvalidParameterError(f"{field} has {len(value)} characters; the limit is {max_chars}", param=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidParameterError(
            f"{field} is not valid Unicode text: character {error.start} is {value[error.start]!r}, a lone surrogate, "
            "which cannot be encoded as UTF-8", param=field) from None
