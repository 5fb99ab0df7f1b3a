#!/usr/bin/env python3
"""One-shot bench: the same load, side by side, straight to a fake upstream, through spear_rt
and through LiteLLM proxy.

One run starts, once each:

* the anchors' fast fake OpenAI upstream (``fake_openai.py``, uvloop) on **core 1**;
* spear_rt (``spear-rt serve --loop uvloop`` and ``--loop asyncio``), each on **core 0**
  (``taskset -c 0``) with a temp config holding one ``openai_http`` instance pointed at the fake;
* LiteLLM proxy from its own venv (``bench/.venv-litellm``), on **core 0**, offline
  (``LITELLM_LOCAL_MODEL_COST_MAP=True``), with a random master key and the anchors' model list
  (``openai/fake`` -> the fake);

then, for every (kind, concurrency), runs ``wrk`` (closed loop, one thread, **core 1**, with the
fake) against each target in turn, so the rows compared at one step were measured seconds
apart under the same conditions. Kinds: ``chat`` (plain), ``stream`` (SSE) and ``emb``
(1536 floats). Per row: RPS, latency p50/p99, the added latency (target minus direct at the
same step), the server's CPU (100 = one core) and CPU ms per request, its RSS, the overhead it
reports itself (``x-spear-overhead-ms`` / ``x-litellm-overhead-duration-ms``), non-200 answers,
and **others CPU %**: CPU used during the step by processes that are not part of it (on a
shared machine, read rows with a high value with care).

Results: ``bench/results/oneshot-<time>.json`` (every row and the run's metadata), ``.md`` (the
table) and ``.png`` (RPS and added p50 per step). Every step is bounded (wrk ``--timeout 10s``,
the process killed after its duration + 30 s); servers are started with a deadline and stopped
(SIGTERM, then SIGKILL) at the end, also on failure. Only 127.0.0.1.

    bench/.venv-bench/bin/python bench/oneshot.py                 # everything, 10 s per step
    B=bench/.venv-bench/bin/python
    $B bench/oneshot.py --conc 1,16 --seconds 5 --targets direct,spear-uvloop
    $B bench/oneshot.py --replot bench/results/oneshot-YYYYmmdd-HHMMSS.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
ANCHORS = Path(os.environ.get("SPEAR_ANCHORS", "/work/shared/anchors"))
LITELLM_VENV = HERE / ".venv-litellm"
KINDS = ("chat", "stream", "emb")
TARGETS = ("direct", "spear-uvloop", "spear-asyncio", "litellm")
SERVER_CORE, LOAD_CORE = "0", "1"

# wrk script: like the anchors' post.lua, but it also keeps spear_rt's own overhead header.
LUA = r"""
local bodies = {
  chat = '{"model":"fake","messages":[{"role":"user","content":"Say hello in five words."}],' ..
    '"max_tokens":16}',
  stream = '{"model":"fake","stream":true,"messages":[{"role":"user","content":' ..
    '"Say hello in five words."}],"max_tokens":16}',
  emb = '{"model":"fake","input":"The quick brown fox jumps over the lazy dog"}',
}
local paths = { chat = "/v1/chat/completions", stream = "/v1/chat/completions",
                emb = "/v1/embeddings" }
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  kind = args[1] or "chat"
  local key = args[2]
  local headers = { ["Content-Type"] = "application/json" }
  if key and key ~= "" then headers["Authorization"] = "Bearer " .. key end
  req = wrk.format("POST", paths[kind], headers, bodies[kind])
  ov = {}
  nov = 0
  bad = 0
end
function request() return req end
function response(status, headers, body)
  if status ~= 200 then bad = bad + 1 end
  local v = headers["x-spear-overhead-ms"] or headers["x-litellm-overhead-duration-ms"]
  if v then nov = nov + 1; ov[nov] = tonumber(v) end
