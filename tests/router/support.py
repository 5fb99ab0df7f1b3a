"""Builders for router tests: instances from TOML without I/O, requests, a fake clock.

Instances come from a small in-test backend kind (every operation, http + websocket, no
features unless configured), so nothing is imported by entry point and nothing is opened.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

from spear_rt.backend import InstanceDefaults, InstanceInfo
from spear_rt.config import Config, parse_config
from spear_rt.ir import (
    CanonicalRequestEnvelope,
    Feature,
    Operation,
    RequestMeta,
    RequestRequirements,
    RoutingHints,
    Transport,
)
from spear_rt.registry import BackendRegistry, RegisteredInstance
from spear_rt.router import Router

CHAT = Operation.CHAT_COMPLETIONS
STT = Operation.SPEECH_TO_TEXT


class FakeKind:
    """A backend kind that serves every operation over http and websocket, in no process."""

    name = "fake"
    extra = None
    defaults = InstanceDefaults(
        ops=frozenset(Operation), transports=frozenset({Transport.HTTP, Transport.WEBSOCKET})
    )

    def unavailable_reason(self, instance: InstanceInfo) -> str | None:
        return None


class FakeClock:
    """Seconds that only move when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def table(header: str, fields: Mapping[str, object]) -> str:
    """One TOML table; nested mappings become `[header.key]` sub-tables after the scalars."""
    lines = [header]
    subs = []
    for key, value in fields.items():
        if isinstance(value, Mapping):
            subs.append((key, value))
        else:
            lines.append(f"{key} = {toml_value(value)}")
    text = "\n".join(lines) + "\n"
    name = header.strip("[]")
    for key, value in subs:
        text += table(f"[{name}.{key}]", value)
    return text


def backend(name: str, **fields: object) -> str:
    """A [[backends]] table of the fake kind; `limits={...}`, `price={...}` become sub-tables."""
    return table("[[backends]]", {"name": name, "kind": "fake", **fields})


def config(*backends: str, **sections: Mapping[str, object]) -> Config:
    """A config from sections (`policy={...}`, `health={...}`, ...) and backend tables."""
    text = "".join(table(f"[{name}]", fields) for name, fields in sections.items())
    return parse_config(text + "".join(backends), "test")


def registry(
    *backends: str,
    environ: Mapping[str, str] | None = None,
    previous: BackendRegistry | None = None,
    **sections: Mapping[str, object],
) -> BackendRegistry:
    """A registry of fake-kind instances."""
    return BackendRegistry.build(
        config(*backends, **sections),
        loader=lambda _: FakeKind(),  # type: ignore[arg-type, return-value]
        environ=environ or {},
        previous=previous,
    )


def router(
    reg: BackendRegistry, clock: FakeClock | None = None, seed: int = 0, **kwargs: Any
) -> Router:
    """A router with a seeded RNG (and a fake clock when given)."""
    if clock is not None:
        kwargs["clock"] = clock
    return Router(reg, rng=random.Random(seed), **kwargs)


def request(
    op: Operation = CHAT,
    *,
    features: Iterable[Feature] = (),
    transports: Iterable[Transport] = (),
    policy: str | None = None,
    key: str | None = None,
    request_id: str = "req_1",
    task_id: str | None = None,
    **routing: Any,
) -> CanonicalRequestEnvelope:
    """A request for `op`; keyword arguments go to its RoutingHints."""
    return CanonicalRequestEnvelope(
        request_id=request_id,
        operation=op,
        task_id=task_id,
        policy=policy,
        meta=RequestMeta(client_key_id=key),
        routing=RoutingHints(**routing),
        requirements=RequestRequirements(
            required_features=frozenset(features), required_transports=frozenset(transports)
        ),
    )


def names(instances: Iterable[RegisteredInstance]) -> list[str]:
    return [i.name for i in instances]
