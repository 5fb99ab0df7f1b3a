"""The browser rig: a real `spear-rt serve`, Debian's Chromium through Playwright, a WAV mic.

Chromium runs headless with the flags of ../shared/NOTES.md (no background networking on a
closed network) and `--use-file-for-fake-audio-capture`, so a fixture WAV is the microphone
(played from the page's `getUserMedia`, looped when it ends: the WAVs end in long silence).
The page is opened through a TCP proxy (`Proxy`) so a test can cut every live connection under
the page, as a server restarting its sockets would. On failure a screenshot of the page goes to
the test's output folder.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import soundfile  # type: ignore[import-untyped]

from spear_rt.audio import load_audio, resample
from tests.conftest import FIXTURES

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
]  # fmt: skip
MIC_RATE_HZ = 48000
RST_ON_CLOSE = (1).to_bytes(4, "little") + bytes(4)  # struct linger {on, 0 s}: close sends RST
START_S = 60  # a cold server loads its recognizer


def mic_wav(path: Path, parts: list[tuple[str, float]], tail_s: float = 60.0) -> Path:
    """A microphone recording: each (fixture file, seconds of silence after it), then silence."""
    pieces = []
    for name, pause_s in parts:
        pcm, rate = load_audio(str(FIXTURES / name))
        silence = np.zeros(int(pause_s * MIC_RATE_HZ), np.int16)
        pieces += [resample(pcm, rate, MIC_RATE_HZ), silence]
    pieces.append(np.zeros(int(tail_s * MIC_RATE_HZ), np.int16))
    soundfile.write(str(path), np.concatenate(pieces), MIC_RATE_HZ, subtype="PCM_16")
    return path


class Proxy:
    """127.0.0.1 TCP proxy to the server; `cut()` resets every connection through it."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            upstream.settimeout(None)
            with self.lock:
                self.pairs.append((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> int:
        """Reset (RST) every live connection; returns how many."""
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_ON_CLOSE)
                    s.close()
                except OSError:
                    pass
        return len(pairs)

    def close(self) -> None:
        self.listener.close()
        self.cut()


@contextmanager
def spear_server(config: str, tmp: Path, env: dict[str, str] | None = None) -> Iterator[int]:
    """`spear-rt serve` on 127.0.0.1 with `config` (TOML) and `env` added; yields its port."""
    cfg = tmp / "spear.toml"
    cfg.write_text(config)
    log = tmp / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "spear_rt.cli", "serve", "--listen", "127.0.0.1:0",
             "--config", str(cfg)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + START_S
        while not (m := re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())):
            assert proc.poll() is None, f"spear-rt exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"spear-rt did not start: {log.read_text()}"
            time.sleep(0.1)
        yield int(m.group(1))
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def browser_page(
    mic: Path, out_dir: Path, name: str, *, bypass_csp: bool = False
) -> Iterator[object]:
    """A Chromium page whose microphone is `mic`; a screenshot on the way out if it failed."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={mic}"],
        )
        page = browser.new_page(
            viewport={"width": 390, "height": 844}, bypass_csp=bypass_csp
        )  # a phone
        failed = True
        try:
            yield page
            failed = False
        finally:
            if failed:
                page.screenshot(path=str(out_dir / f"{name}-failure.png"), full_page=True)
            browser.close()
