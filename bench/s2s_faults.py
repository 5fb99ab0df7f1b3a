"""Conversations through a speech-to-speech upstream under faults: is anything lost?

N conversation sessions (GA client) talk to spear_rt, which relays them to the fake
speech-to-speech upstream of `tests/fakes/s2s_upstream.py` (answers of `--words` 100 ms
chunks, paced by `--chunk-ms`). Each session asks `--turns` questions (a user text item, then
`response.create`). Every `--kill-every` seconds one random client loses its socket (no close
frame) and resumes with `last_seq`; every `--reset-every` seconds one random upstream
connection is closed under the gateway (TCP, mid-answer or not).

`--fault` takes realtime_load.py's fault list instead (`none`, `client:T`, `upstream:T`,
`client:T+upstream:T`; one row per N and item): `realtime_load.py --kind conversation --fault`
runs this.

Per session, checked at the end:
* every `response.created` has exactly one `response.done`;
* the audio the client heard (all responses, in order) against what the upstream sent to this
  session (all its connections' responses, in order): sha256 of both concatenations; lost and
  duplicated bytes when they differ;
* after the last reconnect, the items the upstream holds (ids, in order) against the items
  the client's conversation has.
Reported: resume time (drop -> `spear.session.resumed`) and restore time
(`spear.upstream.reconnected.downtime_ms`), p50/p99; RSS growth per session (one process:
server, fake and clients together). Prints a table, writes JSON.

    .venv/bin/python bench/s2s_faults.py --sessions 50,100 --out bench/results/s2s_faults.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import sys
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import WsClient, make_config, running_server
from tests.fakes.s2s_upstream import FakeSpeechToSpeech

AUDIO = ("response.output_audio.delta",)
RECREATIONS = 3  # spear_rt's RELAY_RECREATIONS: a response cut more often ends incomplete


class Client:
    """One conversation session, surviving its own socket's deaths."""

    def __init__(self, number: int, port: int) -> None:
        self.number = number
        self.port = port
        self.ws: WsClient | None = None
        self.session_id = ""
        self.token = ""
        self.last_seq = 0
        self.events: list[dict[str, Any]] = []
        self.kill = anyio.Event()
        self.resume_ms: list[float] = []

    async def open(self) -> None:
        self.ws = await WsClient.connect(self.port, "/v1/realtime?model=gpt-realtime")
        created = await self.ws.recv()
        self.session_id = created["session"]["id"]
        self.token = created["spear"]["resume_token"]
        self._seen(created)
        session = {"type": "realtime", "instructions": f"session {self.number}",
                   "audio": {"input": {"turn_detection": None}}}  # fmt: skip
        await self.ws.send({"type": "session.update", "session": session})

    def _seen(self, event: dict[str, Any]) -> None:
        if event.get("type") != "spear.session.resumed":
            self.events.append(event)
            self.last_seq = event.get("seq", self.last_seq)

    async def _resume(self) -> None:
        assert self.ws is not None
        await self.ws.stream.aclose()  # FIN, no close frame
        start = anyio.current_time()
        path = (f"/v1/realtime?model=gpt-realtime&session_id={self.session_id}"
                f"&last_seq={self.last_seq}")  # fmt: skip
        self.ws = await WsClient.connect(
            self.port, path, headers=[("Spear-Resume-Token", self.token)]
        )
        resumed = await self.ws.recv()
        assert resumed["type"] == "spear.session.resumed", resumed
        self.resume_ms.append((anyio.current_time() - start) * 1000)

    async def until_done(self) -> bool:
        """Read to the next response.done; True when it was cut by an upstream reset."""
        while True:
            if self.kill.is_set():
                self.kill = anyio.Event()
                await self._resume()
            assert self.ws is not None
            with anyio.move_on_after(0.05):
                event = await self.ws.recv()
                self._seen(event)
                if event["type"] == "response.done":
                    details = event["response"].get("status_details") or {}
                    code = (details.get("error") or {}).get("code")
                    return bool(code == "upstream_disconnected")
                if event["type"] == "error":
                    raise RuntimeError(f"session {self.number}: {event}")

    async def run(self, turns: int) -> None:
        await self.open()
        for turn in range(turns):
            assert self.ws is not None
            text = f"question {turn} of session {self.number}"
            content = [{"type": "input_text", "text": text}]
            item = {"type": "message", "role": "user", "content": content}
            await self.ws.send({"type": "conversation.item.create", "item": item})
            await self.ws.send({"type": "response.create"})
            recreated = 0
            while await self.until_done() and recreated < RECREATIONS:
                recreated += 1  # a response cut by an upstream reset is created again
        assert self.ws is not None
        await self.ws.close()


def check(client: Client, fake: FakeSpeechToSpeech) -> dict[str, Any]:
    """One session's verdict."""
    events = client.events
    kinds = [e["type"] for e in events]
    created, done = kinds.count("response.created"), kinds.count("response.done")
    heard = b"".join(_b64(e["delta"]) for e in events if e["type"] in AUDIO)
    tag = f"session {client.number}"
    mine = [c for c in fake.connections if c.sessions and c.sessions[-1].get("instructions") == tag]
    said = b"".join(bytes(c.sent_audio[r]) for c in mine for r in c.responses)
    items: list[str] = []
    for e in events:
        if e["type"] == "conversation.item.added":
            items.append(e["item"]["id"])
        elif e["type"] == "conversation.item.deleted":
            items.remove(e["item_id"])
    upstream_items = mine[-1].item_ids() if mine else []
    restores = [e["downtime_ms"] for e in events if e["type"] == "spear.upstream.reconnected"]
    return {
        "responses": created,
        "one_done_each": created == done,
        "audio_equal": hashlib.sha256(heard).digest() == hashlib.sha256(said).digest(),
        "lost_bytes": max(0, len(said) - len(heard)),
        "dup_bytes": max(0, len(heard) - len(said)),
        "items_restored": upstream_items == items,
        "reconnects": len(restores),
        "restore_ms": restores,
        "resume_ms": client.resume_ms,
    }


