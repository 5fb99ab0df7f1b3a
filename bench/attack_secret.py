"""The secret-echo class of bench/attack.py: a fake upstream that echoes spear_rt's upstream key.

A thread on 127.0.0.1 answers ``POST /v1/chat/completions`` with the ``Authorization`` key it
received, by mode (the last user message): ``cut`` a 500 whose error message puts the key across
the 2000-character cut, ``upper`` a 500 echoing it upper-cased, ``ok`` a 200 completion whose
content holds it. The client's answers and the server log are searched for any 12 characters
of the key, case-insensitively.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import attack_net as net
from attack_wasm import Result

KEY = "sk-FAKESECRET0123456789abcdefXYZ"
ENV = "ATTACK_FAKE_UPSTREAM_KEY"


class _Echo(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        try:
            mode = json.loads(body)["messages"][-1]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            mode = "ok"
        if mode == "cut":  # the key across the 2000-character cut of an error message
            msg = "x" * (2000 - len(key) + 1) + key + " tail"
            err = {"error": {"message": msg, "type": "server_error"}}
            status, data, ctype = 500, json.dumps(err).encode(), "application/json"
        elif mode == "upper":
            err = {"error": {"message": f"bad key {key.upper()}", "type": "invalid_request"}}
            status, data, ctype = 500, json.dumps(err).encode(), "application/json"
        else:
            msg = {"role": "assistant", "content": f"your key is {key}"}
            answer = {
                "id": "c",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
            }
            status, data, ctype = 200, json.dumps(answer).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        """Quiet."""


class Upstream:
    """The echoing upstream in a daemon thread."""

    def __init__(self) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()


def config(upstream_port: int) -> str:
    """A server config whose only backend is the echoing upstream (no retries)."""
    return (
        f'[[credentials]]\nname = "up"\napi_key_env = "{ENV}"\n\n'
        f'[[backends]]\nname = "up"\nkind = "openai_http"\n'
        f'base_url = "http://127.0.0.1:{upstream_port}/v1"\ncredential_ref = "up"\n'
    )


def leaks(text: str) -> bool:
    """Whether `text` holds any 12 consecutive characters of the key, in any case."""
    low, key = text.lower(), KEY.lower()
    return any(key[i : i + 12] in low for i in range(len(key) - 11))


async def run(port: int, log_text: Any) -> Result:
    """The three modes; what reached the client, and whether the log kept the key."""
    out: dict[str, Any] = {}
    for mode in ("cut", "upper", "ok"):
        chat = {"model": "m", "messages": [{"role": "user", "content": mode}]}
        body = json.dumps(chat).encode()
        reply = await net.http(
            port, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"}
        )
        out[mode] = {"status": reply.status, "leak": leaks(reply.head.decode(errors="replace"))}
    out["log_leak"] = leaks(log_text())
    leaked = [m for m in ("cut", "upper", "ok") if out[m]["leak"]]
    leaked += ["server log"] if out["log_leak"] else []
    statuses = "/".join(str(out[m]["status"]) for m in ("cut", "upper", "ok"))
    why = f"key leaked in: {', '.join(leaked)}" if leaked else "no key in answers or log"
    return Result(not leaked, f"{why} ({statuses})", out)
