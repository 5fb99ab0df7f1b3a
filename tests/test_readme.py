"""Every example in README.md runs, so the README cannot drift from the code.

The fenced blocks are discovered, not listed, so a new section is tested as soon as it exists:

* ```python: run as a script (cwd: a work dir holding `fixtures/` and any files below);
* ```bash / ```sh: every command line is checked. `spear-rt ...` is parsed by the CLI's own
  parser; `spear-rt serve` lines are started (one server per port they name, on a free port) and
  `spear-rt stream` lines are run against them; `openssl` runs in the work dir (before the
  servers start, so a README-made certificate is what a TLS server uses); `redis-server
  --port P` is started on a free port before the servers (their configs naming
  127.0.0.1:P are rewritten to it); `curl` runs with
  `--fail-with-body`; `node FILE` runs; `make T` needs a target T; `pip install -e '.[x]'` needs
  the extras; `VAR=value` prefixes and `export` lines set the environment. Anything else fails:
  teach this file to check it, or mark the block as skipped (below);
* ```toml: parsed with `spear_rt.config.parse_config`; ```json: `json.loads`;
* ```js / ```javascript: run with node (the SDK from tests/node, see tests/server/test_tls.py).

Every `127.0.0.1:PORT` / `localhost:PORT` whose port a started server was configured with is
rewritten to the port that server really got. An HTML comment on the line before a fence sets
options: `<!-- test: skip REASON -->` skips the block (say why), `<!-- test: file=NAME -->`
also writes the block to NAME in the work dir (a config for `spear-rt serve --config NAME`, a
script for `node NAME`). `SPEAR_README=path` tests another file (a README section in review).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from spear_rt.cli import build_parser
from spear_rt.config import parse_config
from tests.node_sdk import NODE_MODULES, install_node_sdk
from tests.redis_rig import free_port, wait_for_redis

ROOT = Path(__file__).resolve().parents[1]
README = Path(os.environ.get("SPEAR_README", ROOT / "README.md"))
BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 60
START_TIMEOUT_S = 30
SHELLS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```([\w+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*test:\s*(.*?)\s*-->$")
HOST_PORT = re.compile(r"(?<![\w.])(127\.0\.0\.1|localhost):(\d+)")


@dataclass
class Block:
    """One fenced code block of the README."""

    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    marker: str = ""

    @property
    def id(self) -> str:
        return f"{self.lang}-L{self.line}"

    @property
    def file(self) -> str | None:
        match = re.match(r"file=(\S+)", self.marker)
        return match.group(1) if match else None


def parse_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, with the marker comment just above each."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        above = lines[start - 1].strip() if start > 0 else ""
        marker = MARKER.match(above)
        blocks.append(
            Block(
                match.group(1).lower(),
                "\n".join(body) + "\n",
                start + 1,
                marker.group(1) if marker else "",
            )
        )
        i += 1
    return blocks


def commands(code: str) -> Iterator[str]:
    """The command lines of a shell block (continuations joined, comments and blanks dropped)."""
    joined = code.replace("\\\n", " ")
    for line in joined.splitlines():
        if line.strip() and not line.strip().startswith("#"):
            yield line.strip()


def split_env(line: str) -> tuple[dict[str, str], list[str]]:
    """`A=1 B=2 cmd args  # comment` -> ({A: 1, B: 2}, [cmd, args])."""
    argv = shlex.split(line, comments=True)
    env: dict[str, str] = {}
    while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
        name, _, value = argv.pop(0).partition("=")
        env[name] = value
    return env, argv


BLOCKS = parse_blocks(README.read_text())
TESTED = [b for b in BLOCKS if b.lang in {"python", "toml", "json", "js", "javascript", *SHELLS}]


# --- the work dir, the servers and the runs -------------------------------------------------


@dataclass
class Step:
    """One command line of a shell block, with the environment it runs in."""

    line: str
    argv: list[str]
    env: dict[str, str]


def steps(block: Block) -> list[Step]:
    """A shell block's commands in order (`export` lines set the env of those after them)."""
    env: dict[str, str] = {}
    out = []
    for line in commands(block.code):
        env_add, argv = split_env(line)
        if argv and argv[0] == "export":
            env.update(split_env(" ".join(argv[1:]))[0])
            continue
        out.append(Step(line, argv, {**env, **env_add}))
    return out


