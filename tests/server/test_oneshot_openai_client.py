"""The official `openai` package against every one-shot endpoint, on local backends and upstream.

Each endpoint is called twice: served by local backends (stub, espeak, pocketsphinx) and relayed
by `openai_http` to the fake OpenAI upstream (tests/fakes/openai_upstream). The SDK is
asyncio-only, so the server (and the fake) run on their own trio loop in a background thread;
each test drives the SDK with `asyncio.run`, bounded by `asyncio.timeout`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import queue
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import numpy as np
import pytest
import soundfile
import trio

from spear_rt.config import Config
from spear_rt.server.app import Server
from spear_rt_backends.openai_http import aclose_clients
from tests.conftest import FIXTURES, make_config
from tests.fakes.openai_upstream import PNG, FakeOpenAI, embedding_of, speech_wav

openai = pytest.importorskip("openai")

TIMEOUT_S = 20
KEY = "sk-upstream-secret-5f0c1a2b3c4d5e6f"  # the upstream's key: must never reach a client
KEY_ENV = "SPEAR_TEST_ONESHOT_UPSTREAM_KEY"
WAV = FIXTURES / "speech_go_forward.wav"
SPEAR_HEADERS = ("x-spear-instance", "x-spear-attempts", "x-spear-overhead-ms")

LOCAL_BACKENDS = """
[[backends]]
name = "stub"
kind = "stub"

[[backends]]
name = "espeak"
kind = "espeak"
priority = 10

[[backends]]
name = "sphinx"
kind = "pocketsphinx"
ops = ["speech_to_text"]
"""


def upstream_backends(port: int) -> str:
    return f"""
[[credentials]]
name = "upstream"
api_key_env = "{KEY_ENV}"

[[backends]]
name = "upstream"
kind = "openai_http"
base_url = "http://127.0.0.1:{port}/v1"
credential_ref = "upstream"
"""


# --- a server (and a fake upstream) on a trio loop in a thread -----------------------------


class Running(msgspec.Struct):
    port: int
    fake: FakeOpenAI | None
    server: Server


def _serve_in_thread(
    build: Callable[[int], Config], with_fake: bool, started: queue.Queue[Any]
) -> None:
    async def main() -> None:
        try:
            async with trio.open_nursery() as nursery:
                fake = None
                if with_fake:
                    fake = FakeOpenAI()
                    await nursery.start(fake.serve)
                server = Server(build(fake.port if fake else 0))
                port = await nursery.start(server.serve)
                started.put(
                    (
                        trio.lowlevel.current_trio_token(),
                        nursery.cancel_scope,
                        Running(port, fake, server),
                    )
                )
        except BaseException as exc:  # report a failed start instead of hanging the test
            started.put(exc)
            raise
        finally:
            with trio.CancelScope(shield=True):
                await aclose_clients()

    trio.run(main)


def _threaded(build: Callable[[int], Config], *, with_fake: bool) -> Iterator[Running]:
    started: queue.Queue[Any] = queue.Queue()
    thread = threading.Thread(
        target=_serve_in_thread, args=(build, with_fake, started), daemon=True
    )
    thread.start()
    item = started.get(timeout=TIMEOUT_S)
    if isinstance(item, BaseException):
        raise item
    token, scope, running = item
    try:
        yield running
    finally:
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(timeout=TIMEOUT_S)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def local() -> Iterator[Running]:
    """stub (chat, embeddings, images, transcription), espeak (speech), pocketsphinx."""
    yield from _threaded(lambda _: make_config(backends=LOCAL_BACKENDS), with_fake=False)


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch) -> Iterator[Running]:
    """One `openai_http` instance relaying to the fake upstream with a key from the env."""
    monkeypatch.setenv(KEY_ENV, KEY)
    yield from _threaded(lambda port: make_config(backends=upstream_backends(port)), with_fake=True)


def client(port: int) -> Any:
    return openai.AsyncOpenAI(
        api_key="sk-client-key", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0
    )


def run(main: Callable[[Any], Any], port: int) -> Any:
    """Run `main(client)` on a fresh asyncio loop, bounded."""

    async def bounded() -> Any:
        async with asyncio.timeout(TIMEOUT_S):
            async with client(port) as sdk:
                return await main(sdk)

    return asyncio.run(bounded())


def check_spear_headers(raw: Any, instance: str) -> None:
    """The answer names its instance, the attempts it took and spear_rt's own overhead."""
    headers = raw.headers
    for name in SPEAR_HEADERS:
        assert name in headers, f"missing {name}"
    assert headers["x-spear-instance"] == instance
    assert headers["x-spear-attempts"] == "1"
    assert float(headers["x-spear-overhead-ms"]) >= 0.0


def wav_upload() -> tuple[str, bytes, str]:
    return ("speech.wav", WAV.read_bytes(), "audio/wav")


# --- local backends ----------------------------------------------------------------------


