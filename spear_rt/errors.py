"""The one exception tree of spear_rt: every error we raise derives from `SpearError`."""

from __future__ import annotations

import msgspec

from spear_rt.ir import CanonicalError, ErrorCode, Operation

ECHO_CHARS = 64  # of a client's value quoted back in an error message


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """A client's value as it may appear in an error message: JSON (never a Python repr), cut
    to `limit` characters with its full length said, so an error never grows with its input."""
    try:
        text = msgspec.json.encode(value).decode()
    except (TypeError, ValueError, OverflowError):
        text = msgspec.json.encode(str(value)).decode()
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


class SpearError(Exception):
    """Root of every exception spear_rt raises on purpose."""


class ConfigError(SpearError):
    """A config file or section is invalid; `key` names where, the message says why."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class CanonicalFailure(SpearError):
    """An error that crosses the API as a `CanonicalError`."""

    def __init__(self, error: CanonicalError) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error

    @classmethod
    def of(
        cls,
        code: ErrorCode,
        message: str,
        *,
        retryable: bool = False,
        operation: Operation | None = None,
    ) -> CanonicalFailure:
        """Build a failure from a code and a message."""
        return cls(CanonicalError(code, message, retryable=retryable, operation=operation))


class BackendFailure(SpearError):
    """A backend failed while serving; `retryable` says whether another attempt may succeed."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status  # the upstream's HTTP status, when it gave one
        self.retry_after_s = retry_after_s