def _b64(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


async def run_row(args: argparse.Namespace, n: int) -> dict[str, Any]:
    rng = random.Random(n)
    fake = FakeSpeechToSpeech(chunk_interval_s=args.chunk_ms / 1000, answer_words=args.words)
    backends = """
[[backends]]
name = "s2s"
kind = "openai_realtime"
base_url = "http://127.0.0.1:{port}/v1"
features = ["supports_stream", "supports_bidi_stream", "supports_audio_input",
            "supports_audio_output"]
options = { ping_interval_s = 0 }
"""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with anyio.create_task_group() as tg:
        port = await tg.start(fake.serve)
        config = make_config(backends=backends.replace("{port}", str(port)))
        async with running_server(config) as server:
            clients = [Client(i, server.port or 0) for i in range(n)]
            async with anyio.create_task_group() as work:

                async def faults() -> None:
                    next_kill = next_reset = anyio.current_time()
                    while True:
                        await anyio.sleep(0.05)
                        now = anyio.current_time()
                        if now >= next_kill + args.kill_every:
                            next_kill = now
                            rng.choice(clients).kill.set()
                        if now >= next_reset + args.reset_every:
                            next_reset = now
                            live = [c for c in fake.connections if not c.ended.is_set()]
                            if live:
                                rng.choice(live).reset()

                tg.start_soon(faults)
                for client in clients:
                    work.start_soon(client.run, args.turns)
            tg.cancel_scope.cancel()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    verdicts = [check(c, fake) for c in clients]
    restore = [ms for v in verdicts for ms in v["restore_ms"]]
    resume = [ms for v in verdicts for ms in v["resume_ms"]]
    return {
        "sessions": n,
        "responses": sum(v["responses"] for v in verdicts),
        "one_done_each": sum(v["one_done_each"] for v in verdicts),
        "audio_equal": sum(v["audio_equal"] for v in verdicts),
        "lost_bytes": sum(v["lost_bytes"] for v in verdicts),
        "dup_bytes": sum(v["dup_bytes"] for v in verdicts),
        "items_restored": sum(v["items_restored"] for v in verdicts),
        "upstream_reconnects": len(restore),
        "resumes": len(resume),
        "restore_ms_p50": _pct(restore, 0.5),
        "restore_ms_p99": _pct(restore, 0.99),
        "resume_ms_p50": _pct(resume, 0.5),
        "resume_ms_p99": _pct(resume, 0.99),
        "rss_kib_per_session": round((rss_after - rss_before) / n, 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = ("fault", "sessions", "responses", "one done", "audio ==", "lost B", "dup B", "items ok",
            "reconnects", "resumes", "restore p50/p99 ms", "resume p50/p99 ms",
            "RSS KiB/sess")  # fmt: skip
    lines = [" | ".join(head)]
    for r in rows:
        n = r["sessions"]
        lines.append(" | ".join(str(x) for x in (
            r["fault"], n, r["responses"], f"{r['one_done_each']}/{n}", f"{r['audio_equal']}/{n}",
            r["lost_bytes"], r["dup_bytes"], f"{r['items_restored']}/{n}",
            r["upstream_reconnects"], r["resumes"],
            f"{r['restore_ms_p50']}/{r['restore_ms_p99']}",
            f"{r['resume_ms_p50']}/{r['resume_ms_p99']}", r["rss_kib_per_session"],
        )))  # fmt: skip
    return "\n".join(lines)


def fault_rates(spec: str) -> tuple[float, float]:
    """`realtime_load.py --fault` item -> (kill_every, reset_every); inf: no such fault."""
    rates = {"client": float("inf"), "upstream": float("inf")}
    if spec != "none":
        for part in spec.split("+"):
            kind, _, every = part.partition(":")
            if kind not in rates or not every:
                raise SystemExit(f"--fault: bad item {part!r} (client:T, upstream:T, none)")
            rates[kind] = float(every)
    return rates["client"], rates["upstream"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", default="50,100")
    ap.add_argument("--fault", default="", help="instead of the two rates: realtime_load.py's "
                    "comma list of none | client:T | upstream:T | client:T+upstream:T")  # fmt: skip
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--words", type=int, default=30, help="100 ms chunks per answer")
    ap.add_argument("--chunk-ms", type=float, default=20.0, help="upstream pause per chunk")
    ap.add_argument("--kill-every", type=float, default=0.5)
    ap.add_argument("--reset-every", type=float, default=0.5)
    ap.add_argument("--out", default="bench/results/s2s_faults.json")
    args = ap.parse_args(argv)
    specs = args.fault.split(",") if args.fault else [""]
    rows = []
    for n in args.sessions.split(","):
        for spec in specs:
            if spec:
                args.kill_every, args.reset_every = fault_rates(spec)
            row = anyio.run(run_row, args, int(n), backend="trio")
            rows.append({"fault": spec or f"client:{args.kill_every}+upstream:{args.reset_every}",
                         **row})  # fmt: skip
    print(table(rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    ok = all(r["lost_bytes"] == 0 and r["dup_bytes"] == 0 and r["audio_equal"] == r["sessions"]
             and r["items_restored"] == r["sessions"] and r["one_done_each"] == r["sessions"]
             for r in rows)  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