def test_chat_on_the_stub(local: Running) -> None:
    """chat.completions.create: the stub's reversed words, usage, and the spear headers."""

    async def main(sdk: Any) -> Any:
        return await sdk.chat.completions.with_raw_response.create(
            model="any-model", messages=[{"role": "user", "content": "one two three"}]
        )

    raw = run(main, local.port)
    check_spear_headers(raw, "stub")
    completion = raw.parse()
    assert completion.choices[0].message.content == "stub: three two one"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens > 0


def test_streamed_chat_on_the_stub(local: Running) -> None:
    """stream=True: SSE chunks the SDK parses, deltas concatenating to the full reply."""

    async def main(sdk: Any) -> tuple[Any, list[Any]]:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="any-model",
            messages=[{"role": "user", "content": "alpha beta gamma"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        return raw, [chunk async for chunk in raw.parse()]

    raw, chunks = run(main, local.port)
    check_spear_headers(raw, "stub")
    assert raw.headers["content-type"].startswith("text/event-stream")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "stub: gamma beta alpha"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_embeddings_on_the_stub_floats_base64_and_dimensions(local: Running) -> None:
    """Floats, the SDK's default base64 (decoded by the SDK), raw base64, and `dimensions`."""

    async def main(sdk: Any) -> tuple[Any, Any, Any, Any]:
        floats = await sdk.embeddings.with_raw_response.create(
            model="emb", input=["hello world", "bye"], encoding_format="float"
        )
        default = await sdk.embeddings.create(model="emb", input=["hello world", "bye"])
        b64 = await sdk.embeddings.create(
            model="emb", input="hello world", encoding_format="base64"
        )
        short = await sdk.embeddings.create(
            model="emb", input="hello world", dimensions=64, encoding_format="float"
        )
        return floats, default, b64, short

    raw, default, b64, short = run(main, local.port)
    check_spear_headers(raw, "stub")
    floats = raw.parse()
    vectors = [np.array(d.embedding) for d in floats.data]
    assert [d.index for d in floats.data] == [0, 1]
    assert all(v.shape == (1536,) for v in vectors)
    assert np.linalg.norm(vectors[0]) == pytest.approx(1.0, abs=1e-4)
    assert not np.allclose(vectors[0], vectors[1])
    # the SDK asks for base64 by default and decodes it: the same float32 values
    np.testing.assert_allclose(np.array(default.data[0].embedding), vectors[0], atol=1e-7)
    decoded = np.frombuffer(base64.b64decode(b64.data[0].embedding), "<f4")
    np.testing.assert_allclose(decoded, vectors[0], atol=1e-7)
    assert len(short.data[0].embedding) == 64
    assert np.linalg.norm(short.data[0].embedding) == pytest.approx(1.0, abs=1e-4)


def test_transcription_on_the_stub_is_deterministic(local: Running) -> None:
    """audio.transcriptions.create with a fixture WAV, pinned to the stub by header."""

    async def main(sdk: Any) -> tuple[Any, Any]:
        pinned = {"spear-backend": "stub"}
        first = await sdk.audio.transcriptions.with_raw_response.create(
            model="whisper-1", file=wav_upload(), extra_headers=pinned
        )
        second = await sdk.audio.transcriptions.create(
            model="whisper-1", file=wav_upload(), extra_headers=pinned
        )
        return first, second

    raw, second = run(main, local.port)
    check_spear_headers(raw, "stub")
    text = raw.parse().text
    assert text and text == second.text
    assert len(text.split()) == 12  # 2.574 s: one stub word per full 200 ms block


def test_transcription_on_pocketsphinx(local: Running) -> None:
    """audio.transcriptions.create decoded by pocketsphinx: the fixture's words."""

    async def main(sdk: Any) -> Any:
        return await sdk.audio.transcriptions.with_raw_response.create(
            model="whisper-1", file=wav_upload(), extra_headers={"spear-backend": "sphinx"}
        )

    raw = run(main, local.port)
    check_spear_headers(raw, "sphinx")
    words = raw.parse().text.split()
    assert {"go", "forward"} <= set(words), words


def test_transcription_timestamp_granularities_word_and_segment(local: Running) -> None:
    """The SDK sends timestamp_granularities[] once per value: both reach the engine."""

    async def main(sdk: Any) -> Any:
        return await sdk.audio.transcriptions.create(
            model="whisper-1",
            file=wav_upload(),
            response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
            extra_headers={"spear-backend": "sphinx"},
        )

    answer = run(main, local.port)
    assert answer.words and answer.segments, answer
    assert [w.word for w in answer.words] == answer.text.split()


def test_speech_on_espeak_is_real_audio(local: Running) -> None:
    """audio.speech.create (wav and flac): soundfile decodes 24 kHz mono speech of a sane length."""

    async def main(sdk: Any) -> tuple[Any, Any]:
        wav = await sdk.audio.speech.with_raw_response.create(
            model="tts-1", voice="alloy", input="Hello from spear.", response_format="wav"
        )
        flac = await sdk.audio.speech.create(
            model="tts-1", voice="nova", input="Hello from spear.", response_format="flac"
        )
        return wav, flac

    raw, flac = run(main, local.port)
    check_spear_headers(raw, "espeak")
    assert raw.headers["content-type"] == "audio/wav"
    for data in (raw.content, flac.content):
        samples, rate = soundfile.read(io.BytesIO(data), dtype="int16")
        assert rate == 24000 and samples.ndim == 1
        assert 0.5 < samples.size / rate < 5.0
        assert np.abs(samples).max() > 1000  # speech, not silence


def test_images_on_the_stub(local: Running) -> None:
    """images.generate with b64_json: PNGs of the asked size."""

    async def main(sdk: Any) -> Any:
        return await sdk.images.with_raw_response.generate(
            model="img", prompt="a red square", n=2, size="256x256", response_format="b64_json"
        )

    raw = run(main, local.port)
    check_spear_headers(raw, "stub")
    images = raw.parse().data
    assert len(images) == 2
    for image in images:
        png = base64.b64decode(image.b64_json)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert struct.unpack(">II", png[16:24]) == (256, 256)


def test_models_lists_every_available_instance(local: Running) -> None:
    """models.list: one entry per available instance."""

    async def main(sdk: Any) -> list[Any]:
        return [m async for m in sdk.models.list()]

    models = run(main, local.port)
    assert {m.id for m in models} == {"stub", "espeak", "sphinx"}
    assert all(m.object == "model" for m in models)


# --- relayed to the fake upstream by openai_http -----------------------------------------


def everything_received(out: dict[str, Any]) -> str:
    """Every header and body the client got (a stream's body as its parsed chunks)."""
    parts = [chunk.model_dump_json() for chunk in out["chunks"]]
    for name, raw in out.items():
        if name == "chunks":
            continue
        parts += [f"{k}: {v}" for k, v in raw.headers.items()]
        if name != "stream":
            parts.append(raw.http_response.content.decode("latin-1"))
    return "\n".join(parts)


def test_every_endpoint_through_openai_http(upstream: Running) -> None:
    """All endpoints relayed upstream: answers as the upstream gave them, the instance's key
    sent as Bearer (never the client's), and the key in no answer's body or header."""
    fake = upstream.fake
    assert fake is not None
    wav = WAV.read_bytes()

    async def main(sdk: Any) -> dict[str, Any]:
        chat = sdk.chat.completions.with_raw_response
        out: dict[str, Any] = {}
        out["chat"] = await chat.create(
            model="fake-model", messages=[{"role": "user", "content": "hi there"}]
        )
        out["stream"] = await chat.create(
            model="fake-model", messages=[{"role": "user", "content": "a b c"}], stream=True
        )
        out["chunks"] = [c async for c in out["stream"].parse()]
        emb = sdk.embeddings.with_raw_response
        out["floats"] = await emb.create(model="fake-model", input="hello", encoding_format="float")
        out["base64"] = await emb.create(model="fake-model", input="hello")  # SDK default: base64
        out["dims"] = await emb.create(
            model="fake-model", input="hello", dimensions=4, encoding_format="float"
        )
        out["stt"] = await sdk.audio.transcriptions.with_raw_response.create(
            model="whisper-1", file=("speech.wav", wav, "audio/wav")
        )
        out["tts"] = await sdk.audio.speech.with_raw_response.create(
            model="tts-1", voice="alloy", input="say this", response_format="wav"
        )
        out["images"] = await sdk.images.with_raw_response.generate(
            model="img", prompt="a dot", response_format="b64_json"
        )
        out["models"] = await sdk.models.with_raw_response.list()
        return out

    out = run(main, upstream.port)
    for name, raw in out.items():
        if name not in ("chunks", "models"):
            check_spear_headers(raw, "upstream")

    assert out["chat"].parse().choices[0].message.content == "echo: hi there"
    text = "".join(c.choices[0].delta.content or "" for c in out["chunks"] if c.choices)
    assert text == "echo: a b c"
    assert out["floats"].parse().data[0].embedding == pytest.approx(embedding_of("hello", 8))
    assert out["base64"].parse().data[0].embedding == pytest.approx(embedding_of("hello", 8))
    assert out["dims"].parse().data[0].embedding == pytest.approx(embedding_of("hello", 4))
    assert out["stt"].parse().text == f"heard {len(wav)} bytes of speech.wav"
    assert out["tts"].content == speech_wav("say this")
    assert out["tts"].headers["content-type"] == "audio/wav"
    assert base64.b64decode(out["images"].parse().data[0].b64_json) == PNG
    assert [m.id for m in out["models"].parse().data] == ["upstream"]

    # the upstream saw every operation, each with the instance's key and nothing of the client's
    paths = [r.path for r in fake.requests]
    assert paths == ["/v1/chat/completions"] * 2 + ["/v1/embeddings"] * 3 + [
        "/v1/audio/transcriptions",
        "/v1/audio/speech",
        "/v1/images/generations",
    ]
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in fake.requests)
    assert fake.requests[5].files["file"].data == wav  # the upload, byte for byte
    assert fake.requests[5].form["model"] == "whisper-1"
    assert KEY not in everything_received(out)
    assert "sk-client-key" not in b"".join(r.body for r in fake.requests).decode("latin-1")
