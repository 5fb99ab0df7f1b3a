"""An `openai_realtime` instance's options, and the realtime URL built from its base_url."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode, urlsplit, urlunsplit

import msgspec

from spear_rt.backend import InstanceInfo
from spear_rt.errors import BackendFailure
from spear_rt.protocol.settings import Dialect

PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]


class RealtimeOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An instance's `options` (see the package docstring)."""

    dialect: Dialect = Dialect.GA
    query_model: bool = False
    connect_timeout_s: PositiveFloat = 10.0
    close_timeout_s: PositiveFloat = 2.0
    ping_interval_s: Annotated[float, msgspec.Meta(ge=0)] = 20.0
    ping_timeout_s: PositiveFloat = 20.0
    max_send_buffer_bytes: PositiveInt = 256 * 1024
    max_pending_events: PositiveInt = 256
    max_message_bytes: PositiveInt = 1 << 20
    verify_tls: bool = True
    # speech-to-speech instances: the model that transcribes the user's turns upstream
    transcription_model: str = "whisper-1"


def parse_options(instance: InstanceInfo) -> RealtimeOptions:
    """The instance's options; raises `BackendFailure` naming what is wrong."""
    try:
        return msgspec.convert(instance.options, RealtimeOptions)
    except msgspec.ValidationError as exc:
        raise BackendFailure(f"openai_realtime options: {exc}") from None


def realtime_url(base_url: str, query: dict[str, str]) -> str:
    """`base_url` as the official client turns it into its realtime URL, plus `query`."""
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise BackendFailure(f"openai_realtime: base_url must be http(s) or ws(s), got {scheme!r}")
    extra = urlencode(query)
    merged = f"{parts.query}&{extra}" if parts.query and extra else parts.query or extra
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/realtime", merged, ""))
