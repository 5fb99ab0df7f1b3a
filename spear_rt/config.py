"""TOML config -> typed config (msgspec Structs).

Credentials are referenced by environment-variable *name*, never by value. With no file, the
embedded `default_config.toml` serves every operation from local backends. A bad file raises
`ConfigError` naming the key and the reason, so the CLI can print one line and exit 2.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import msgspec

from spear_rt.errors import ConfigError
from spear_rt.ir import Feature, Hosting, Limits, Operation, Transport

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Listener, client auth and global caps."""

    listen: str = "127.0.0.1:8787"
    client_keys_env: list[str] = msgspec.field(default_factory=list)
    admin_keys_env: list[str] = msgspec.field(default_factory=list)
    max_sessions: int = 1000
    max_sessions_per_key: int = 100
    max_frame_bytes: int = 1 << 20
    # Bytes of incomplete WebSocket frames (and fragmented messages) over all connections: a
    # connection whose partial frame would pass it is closed 1013 (refused, never queued).
    max_frame_bytes_in_flight: int = 64 << 20
    max_http_body_bytes: int = 25 << 20
    # Request-body bytes held at once over all connections; past it, 503 + Retry-After
    # (a declared Content-Length counts in full from the request head on).
    max_http_body_bytes_in_flight: int = 64 << 20
    # Where clients reach this server (e.g. "https://voice.example.com"): the base of the URLs
    # it hands out (images as `url`). Unset: http(s)://<listen address>, wildcard -> loopback.
    public_url: str | None = None
    # Browser-facing safety (server/browser.py): pages of these origins (exact
    # "scheme://host[:port]", or "*" for any) may call this server besides its own pages;
    # in open mode (no client keys) requests must name a loopback Host or one of allowed_hosts.
    allowed_origins: list[str] = msgspec.field(default_factory=list)
    allowed_hosts: list[str] = msgspec.field(default_factory=list)
    # /metrics without an admin key to any peer (default: the admin key when admin keys are
    # configured, else loopback peers only).
    metrics_open: bool = False
    handshake_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    driver: Literal["auto", "anyio"] = "auto"  # auto: asyncio gets its callback driver
    per_key_rate_per_s: float | None = None  # one-shot requests per client key
    per_key_burst: int | None = None
    # One-shot audio uploads: what one request may decode to, checked on the file's header
    # before decoding (and again while decoding); default 20 min, and 20 min at 48 kHz.
    max_audio_seconds: float = 1200.0
    max_audio_samples: int = 57_600_000
    # TLS on the same port (https:// and wss://): PEM files, read at start (server/tls.py);
    # tls_key may be left out when tls_cert holds the key too.
    tls_cert: str | None = None
    tls_key: str | None = None


class RealtimeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Per-session timeouts and queue bounds."""

    idle_timeout_s: float = 600.0
    max_session_seconds: float = 3600.0
    resume_grace_seconds: float = 30.0
    drain_deadline_s: float = 10.0  # SIGTERM: turns in flight get this long to finish
    upstream_connect_timeout_s: float = 10.0
    # A remote upstream that drops is reopened (same instance, then via the router) and its
    # unfinished turns replayed; 0 attempts: a drop ends the session.
    upstream_reconnect_attempts: int = 5
    upstream_reconnect_backoff_s: float = 0.1  # doubles per attempt, with jitter
    upstream_reconnect_max_backoff_s: float = 2.0
    upstream_replay_audio_bytes: int = 8 << 20  # audio of unfinished turns kept for a replay
    max_outbound_bytes: int = 1 << 20  # server -> client events awaiting the socket
    max_pending_audio_bytes: int = 1 << 20  # client audio awaiting the upstream
    # Per session: past events kept for a resuming client. Every session fills it over minutes
    # (deltas add ~1 kB/s), so this is also its steady memory cost; a resume needing events
    # evicted already is refused (4004), never served with a gap.
    replay_buffer_bytes: int = 256 << 10


class ConversationConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How a conversation session composes its answers (`[conversation]`, conversation.md).

    Each response is a routed streaming chat completion and, for spoken answers, one routed
    text_to_speech request per sentence. `*_model` is the model name sent (routing narrows
    to instances serving it); `*_backend` names one instance. `fallback_backend` is asked
    by name when no instance can serve a stage (the default config names the stub, whose
    answers say they are a stub).
    """

    # A session's instructions until it sets its own (shown in session.created; "" for none):
    # small local models ramble without them.
    instructions: str = (
        "You are a helpful voice assistant. Answer briefly, in one or two short sentences."
    )
    chat_model: str | None = None
    chat_backend: str | None = None
    speech_model: str | None = None
    speech_backend: str | None = None
    fallback_backend: str | None = None
    stage_timeout_s: float = 60.0  # one chat stream or one sentence's speech
    max_output_tokens: int = 1024  # a response's cap when the client sets none ("inf")
    # output events awaiting the client before the responder stops pulling chat/speech
    # (bounded in bytes: realtime.max_outbound_bytes); sentences synthesized ahead of playback:
    sentences_ahead: int = 2
    # answer audio a resuming client can get back (the replay buffer of a conversation
    # session holds at least this many seconds of 24 kHz output, bounded in bytes)
    replay_audio_seconds: float = 30.0


class BreakerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Thresholds of the circuit breaker (config section `[health.breaker]`)."""

    consecutive_failures: int = 5
    error_rate: float = 0.5
    min_requests: int = 10
    window_s: float = 10.0
    cooldown_s: float = 5.0
    max_cooldown_s: float = 60.0
    jitter: float = 0.2
    half_open_probes: int = 1
    close_after_successes: int = 2


class OutlierConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Success-rate outlier ejection (config section `[health.outlier]`)."""

    enabled: bool = True
    min_peers: int = 5  # fewer peers than this (or than 3): nobody is judged an outlier
    min_requests: int = 20
    stdev_factor: float = 1.9
    base_ejection_s: float = 30.0
    max_ejection_percent: float = 50.0


class HealthConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`[health]`: circuit breaker and outlier ejection."""

    breaker: BreakerConfig = BreakerConfig()
    outlier: OutlierConfig = OutlierConfig()
    outlier_interval_s: float = 10.0


class RetryConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[policy.retry]`: attempts per request and the retry budget (Envoy's: in flight)."""

    max_attempts: int = 3
    # Retries in flight may number max(min_retry_concurrency, budget_percent% of requests
    # in flight). None: 20%, or budget_ratio * 100 when only the old key is set.
    budget_percent: float | None = None
    min_retry_concurrency: int = 3
    # Before the in-flight budget: budget_ratio (a share) is still read; min_retries_per_s (a
    # per-second floor) has no equivalent and is refused by _check_retry with its replacement.
    budget_ratio: float | None = None
    min_retries_per_s: float | None = None

    @property
    def ratio(self) -> float:
        """The budget as a share of requests in flight (0.2 for 20%)."""
        if self.budget_percent is not None:
            return self.budget_percent / 100
        return self.budget_ratio if self.budget_ratio is not None else 0.2


class HedgeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[policy.hedge]`: hedged(k, delay_ms) for the named operations."""

    operations: list[str] = msgspec.field(default_factory=list)
    k: int = 2
    delay_ms: float = 50.0


class MirrorConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[policy.mirror]`: mirror_to(instance, sample_rate) for the named operations."""

    instance: str = ""
    sample_rate: float = 0.0
    operations: list[str] = msgspec.field(default_factory=list)
    queue: int = 64


class PolicyConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Default routing policy and per-operation overrides."""

    default: str | None = None  # None: the per-operation defaults of routing.md
    by_operation: dict[Operation, str] = msgspec.field(default_factory=dict)
    allow_request_override: bool = True  # a request may name any policy the host knows
    retry: RetryConfig = RetryConfig()
    hedge: HedgeConfig = HedgeConfig()
    mirror: MirrorConfig = MirrorConfig()


class BudgetConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`[budget]`: spend allowed per client key over a sliding window (None: unlimited)."""

    amount: float | None = None
    window_s: float = 3600.0


class MediaConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`[media]`: the content-addressed media store and the http_url host allowlist."""

    root: str = "~/.cache/spear-rt/media"  # expanded (`root_path`)
    max_bytes: int = 1 << 30
    max_age_s: float = 24 * 3600.0
    allowed_hosts: list[str] = msgspec.field(default_factory=list)  # empty: no URL fetching
    max_fetch_bytes: int = 25 << 20

    @property
    def root_path(self) -> Path:
        """`root` with ``~`` and environment variables expanded."""
        return Path(os.path.expandvars(self.root)).expanduser()


class CredentialConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A named credential: the env var that holds the key."""

    name: str
    api_key_env: str


class Price(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Declared prices of an instance, in any one currency unit (unset: not declared)."""

    per_1k_input_tokens: float | None = None
    per_1k_output_tokens: float | None = None
    per_audio_second: float | None = None
    per_image: float | None = None
    per_session_minute: float | None = None


class BackendConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One configured backend instance; unset capability fields take the kind's defaults."""

    name: str
    kind: str
    base_url: str | None = None
    hosting: Hosting | None = None
    model: str | None = None
    credential_ref: str | None = None
    weight: int = 100
    priority: int = 0
    ops: list[Operation] | None = None
    features: list[Feature] | None = None
    transports: list[Transport] | None = None
    limits: Limits | None = None
    price: Price | None = None
    options: dict[str, str | int | float | bool] = msgspec.field(default_factory=dict)
    # Serve only requests that name this instance: `spear-backend` / `spear-allow` naming it,
    # or a model equal to its name or its model (the embedded default's stub is so marked).
    only_when_named: bool = False


class ClusterConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Nodes sharing state through Redis (`[cluster]`, cluster/shared.py); unset: alone."""

    redis_url: str | None = None  # redis://host:port/db, no password in it
    redis_password_env: str | None = None  # the env var holding Redis' password
    # host:port where the other nodes reach this one (a resume is forwarded there);
    # default: the address this node listens on (needed when that is a wildcard)
    node_address: str | None = None
    key_prefix: str = "spear:"
    redis_timeout_s: float = 0.5  # one call; past it the node counts alone for that call
    # a node's sessions stay in the directory (and count against their key's cap) this long
    # after its last refresh: a node that dies holds nothing for longer
    session_ttl_s: float = 10.0
    sync_interval_s: float = 0.2  # how often breaker and ejection state is read


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The whole server config."""

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    realtime: RealtimeConfig = msgspec.field(default_factory=RealtimeConfig)
    conversation: ConversationConfig = msgspec.field(default_factory=ConversationConfig)
    policy: PolicyConfig = msgspec.field(default_factory=PolicyConfig)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    budget: BudgetConfig = msgspec.field(default_factory=BudgetConfig)
    media: MediaConfig = msgspec.field(default_factory=MediaConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
    credentials: list[CredentialConfig] = msgspec.field(default_factory=list)
    backends: list[BackendConfig] = msgspec.field(default_factory=list)
    source: str = "embedded default"

    def credential_env(self, ref: str) -> str | None:
        """The env var name behind a credential reference, or None if undeclared."""
        for cred in self.credentials:
            if cred.name == ref:
                return cred.api_key_env
        return None


def _validation_key(message: str) -> tuple[str, str]:
    """Split msgspec's 'reason - at `$.a[0].b`' into ('a[0].b', 'reason')."""
    # a bad dict key reads "reason - at `key` in `$.a.b`"
    match = re.search(r"^(.*) - at (?:`key` in )?`\$\.?(.*)`$", message)
    if match is None:
        match = re.match(r"^(Object contains unknown field `.*`)()$", message)  # top level
        if match is None:
            return "config", message
    key, reason = match.group(2) or "config", match.group(1)
    unknown = re.match(r"^Object contains unknown field `(.*)`$", reason)
    if unknown is not None:  # name the field itself, not its section
        key = f"{key}.{unknown.group(1)}" if match.group(2) else unknown.group(1)
        reason = "unknown field"
    return key, reason


def _check_public_url(url: str | None) -> None:
    if url is None:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(
            "server.public_url", "must be an http(s) URL such as 'https://voice.example.com'"
        )


def _check_origins(origins: list[str]) -> None:
    for i, origin in enumerate(origins):
        parts = urlsplit(origin)
        exact = parts.scheme in ("http", "https") and parts.netloc and origin.count("/") == 2
        if origin != "*" and not exact:
            raise ConfigError(
                f"server.allowed_origins[{i}]",
                f"{origin!r} is not an origin: use 'https://app.example.com' (no path), or '*'",
            )


def _check(config: Config) -> None:
    """Cross-field rules msgspec cannot express."""
    seen: set[str] = set()
    for i, backend in enumerate(config.backends):
        where = f"backends[{i}]"
        if not re.match(_NAME, backend.name):
            raise ConfigError(f"{where}.name", f"{backend.name!r} is not a valid instance name")
        if backend.name in seen:
            raise ConfigError(f"{where}.name", f"duplicate instance name {backend.name!r}")
        seen.add(backend.name)
        if backend.weight <= 0:
            raise ConfigError(f"{where}.weight", "must be a positive integer")
        if (
            backend.credential_ref is not None
            and config.credential_env(backend.credential_ref) is None
        ):
            declared = sorted(c.name for c in config.credentials) or ["none"]
            raise ConfigError(
                f"{where}.credential_ref",
                f"unknown credential {backend.credential_ref!r}; declared: {', '.join(declared)}",
            )
    for i, cred in enumerate(config.credentials):
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", cred.api_key_env):
            raise ConfigError(
                f"credentials[{i}].api_key_env", "must be an environment variable name"
            )
    _parse_listen(config.server.listen)
    if config.server.max_frame_bytes < 1024:
        raise ConfigError("server.max_frame_bytes", "must be at least 1024")
    if config.server.max_frame_bytes_in_flight < config.server.max_frame_bytes:
        raise ConfigError("server.max_frame_bytes_in_flight", "must be at least max_frame_bytes")
    if config.server.max_http_body_bytes_in_flight < config.server.max_http_body_bytes:
        raise ConfigError(
            "server.max_http_body_bytes_in_flight", "must be at least max_http_body_bytes"
        )
    _check_public_url(config.server.public_url)
    _check_origins(config.server.allowed_origins)
    _check_retry(config.policy.retry)
    for field in ("max_audio_seconds", "max_audio_samples"):
        if getattr(config.server, field) <= 0:
            raise ConfigError(f"server.{field}", "must be positive")
    for field in ("max_bytes", "max_age_s", "max_fetch_bytes"):
        if getattr(config.media, field) <= 0:
            raise ConfigError(f"media.{field}", "must be positive")
    _check_cluster(config.cluster, config.server.listen)


WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def _check_cluster(cluster: ClusterConfig, listen: str) -> None:
    if cluster.redis_url is None:
        return
    parts = urlsplit(cluster.redis_url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ConfigError("cluster.redis_url", "must be a URL such as 'redis://127.0.0.1:6379/0'")
    if parts.password:
        raise ConfigError(
            "cluster.redis_url",
            "holds a password: put it in an environment variable and name that variable in "
            "cluster.redis_password_env",
        )
    env = cluster.redis_password_env
    if env is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", env):
        raise ConfigError("cluster.redis_password_env", "must be an environment variable name")
    for field in ("redis_timeout_s", "session_ttl_s", "sync_interval_s"):
        if getattr(cluster, field) <= 0:
            raise ConfigError(f"cluster.{field}", "must be positive")
    if cluster.node_address is None:
        host, _port = _parse_listen(listen)
        if host in WILDCARD_HOSTS:
            raise ConfigError(
                "cluster.node_address",
                f"is needed with redis_url when listening on {listen!r}: the address other "
                "nodes reach this one at (HOST:PORT)",
            )
        return
    try:
        _parse_listen(cluster.node_address)
    except ConfigError:
        raise ConfigError(
            "cluster.node_address", f"expected HOST:PORT, got {cluster.node_address!r}"
        ) from None


def _check_retry(retry: RetryConfig) -> None:
    where = "policy.retry"
    if retry.min_retries_per_s is not None:
        raise ConfigError(
            f"{where}.min_retries_per_s",
            "replaced by min_retry_concurrency (retries in flight always allowed, default 3):"
            " the retry budget counts retries in flight, not per second",
        )
    if retry.budget_ratio is not None and retry.budget_percent is not None:
        raise ConfigError(
            f"{where}.budget_ratio", "set budget_percent only (budget_ratio is its old name)"
        )
    if not 0 <= retry.ratio * 100 <= 100_000:
        raise ConfigError(f"{where}.budget_percent", "must be between 0 and 100000")
    if retry.min_retry_concurrency < 0 or retry.max_attempts < 1:
        raise ConfigError(where, "min_retry_concurrency must be >= 0 and max_attempts >= 1")


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError("server.listen", f"expected HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_listen(config: Config) -> None:
    """Raise ConfigError when the listen address (maybe set after parsing) is not usable."""
    _parse_listen(config.server.listen)
    _check_cluster(config.cluster, config.server.listen)


def listen_address(config: Config) -> tuple[str, int]:
    """The (host, port) the server binds."""
    return _parse_listen(config.server.listen)


def parse_config(text: str, source: str) -> Config:
    """Decode and check TOML text; raises ConfigError naming the key and the reason."""
    try:
        config = msgspec.toml.decode(text.encode(), type=Config)
    except msgspec.ValidationError as exc:
        key, reason = _validation_key(str(exc))
        raise ConfigError(key, reason) from None
    except msgspec.DecodeError as exc:
        raise ConfigError("config", f"not valid TOML: {exc}") from None
    config.source = source
    _check(config)
    return config


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load a config file, or the embedded default when `path` is None."""
    if path is None:
        text = resources.files("spear_rt").joinpath("default_config.toml").read_text()
        return parse_config(text, "embedded default")
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(str(file), f"cannot read: {exc.strerror}") from None
    return parse_config(text, str(file))