end
function done(summary, latency, requests)
  local all = {}
  local nbad = 0
  for _, t in ipairs(threads) do
    local o = t:get("ov")
    if o then for _, x in ipairs(o) do table.insert(all, x) end end
    nbad = nbad + (t:get("bad") or 0)
  end
  table.sort(all)
  local function q(p)
    if #all == 0 then return "null" end
    local i = math.max(1, math.min(#all, math.floor(p * #all + 0.5)))
    return string.format("%.3f", all[i])
  end
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_s":%.3f,"rps":%.1f,' ..
    '"p50_ms":%.3f,"p90_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f,' ..
    '"non200":%d,"err_connect":%d,"err_read":%d,"err_write":%d,"err_timeout":%d,' ..
    '"ov_n":%d,"ov_p50_ms":%s,"ov_p99_ms":%s}\n',
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, nbad, e.connect, e.read, e.write, e.timeout, #all, q(0.5), q(0.99)))
end
"""

LITELLM_CFG = """
model_list:
  - model_name: fake
    litellm_params:
      model: openai/fake
      api_base: http://127.0.0.1:{fake_port}/v1
      api_key: sk-fake
general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
litellm_settings:
  telemetry: false
"""

SPEAR_CFG = """
[server]
listen = "127.0.0.1:{port}"

[[backends]]
name = "fake"
kind = "openai_http"
base_url = "http://127.0.0.1:{fake_port}/v1"
"""


# --- processes -----------------------------------------------------------------------------


class Proc:
    """A started server process (its log in the run's temp dir)."""

    def __init__(
        self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.log = log
        self.popen = subprocess.Popen(
            argv,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log.parent,
            start_new_session=True,
        )
        self.ps = psutil.Process(self.popen.pid)

    def tree(self) -> list[psutil.Process]:
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_s(self) -> float:
        total = 0.0
        for p in self.tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def rss_mb(self) -> float:
        total = 0
        for p in self.tree():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / 2**20

    def stop(self) -> None:
        if self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)
        except ProcessLookupError:
            pass


def wait_http(
    url: str, deadline_s: float, proc: Proc, headers: dict[str, str] | None = None
) -> float:
    """Seconds until `url` answers 200 (raises if the process dies or the deadline passes)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        if proc.popen.poll() is not None:
            raise RuntimeError(
                f"{proc.name} exited; see {proc.log}:\n{proc.log.read_text()[-2000:]}"
            )
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, headers=headers or {}), timeout=2
            ) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} not ready after {deadline_s:.0f} s; see {proc.log}")


def _rel(path: str) -> str:
    try:
        return str(Path(path).relative_to(REPO))
    except ValueError:
        return path


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def check_answer(base: str, kind: str, key: str | None) -> dict[str, str]:
    """One request of `kind`: must be 200 with the expected shape; its headers."""
    body = {
        "chat": {"model": "fake", "messages": [{"role": "user", "content": "hi"}]},
        "stream": {
            "model": "fake",
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
        "emb": {"model": "fake", "input": "hi"},
    }[kind]
    path = "/v1/embeddings" if kind == "emb" else "/v1/chat/completions"
    headers = {
        "Content-Type": "application/json",
        **({"Authorization": f"Bearer {key}"} if key else {}),
    }
    req = urllib.request.Request(base + path, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        data = r.read()
        assert r.status == 200, (base, kind, r.status)
        if kind == "stream":
            assert data.rstrip().endswith(b"data: [DONE]"), data[-200:]
        else:
            json.loads(data)
        return dict(r.headers.items())


# --- one step ------------------------------------------------------------------------------


def busy_cpu_s() -> float:
    """CPU seconds the machine spent in processes (interrupt time is left out: at tens of
    thousands of loopback requests per second most of it is this bench's own traffic)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system


def run_wrk(
    url: str, kind: str, c: int, seconds: float, lua: Path, key: str | None
) -> tuple[dict[str, Any], float]:
    """One closed-loop wrk run on the load core; its JSON line and the wall time it took."""
    argv = [
        "taskset",
        "-c",
        LOAD_CORE,
        "wrk",
        "-t1",
        f"-c{c}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(lua),
        url,
        "--",
        kind,
        key or "",
    ]
    t0 = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("{")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result: {out.stdout[-500:]} {out.stderr[-500:]}")
    return json.loads(line), time.monotonic() - t0


def children_cpu_s() -> float:
    t = os.times()
    return t.children_user + t.children_system


def step(
    target: str,
    url: str,
    kind: str,
    c: int,
    seconds: float,
    lua: Path,
    key: str | None,
    server: Proc | None,
    fake: Proc,
) -> dict[str, Any]:
    cpu0 = server.cpu_s() if server else 0.0
    fake0, busy0, kids0 = fake.cpu_s(), busy_cpu_s(), children_cpu_s()
    result, wall = run_wrk(url, kind, c, seconds, lua, key)
    cpu1 = server.cpu_s() if server else 0.0
    fake1, busy1, kids1 = fake.cpu_s(), busy_cpu_s(), children_cpu_s()
    server_cpu = cpu1 - cpu0
    ours = server_cpu + (fake1 - fake0) + (kids1 - kids0)
    row: dict[str, Any] = {"target": target, "kind": kind, "c": c, **result}
    row["server_cpu_pct"] = round(100 * server_cpu / wall, 1) if server else None
    row["cpu_ms_per_req"] = (
        round(1000 * server_cpu / max(result["requests"], 1), 3) if server else None
    )
    row["rss_mb"] = round(server.rss_mb(), 1) if server else None
    row["others_cpu_pct"] = round(max(0.0, 100 * (busy1 - busy0 - ours) / wall), 1)
    row["errors"] = sum(
        result[k] for k in ("non200", "err_connect", "err_read", "err_write", "err_timeout")
    )
    return row


# --- report --------------------------------------------------------------------------------


def add_deltas(rows: list[dict[str, Any]]) -> None:
    direct = {(r["kind"], r["c"]): r for r in rows if r["target"] == "direct"}
    litellm = {(r["kind"], r["c"]): r for r in rows if r["target"] == "litellm"}
    for r in rows:
        d = direct.get((r["kind"], r["c"]))
        if d is not None and r["target"] != "direct":
            r["added_p50_ms"] = round(r["p50_ms"] - d["p50_ms"], 3)
            r["added_p99_ms"] = round(r["p99_ms"] - d["p99_ms"], 3)
        lite = litellm.get((r["kind"], r["c"]))
        if lite is not None and r["target"].startswith("spear") and lite["rps"] > 0:
            r["x_litellm_rps"] = round(r["rps"] / lite["rps"], 1)


def table(rows: list[dict[str, Any]]) -> str:
    def f(v: Any, fmt: str = "{:.2f}") -> str:
        return "-" if v is None else fmt.format(v)

    lines = [
        "| kind | c | target | RPS | p50 ms | p99 ms | added p50 / p99 ms | × LiteLLM RPS | "
        "server CPU % | CPU ms/req | RSS MB | self-reported overhead p50 / p99 ms | errors | "
        "others CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {k: i for i, k in enumerate(KINDS)}
    torder = {t: i for i, t in enumerate(TARGETS)}
    for r in sorted(
        rows, key=lambda r: (order.get(r["kind"], 9), r["c"], torder.get(r["target"], 9))
    ):
        added = f"{r['added_p50_ms']:.2f} / {r['added_p99_ms']:.2f}" if "added_p50_ms" in r else "-"
        ov = f"{r['ov_p50_ms']:.2f} / {r['ov_p99_ms']:.2f}" if r.get("ov_n") else "-"
        lines.append(
            f"| {r['kind']} | {r['c']} | {r['target']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {added} | {f(r.get('x_litellm_rps'), '{:.1f}')} | "
            f"{f(r['server_cpu_pct'], '{:.0f}')} | {f(r['cpu_ms_per_req'], '{:.3f}')} | "
            f"{f(r['rss_mb'], '{:.0f}')} | {ov} | {r['errors']} | {r['others_cpu_pct']:.0f} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, per spear_rt loop: added p50 <= 1 ms at c=1, RPS >= 10x LiteLLM,
    RSS <= 100 MB."""
    out = []
    for target in sorted({r["target"] for r in rows if r["target"].startswith("spear")}):
        mine = [r for r in rows if r["target"] == target]
        c1 = [r for r in mine if r["c"] == 1 and "added_p50_ms" in r]
        worst_added = max((r["added_p50_ms"] for r in c1), default=None)
        ratios = [r["x_litellm_rps"] for r in mine if "x_litellm_rps" in r]
        rss = max((r["rss_mb"] for r in mine if r["rss_mb"] is not None), default=None)
        parts = []
        if worst_added is not None:
            parts.append(
                f"added p50 at c=1 ≤ {worst_added:.2f} ms "
                f"({'ok' if worst_added <= 1 else 'MISSED'}: ≤ 1 ms)"
            )
        if ratios:
            parts.append(
                f"RPS × LiteLLM {min(ratios):.1f}–{max(ratios):.1f} "
                f"({'ok' if min(ratios) >= 10 else 'MISSED'}: ≥ 10)"
            )
        if rss is not None:
            parts.append(f"RSS max {rss:.0f} MB ({'ok' if rss <= 100 else 'MISSED'}: ≤ 100 MB)")
        out.append(f"- **{target}**: " + "; ".join(parts))
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({(r["kind"], r["c"]) for r in rows}, key=lambda s: (KINDS.index(s[0]), s[1]))
    targets = [t for t in TARGETS if any(r["target"] == t for r in rows)]
    by = {(r["target"], r["kind"], r["c"]): r for r in rows}
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 8), sharex=True)
    width = 0.8 / max(len(targets), 1)
    for i, t in enumerate(targets):
        xs = [j + i * width for j in range(len(steps))]
        rps = [by.get((t, k, c), {}).get("rps", 0) for k, c in steps]
        ax1.bar(xs, rps, width, label=t)
        if t != "direct":
            added = [max(by.get((t, k, c), {}).get("added_p50_ms", 0), 1e-3) for k, c in steps]
            ax2.bar(xs, added, width, label=t, color=f"C{i}")
    ax1.set_yscale("log")
    ax1.set_ylabel("requests/s (log)")
    ax1.legend(fontsize=8)
    ax1.set_title("one-shot: direct vs spear_rt vs LiteLLM (server on one core)")
    ax2.set_yscale("log")
    ax2.set_ylabel("added p50 latency, ms (log)")
    ax2.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax2.set_xticks([j + width * (len(targets) - 1) / 2 for j in range(len(steps))])
    ax2.set_xticklabels([f"{k}\nc={c}" for k, c in steps])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(data: dict[str, Any], stem: Path, with_plot: bool) -> None:
    rows = data["rows"]
    add_deltas(rows)
    text = "\n".join(
        [table(rows), "", *verdicts(rows), "", f"command: `{data['meta']['command']}`"]
    )
    print(text)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1))
    stem.with_suffix(".md").write_text(text + "\n")
    if with_plot:
        try:
            plot(rows, stem.with_suffix(".png"))
            print(f"\nwrote {stem}.json, .md, .png")
        except ImportError:
            print(f"\nwrote {stem}.json, .md (no matplotlib: no plot; use bench/.venv-bench)")


# --- main ----------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--conc", default="1,16,64")
    ap.add_argument("--seconds", type=float, default=10.0, help="wrk duration per step")
    ap.add_argument("--warmup", type=float, default=2.0, help="wrk warm-up per target and kind")
    ap.add_argument("--fake-port", type=int, default=9101)
    ap.add_argument("--spear-port", type=int, default=9201, help="uvloop; asyncio gets +1")
    ap.add_argument("--litellm-port", type=int, default=4000)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--replot", help="a results JSON: print its table (and plot) again")
    args = ap.parse_args()

    RESULTS.mkdir(exist_ok=True)
    if args.replot:
        path = Path(args.replot)
        report(json.loads(path.read_text()), path.with_suffix(""), not args.no_plot)
        return 0

    targets = args.targets.split(",")
    kinds = args.kinds.split(",")
    concs = [int(c) for c in args.conc.split(",")]
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found (apt-get install -y wrk)")
    if "litellm" in targets and not (LITELLM_VENV / "bin" / "litellm").exists():
        sys.exit(
            f"no LiteLLM in {LITELLM_VENV}: python -m venv {LITELLM_VENV} && "
            f"{LITELLM_VENV}/bin/pip install 'litellm[proxy]'"
        )
    ports = [args.fake_port, args.spear_port, args.spear_port + 1, args.litellm_port]
    busy = [p for p in ports if not port_free(p)]
    if busy:
        sys.exit(f"ports in use: {busy}")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    tmp = Path(tempfile.mkdtemp(prefix="oneshot-bench-"))
    lua = tmp / "oneshot.lua"
    lua.write_text(LUA)
    procs: list[Proc] = []
    urls: dict[str, str] = {}
    servers: dict[str, Proc | None] = {}
    key: str | None = None
    meta: dict[str, Any] = {
        "command": shlex.join([_rel(sys.executable), "bench/oneshot.py", *sys.argv[1:]]),
        "started": stamp,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "seconds": args.seconds,
        "python": platform.python_version(),
        "server_core": SERVER_CORE,
        "load_core": LOAD_CORE,
        "load_generator": "wrk 4.1 (-t1, closed loop)",
        "logs": str(tmp),
    }
    try:
        fake = Proc(
            "fake",
            [
                "taskset",
                "-c",
                LOAD_CORE,
                sys.executable,
                str(ANCHORS / "fake_openai.py"),
                "--port",
                str(args.fake_port),
            ],
            tmp / "fake.log",
        )
        procs.append(fake)
        wait_http(f"http://127.0.0.1:{args.fake_port}/v1/models", 30, fake)
        urls["direct"], servers["direct"] = f"http://127.0.0.1:{args.fake_port}", None
        for loop, port in (("uvloop", args.spear_port), ("asyncio", args.spear_port + 1)):
            name = f"spear-{loop}"
            if name not in targets:
                continue
            cfg = tmp / f"{name}.toml"
            cfg.write_text(SPEAR_CFG.format(port=port, fake_port=args.fake_port))
            spear_bin = shutil.which("spear-rt") or "spear-rt"
            proc = Proc(
                name,
                [
                    "taskset",
                    "-c",
                    SERVER_CORE,
                    spear_bin,
                    "serve",
                    "--config",
                    str(cfg),
                    "--loop",
                    loop,
                ],
                tmp / f"{name}.log",
            )
            procs.append(proc)
            meta[f"{name}_ready_s"] = round(
                wait_http(f"http://127.0.0.1:{port}/healthz", 60, proc), 2
            )
            urls[name], servers[name] = f"http://127.0.0.1:{port}", proc
        if "litellm" in targets:
            key = "sk-" + secrets.token_hex(16)
            cfg = tmp / "litellm.yaml"
            cfg.write_text(LITELLM_CFG.format(fake_port=args.fake_port))
            env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": key}
            proc = Proc(
                "litellm",
                [
                    "taskset",
                    "-c",
                    SERVER_CORE,
                    str(LITELLM_VENV / "bin" / "litellm"),
                    "--config",
                    str(cfg),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(args.litellm_port),
                ],
                tmp / "litellm.log",
                env,
            )
            procs.append(proc)
            meta["litellm_ready_s"] = round(
                wait_http(f"http://127.0.0.1:{args.litellm_port}/health/liveliness", 180, proc), 2
            )
            urls["litellm"], servers["litellm"] = f"http://127.0.0.1:{args.litellm_port}", proc
        order = [t for t in TARGETS if t in urls]
        for t in order:  # every target answers every kind correctly before anything is timed
            for kind in kinds:
                headers = check_answer(urls[t], kind, key if t == "litellm" else None)
                if t.startswith("spear"):
                    assert headers.get("x-spear-instance") == "fake", headers
            srv = servers[t]
            if srv is not None:
                meta[f"{t}_rss_idle_mb"] = round(srv.rss_mb(), 1)
            for kind in kinds:
                run_wrk(urls[t], kind, 4, args.warmup, lua, key if t == "litellm" else None)
        rows: list[dict[str, Any]] = []
        for kind in kinds:
            for c in concs:
                for t in order:
                    row = step(
                        t,
                        urls[t],
                        kind,
                        c,
                        args.seconds,
                        lua,
                        key if t == "litellm" else None,
                        servers[t],
                        fake,
                    )
                    rows.append(row)
                    print(
                        f"{kind:6s} c={c:<3d} {t:14s} rps={row['rps']:>9,.0f} "
                        f"p50={row['p50_ms']:.2f} "
                        f"p99={row['p99_ms']:.2f} cpu={row['server_cpu_pct']} rss={row['rss_mb']} "
                        f"err={row['errors']} others={row['others_cpu_pct']}%",
                        flush=True,
                    )
        for t in order:
            srv = servers[t]
            if srv is not None:
                meta[f"{t}_rss_end_mb"] = round(srv.rss_mb(), 1)
        meta["loadavg_end"] = os.getloadavg()
        report({"meta": meta, "rows": rows}, RESULTS / f"oneshot-{stamp}", not args.no_plot)
    finally:
        for p in reversed(procs):
            p.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