@dataclass
class Started:
    """A `spear-rt serve` line that was started: its process, the port it got, its stderr."""

    process: subprocess.Popen[str]
    port: int
    stderr: list[str]


@dataclass
class World:
    """The work dir, the started servers (by the port the README gave them), the runs."""

    root: Path
    env: dict[str, str]
    servers: dict[int, Started] = field(default_factory=dict)
    done: dict[str, str] = field(default_factory=dict)  # README line -> what was done with it
    runs: dict[str, tuple[subprocess.Popen[str], Path]] = field(default_factory=dict)

    def substitute(self, text: str) -> str:
        """Point every host:port a started server was configured with at its real port."""

        def port(match: re.Match[str]) -> str:
            server = self.servers.get(int(match.group(2)))
            return f"{match.group(1)}:{server.port}" if server else match.group(0)

        return HOST_PORT.sub(port, text)

    def launch(self, key: str, argv: list[str], env: dict[str, str]) -> None:
        """Start a command in the work dir (all run at once; `result` collects one)."""
        out = self.root / f"run_{len(self.runs)}"
        with out.with_suffix(".out").open("w") as stdout, out.with_suffix(".err").open("w") as err:
            process = subprocess.Popen(
                [self.substitute(a) for a in argv],
                cwd=self.root,
                env={**self.env, **env},
                stdout=stdout,
                stderr=err,
                text=True,
            )
        self.runs[key] = (process, out)

    def result(self, key: str) -> tuple[int, str, str]:
        """Wait for a launched command: (exit code, stdout, stderr)."""
        process, out = self.runs[key]
        dump = ""
        try:
            code = process.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
            dump = self.dump_servers()
        err = out.with_suffix(".err").read_text()
        return code, out.with_suffix(".out").read_text(), err + dump

    def dump_servers(self) -> str:
        """What the servers were doing (a run hung): their threads' stacks (SIGUSR1) and the
        end of their stderr."""
        for server in self.servers.values():
            spear = "redis-server" not in str(server.process.args)
            if spear and server.process.poll() is None:
                server.process.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        return "".join(
            f"\n--- server for port {port} (stderr, last 8000 chars):\n"
            + "".join(server.stderr)[-8000:]
            for port, server in self.servers.items()
        )

    def run_now(self, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        """Run a command in the work dir and wait for it (bounded)."""
        return subprocess.run(
            argv,
            cwd=self.root,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )


def live(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if not b.marker.startswith("skip")]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The work dir with the README's files and openssl lines done, its servers started and
    every runnable example started at once (each test then collects its own)."""
    root = tmp_path_factory.mktemp("readme")
    (root / "fixtures").symlink_to(ROOT / "fixtures")
    if any(b.lang in ("js", "javascript") for b in live(BLOCKS)) and install_node_sdk() is None:
        (root / "node_modules").symlink_to(NODE_MODULES)  # what `import 'openai'` resolves
    w = World(root, {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    files = [b for b in live(BLOCKS) if b.file is not None]
    for block in files:
        (root / str(block.file)).write_text(block.code)
    shell = [(b, step) for b in live(BLOCKS) if b.lang in SHELLS for step in steps(b)]
    for _, step in shell:
        if step.argv[:1] == ["openssl"]:
            done = w.run_now(step.argv, step.env)
            w.done[step.line] = f"exit {done.returncode}: {done.stderr[-500:]}"
    try:
        for _, step in shell:  # before the servers: their configs name it
            if step.argv[:1] == ["redis-server"]:
                _start_redis(w, step)
        for block in files:
            (root / str(block.file)).write_text(w.substitute(block.code))
        pending = [_launch_server(w, step) for _, step in shell]
        for port, process in pending:
            if port is not None and process is not None:
                w.servers[port] = _listening(process)
        for block in files:  # now with the servers' real ports
            (root / str(block.file)).write_text(w.substitute(block.code))
        _launch_examples(w, shell)
        yield w
    finally:
        everything = [*(r[0] for r in w.runs.values()), *(s.process for s in w.servers.values())]
        for process in everything:
            if process.poll() is None:
                process.terminate()
        for process in everything:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _launch_server(w: World, step: Step) -> tuple[int | None, subprocess.Popen[str] | None]:
    """Start a `spear-rt serve` line on a free port, unless its config is not in the README
    or another line serves its port already; returns (its README port, the process)."""
    if step.argv[:2] != ["spear-rt", "serve"]:
        return None, None
    args = build_parser().parse_args(step.argv[1:])
    if args.config is not None and not (w.root / args.config).exists():
        w.done[step.line] = f"parsed only: {args.config} is not a file of the README"
        return None, None
    port = _configured_port(w.root, args.config, args.listen)
    if port in w.servers or any(f"port {port}" in note for note in w.done.values()):
        w.done[step.line] = f"parsed only: port {port} is served by another line"
        return None, None
    w.done[step.line] = f"started for port {port}"
    argv = [*step.argv, "--listen", "127.0.0.1:0"]
    return port, subprocess.Popen(
        argv, cwd=w.root, env={**w.env, **step.env}, stderr=subprocess.PIPE, text=True
    )


def _start_redis(w: World, step: Step) -> None:
    """A `redis-server --port P ...` line: started on a free port instead of P (bounded wait)."""
    argv = list(step.argv)
    at = argv.index("--port") + 1
    readme_port = int(argv[at])
    argv[at] = str(free_port())
    process = subprocess.Popen(
        [*argv, "--bind", "127.0.0.1", "--dir", str(w.root)], cwd=w.root,
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    wait_for_redis(int(argv[at]), process, START_TIMEOUT_S)
    w.servers[readme_port] = Started(process, int(argv[at]), [])
    w.done[step.line] = f"started redis-server for port {readme_port}"


def _configured_port(root: Path, config: str | None, listen: str | None) -> int:
    if listen is None and config is not None:
        listen = tomllib.loads((root / config).read_text()).get("server", {}).get("listen")
    return int((listen or "127.0.0.1:8787").rpartition(":")[2])


def _listening(process: subprocess.Popen[str]) -> Started:
    """Wait for a server's 'listening on' line; keeps draining its stderr afterwards."""
    lines: queue.Queue[str | None] = queue.Queue()
    seen: list[str] = []

    def drain() -> None:  # keeps reading so that the pipe never fills
        assert process.stderr is not None
        for text in process.stderr:
            seen.append(text)
            lines.put(text)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    command = shlex.join(str(a) for a in process.args)  # type: ignore[union-attr]
    while True:
        try:
            text = lines.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            process.kill()
            raise AssertionError(f"{command} did not start: {''.join(seen)}") from None
        if text is None:
            raise AssertionError(f"{command} exited: {''.join(seen)}")
        match = re.search(r"listening on https?://\S+:(\d+)", text)
        if match:
            return Started(process, int(match.group(1)), seen)


def _launch_examples(w: World, shell: list[tuple[Block, Step]]) -> None:
    for block in live(TESTED):
        if block.lang == "python":
            script = w.root / f"readme_L{block.line}.py"
            script.write_text(w.substitute(block.code))
            w.launch(block.id, [sys.executable, str(script)], {})
        elif block.lang in ("js", "javascript") and block.file is None and _have_node():
            script = w.root / f"readme_L{block.line}.mjs"
            script.write_text(w.substitute(block.code))
            w.launch(block.id, ["node", str(script)], {})
    for block, step in shell:
        argv = step.argv
        if argv[:2] == ["spear-rt", "stream"]:
            if "--url" not in argv:  # the default URL: the server on 8787
                argv = [*argv, "--url", "ws://127.0.0.1:8787/v1/realtime?intent=transcription"]
            w.launch(f"{block.id}:{step.line}", argv, step.env)
        elif argv[:1] == ["curl"]:
            w.launch(f"{block.id}:{step.line}", [*argv, "-sS", "--fail-with-body"], step.env)
        elif argv[:1] == ["node"] and _have_node():
            w.launch(f"{block.id}:{step.line}", argv, step.env)


def _have_node() -> bool:
    return shutil.which("node") is not None and NODE_MODULES.is_dir()


# --- the tests --------------------------------------------------------------------------------


def test_the_readme_has_examples() -> None:
    langs = {b.lang for b in TESTED}
    assert {"python", "bash", "toml"} <= langs, langs


@pytest.mark.parametrize("block", TESTED, ids=[b.id for b in TESTED])
def test_readme_block(block: Block, world: World) -> None:
    """One fenced block of the README does what it says (see the module docstring)."""
    if block.marker.startswith("skip"):
        reason = block.marker.removeprefix("skip").strip()
        assert reason, f"README line {block.line}: say why the block is skipped"
        pytest.skip(reason)
    if block.lang == "toml":
        parse_config(block.code, f"README.md line {block.line}")
    elif block.lang == "json":
        json.loads(block.code)
    elif block.lang in SHELLS:
        for step in steps(block):
            _check_command(world, block, step)
    elif block.file is None:  # python, js (a js file= block is run by its `node FILE` line)
        if block.id not in world.runs:
            pytest.skip("node, or the SDK in tests/node (npm ci --prefix tests/node), is missing")
        _check_run(world, block.id, f"README line {block.line}")


def _check_run(world: World, key: str, where: str) -> None:
    code, out, err = world.result(key)
    assert code == 0, f"{where} exited {code}:\n{out}\n{err}"
    assert out.strip(), f"{where} printed nothing:\n{err}"


def _check_command(world: World, block: Block, step: Step) -> None:
    argv, where = step.argv, f"README command {step.line!r}"
    key = f"{block.id}:{step.line}"
    match argv[0]:
        case "spear-rt":
            try:
                args = build_parser().parse_args(argv[1:])
            except SystemExit:
                raise AssertionError(f"{where}: spear-rt does not accept it") from None
            if args.command == "serve":
                assert step.line in world.done, step.line  # started or parsed by `world`
                for server in world.servers.values():
                    assert server.process.poll() is None, "".join(server.stderr)
            elif args.command == "stream":
                _check_run(world, key, where)
        case "openssl":
            assert world.done[step.line].startswith("exit 0"), f"{where}: {world.done[step.line]}"
        case "redis-server":
            assert world.done[step.line].startswith("started"), where
        case "curl":
            _check_run(world, key, where)
        case "node":
            if key not in world.runs:
                pytest.skip(
                    "node, or the SDK in tests/node (npm ci --prefix tests/node), is missing"
                )
            _check_run(world, key, where)
        case "make":
            makefile = (ROOT / "Makefile").read_text()
            for target in argv[1:]:
                assert re.search(rf"(?m)^{re.escape(target)}:", makefile), f"{where}: no target"
        case "pip" | "pip3":
            extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
            for arg in argv:
                for extra in re.findall(r"\[([^\]]+)\]", arg):
                    unknown = set(extra.split(",")) - set(extras["optional-dependencies"])
                    assert not unknown, f"{where}: no extra {unknown} in pyproject.toml"
        case _:
            raise AssertionError(
                f"{where}: tests/test_readme.py cannot check {argv[0]!r}: teach it, or put "
                "<!-- test: skip REASON --> on the line above the block"
            )
