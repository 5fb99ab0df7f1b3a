"""Config loading: defaults, every kind of bad file names its key, and the CLI exits 2 on one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from spear_rt.config import listen_address, load_config, parse_config
from spear_rt.errors import ConfigError
from spear_rt.ir import Hosting, Operation

GOOD = """
[server]
listen = "0.0.0.0:9000"
client_keys_env = ["SPEAR_RT_CLIENT_KEY"]
max_sessions = 5

[realtime]
idle_timeout_s = 30.0

[policy]
default = "least_inflight"
[policy.by_operation]
speech_to_text = "least_inflight"

[[credentials]]
name = "openai"
api_key_env = "OPENAI_API_KEY"

[[backends]]
name = "openai-us"
kind = "stub"
hosting = "remote"
credential_ref = "openai"
weight = 80
priority = 10
ops = ["speech_to_text"]
features = ["supports_stream"]
transports = ["websocket"]
[backends.limits]
max_concurrency = 64
"""


def test_a_full_config_decodes_into_typed_sections() -> None:
    """Every section of the documented example lands in its typed field."""
    config = parse_config(GOOD, "good.toml")
    assert config.source == "good.toml"
    assert listen_address(config) == ("0.0.0.0", 9000)
    assert config.server.client_keys_env == ["SPEAR_RT_CLIENT_KEY"]
    assert config.server.max_sessions == 5
    assert config.realtime.idle_timeout_s == 30.0
    assert config.policy.by_operation == {Operation.SPEECH_TO_TEXT: "least_inflight"}
    (backend,) = config.backends
    assert backend.hosting is Hosting.REMOTE
    assert backend.limits is not None and backend.limits.max_concurrency == 64
    assert config.credential_env("openai") == "OPENAI_API_KEY"


def test_embedded_default_loads_and_serves_from_local_backends() -> None:
    """No file: the embedded default, loopback only, with the stub among its backends."""
    config = load_config(None)
    assert config.source == "embedded default"
    assert listen_address(config)[0] == "127.0.0.1"
    assert "stub" in [b.kind for b in config.backends]
    assert config.server.client_keys_env == []


def test_ipv6_listen_address() -> None:
    """[::1]:PORT parses to host ::1."""
    config = parse_config('[server]\nlisten = "[::1]:8080"\n', "x")
    assert listen_address(config) == ("::1", 8080)


STUB = '[[backends]]\nname = "a"\nkind = "stub"\n'


@pytest.mark.parametrize(
    ("toml", "key", "words"),
    [
        ('[server]\nlisten_addr = "x"\n', "server.listen_addr", ["unknown field"]),
        ("bogus = 1\n", "bogus", ["unknown field"]),
        ('[server]\nmax_sessions = "many"\n', "server.max_sessions", ["int", "str"]),
        (
            '[[backends]]\nname = "a"\nkind = "stub"\nops = ["speech_to_txt"]\n',
            "backends[0].ops[0]",
            ["speech_to_txt"],
        ),
        (
            '[[backends]]\nname = "a"\nkind = "stub"\nhosting = "cloud"\n',
            "backends[0].hosting",
            ["cloud"],
        ),
        ('[policy.by_operation]\nchat = "least_inflight"\n', "policy.by_operation", ["chat"]),
        (STUB + STUB, "backends[1].name", ["duplicate", "'a'"]),
        (STUB + 'credential_ref = "nope"\n', "backends[0].credential_ref", ["nope"]),
        ('[server]\nlisten = "localhost"\n', "server.listen", ["HOST:PORT"]),
        ('[server]\nlisten = "127.0.0.1:99999"\n', "server.listen", ["99999"]),
        ('[[backends]]\nname = "a"\n', "backends[0]", ["kind"]),
        (STUB + "weight = 0\n", "backends[0].weight", ["positive"]),
        (
            STUB + "[backends.limits]\nmax_conc = 3\n",
            "backends[0].limits.max_conc",
            ["unknown field"],
        ),
        ('[[backends]]\nname = "has space"\nkind = "stub"\n', "backends[0].name", ["has space"]),
        (
            '[[credentials]]\nname = "c"\napi_key_env = "not a var"\n',
            "credentials[0].api_key_env",
            ["environment"],
        ),
        ("[server]\nmax_frame_bytes = 10\n", "server.max_frame_bytes", ["1024"]),
        ("[server\n", "config", ["TOML"]),
        ('[cluster]\nredis_url = "http://x"\n', "cluster.redis_url", ["redis://"]),
        (
            '[cluster]\nredis_url = "redis://:hunter2@127.0.0.1:6379"\n',
            "cluster.redis_url",
            ["password", "redis_password_env"],
        ),
        (
            '[server]\nlisten = "0.0.0.0:8787"\n[cluster]\nredis_url = "redis://127.0.0.1"\n',
            "cluster.node_address",
            ["0.0.0.0:8787", "HOST:PORT"],
        ),
        (
            '[cluster]\nredis_url = "redis://127.0.0.1"\nnode_address = "nodeb"\n',
            "cluster.node_address",
            ["HOST:PORT", "nodeb"],
        ),
        (
            '[cluster]\nredis_url = "redis://127.0.0.1"\nredis_password_env = "a b"\n',
            "cluster.redis_password_env",
            ["environment"],
        ),
        (
            '[cluster]\nredis_url = "redis://127.0.0.1"\nsession_ttl_s = 0\n',
            "cluster.session_ttl_s",
            ["positive"],
        ),
    ],
)
def test_bad_config_raises_config_error_naming_the_key(
    toml: str, key: str, words: list[str]
) -> None:
    """Unknown field, wrong type, bad enum, duplicate, unknown credential, bad listen: key, why."""
    with pytest.raises(ConfigError) as info:
        parse_config(toml, "bad.toml")
    assert info.value.key == key
    for word in words:
        assert word in str(info.value)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    """A missing file: ConfigError naming the path."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.key == str(missing)


def test_a_redis_password_never_appears_in_the_error() -> None:
    """The URL's password is refused without being repeated."""
    with pytest.raises(ConfigError) as info:
        parse_config('[cluster]\nredis_url = "redis://u:hunter2@127.0.0.1"\n', "x")
    assert "hunter2" not in str(info.value)


def test_credentials_are_env_var_names_never_values() -> None:
    """A config has no field for a key value: api_key is an unknown field."""
    with pytest.raises(ConfigError) as info:
        parse_config('[[credentials]]\nname = "c"\napi_key = "sk-123"\n', "x")
    assert "api_key" in str(info.value) and "sk-123" not in str(info.value)


@pytest.mark.parametrize(
    "toml",
    [
        '[server]\nlisten_addr = "x"\n',
        '[[backends]]\nname = "a"\nkind = "no_such_kind"\n',
        '[policy]\ndefault = "no_such_policy"\n' + STUB,
    ],
)
def test_cli_serve_with_a_bad_config_prints_one_line_and_exits_2(tmp_path: Path, toml: str) -> None:
    """`spear-rt serve --config bad.toml`: one line on stderr, no traceback, exit status 2."""
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "spear_rt.cli",
            "serve",
            "--config",
            str(path),
            "--listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("spear-rt: config error: ")
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
