"""ASR accuracy through the gateway vs the engine fed directly, on real human speech.

For every recording in ../shared/audio with a reference transcript (LibriVox lines, CMU cards,
goforward.raw, jfk.flac) and every fixture in fixtures/audio:

* direct: pocketsphinx decodes the 16 kHz recording as one utterance;
* gateway: the recording is converted to pcm16 at 24 kHz (what a client sends), streamed in
  20 ms frames over a real WebSocket to spear_rt (asyncio driver, pocketsphinx backend,
  manual commit) and the `completed` transcript is taken.

Prints a markdown table (WER of each, whether the words are identical, time to `completed`)
and writes JSON to bench/results/. Usage: python bench/asr_accuracy.py [--shared ../shared]

`--kind whisper` measures the whisper kind, normalized WER (`spear_rt.client.scoring`:
lowercase, punctuation stripped, hyphens as spaces, numbers as words, on both sides):

* one-shot direct: faster-whisper on the 16 kHz float32 samples with the kind's defaults
  (tiny.en, beam 3, language en); one-shot gateway: the recording uploaded as a WAV at its own
  rate to `/v1/audio/transcriptions` (json);
* live direct and live gateway, first delta, completed after commit and RTF: see
  `bench/whisper_live.py` (realtime pace, server_vad).

`--kind whisper --capacity 1,2,4,6` runs that many concurrent live sessions of jfk.flac (11 s)
on one worker thread and prints first-delta and completed p50/p99 for each count.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
import time
from pathlib import Path

import anyio
import anyio.to_thread
import numpy as np
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import whisper_live  # noqa: E402  (bench/whisper_live.py)

from spear_rt.audio import frames, load_audio, resample  # noqa: E402
from spear_rt.backend import InstanceInfo  # noqa: E402
from spear_rt.client import scoring  # noqa: E402
from spear_rt.client.scoring import normalized, transcript_words, word_error_rate  # noqa: E402
from spear_rt.config import parse_config  # noqa: E402
from spear_rt.server.app import Server  # noqa: E402
from spear_rt_backends.sphinx import transcribe_pcm16  # noqa: E402

CONFIG = '[server]\nlisten = "127.0.0.1:0"\n[[backends]]\nname = "asr"\nkind = "pocketsphinx"\n'


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate, as the demo computes it."""
    return word_error_rate(reference, hypothesis)[0]


def normalized_wer(reference: str, hypothesis: str) -> float:
    """WER after `normalized` on both sides (the issue's rule)."""
    return scoring.normalized_wer(reference, hypothesis)[0]


def items(shared: Path) -> list[tuple[str, Path, str]]:
    """(label, audio file, reference) for every recording with a transcript."""
    audio = shared / "audio"
    out = []
    for txt in sorted(audio.glob("librivox_*.txt")):
        out.append((txt.stem[-4:], txt.with_suffix(".wav"), txt.read_text()))
    cards = (
        (audio / "cards.transcription").read_text().splitlines()
        if (audio / "cards.transcription").exists()
        else []
    )
    for i, line in enumerate(cards, 1):
        text = re.sub(r"</?s>|\(.*?\)", "", line).strip()
        out.append((f"cards_{i:03d}", audio / f"cards_{i:03d}.wav", text))
    if (audio / "goforward.raw").exists():
        out.append(("goforward", audio / "goforward.raw", "go forward ten meters"))
    if (audio / "jfk.flac").exists():
        out.append(
            (
                "jfk",
                audio / "jfk.flac",
                "and so my fellow americans ask not what your country can do "
                "for you ask what you can do for your country",
            )
        )
    manifest = json.loads((ROOT / "fixtures/audio/manifest.json").read_text())
    for m in manifest:
        if m["kind"] == "speech":
            out.append(
                (
                    m["file"].removesuffix(".wav"),
                    ROOT / "fixtures/audio" / m["file"],
                    m["transcript"],
                )
            )
    return [(label, path, ref) for label, path, ref in out if path.exists()]


async def through_gateway(port: int, pcm24k: np.ndarray) -> tuple[str, float]:
    """Stream like a client (20 ms frames), commit, return (completed transcript, seconds)."""
    url = f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription"
    async with connect(url, additional_headers={"OpenAI-Beta": "realtime=v1"}, max_size=None) as ws:
        await ws.recv()
        await ws.send(
            json.dumps(
                {"type": "transcription_session.update", "session": {"turn_detection": None}}
            )
        )
        await ws.recv()
        for frame in frames(pcm24k, 24000):
            audio = base64.b64encode(frame.astype("<i2").tobytes()).decode()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        started = time.perf_counter()
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == "conversation.item.input_audio_transcription.completed":
                return event["transcript"], time.perf_counter() - started
            if event["type"] == "error":
                raise RuntimeError(event["error"]["message"])


def whisper_config(options: str) -> str:
    """One whisper instance with `options` (TOML inline-table body)."""
    return (
        '[server]\nlisten = "127.0.0.1:0"\n[[backends]]\nname = "asr"\nkind = "whisper"\n'
        f"options = {{ {options} }}\n"
    )


def whisper_direct(pcm16: np.ndarray) -> str:
    """faster-whisper on the 16 kHz samples, the kind's defaults (runs in a thread)."""
    from spear_rt_backends import whisper

    settings = whisper.settings_of(InstanceInfo(name="direct"))
    model = whisper.load_model(settings)
    audio = whisper.to_float16k(pcm16, 16000)
    segments, _ = model.transcribe(audio, language="en", beam_size=settings.beam_size)
    return " ".join(" ".join(s.text.split()) for s in segments)


async def whisper_gateway(port: int, pcm: np.ndarray, rate: int) -> tuple[str, float]:
    """Upload the recording as a WAV at its own rate to /v1/audio/transcriptions: (text,
    seconds to the answer). The server resamples it to 16 kHz as `whisper_direct`'s input was."""
    import io

    import httpx
    import soundfile

    wav = io.BytesIO()
    soundfile.write(wav, pcm, rate, format="WAV", subtype="PCM_16")
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        answer = await client.post(
            "/v1/audio/transcriptions",
            files={"file": ("a.wav", wav.getvalue(), "audio/wav")},
            data={"model": "whisper-1"},
        )
    answer.raise_for_status()
    return str(answer.json()["text"]), time.perf_counter() - started


async def run_whisper(shared: Path, options: str) -> list[dict[str, object]]:
    """Per file: one-shot direct and via upload, live direct and via a realtime session."""
    config = parse_config(whisper_config(options), "bench")
    server = Server(config)
    rows: list[dict[str, object]] = []
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        for label, path, reference in items(shared):
            pcm, rate = load_audio(path, raw_rate_hz=16000)
            pcm16, pcm24 = resample(pcm, rate, 16000), resample(pcm, rate, 24000)
            direct = await anyio.to_thread.run_sync(whisper_direct, pcm16)
            via, latency = await whisper_gateway(port, pcm, rate)
            # what the gateway's engine hears of a 24 kHz stream
            heard = resample(pcm24, 24000, 16000)
            live_direct = await anyio.to_thread.run_sync(
                whisper_live.direct_live, heard, dict(config.backends[0].options)
            )
            cpu = time.process_time()
            live, log = await whisper_live.live_session(port, pcm24)
            cpu = time.process_time() - cpu
            first, done = log.first_delta_s(), log.completed_after_commit_s()
            rows.append(
                {
                    "file": label,
                    "seconds": round(pcm.size / rate, 2),
                    "wer_direct": round(normalized_wer(reference, direct), 3),
                    "wer_gateway": round(normalized_wer(reference, via), 3),
                    "wer_live_direct": round(normalized_wer(reference, live_direct), 3),
                    "wer_live_gateway": round(normalized_wer(reference, live), 3),
                    "same_words": normalized(direct) == normalized(via),
                    "upload_to_answer_ms": round(latency * 1000, 1),
                    "first_delta_ms": [round(s * 1000) for s in first],
                    "completed_after_commit_ms": [round(s * 1000) for s in done],
                    "rtf": round(cpu / (pcm.size / rate), 3),
                    "direct": direct,
                    "gateway": via,
                    "live_direct": live_direct,
                    "live_gateway": live,
                    "reference": reference,
                }
            )
            print(f"  {label}: {rows[-1]['wer_live_gateway']} {live!r}", file=sys.stderr)
        tg.cancel_scope.cancel()
    return rows


async def run_capacity(shared: Path, counts: list[int], options: str) -> list[dict[str, object]]:
    """Concurrent live sessions on one worker thread (one core) until first-delta p99 > 1 s."""
    one_core = ", ".join(o for o in ("workers = 1, threads = 1", options) if o)
    config = whisper_config(one_core) + "[backends.limits]\nmax_concurrency = 64\n"
    server = Server(parse_config(config, "bench"))
    pcm, rate = load_audio(shared / "audio/jfk.flac")
    rows: list[dict[str, object]] = []
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        await whisper_live.live_session(port, resample(pcm[: rate * 2], rate, 24000))  # warm
        for n in counts:
            rows.append(await whisper_live.capacity(port, resample(pcm, rate, 24000), n))
            print(f"  {rows[-1]}", file=sys.stderr)
        tg.cancel_scope.cancel()
    return rows


def print_whisper(rows: list[dict[str, object]]) -> None:
    """The whisper table, and the means of each group."""
    print(
        "| file | audio s | WER one-shot direct | gateway | WER live direct | gateway "
        "| first delta ms | completed after commit ms | RTF |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['file']} | {r['seconds']} | {r['wer_direct']} | {r['wer_gateway']} | "
            f"{r['wer_live_direct']} | {r['wer_live_gateway']} | "
            f"{','.join(map(str, r['first_delta_ms']))} | "  # type: ignore[call-overload]
            f"{','.join(map(str, r['completed_after_commit_ms']))} | {r['rtf']} |"  # type: ignore[call-overload]
        )
    groups = (
        ("LibriVox lines", [r for r in rows if str(r["file"]).isdigit()]),
        ("all of ../shared/audio", [r for r in rows if not str(r["file"]).startswith("speech_")]),
        ("fixtures (espeak-ng)", [r for r in rows if str(r["file"]).startswith("speech_")]),
    )
    keys = ("wer_direct", "wer_gateway", "wer_live_direct", "wer_live_gateway")
    for name, group in groups:
        if not group:
            continue
        means = ", ".join(f"{k[4:]} {np.mean([r[k] for r in group]):.3f}" for k in keys)
        first = [v for r in group for v in r["first_delta_ms"]]  # type: ignore[attr-defined]
        done = [v for r in group for v in r["completed_after_commit_ms"]]  # type: ignore[attr-defined]
        print(
            f"\n{name}: mean WER {means}; first delta p50 {np.percentile(first, 50):.0f} ms "
            f"p90 {np.percentile(first, 90):.0f}; completed after commit p50 "
            f"{np.percentile(done, 50):.0f} ms p90 {np.percentile(done, 90):.0f}; "
            f"mean RTF {np.mean([r['rtf'] for r in group]):.3f}"
        )


async def run(shared: Path) -> list[dict[str, object]]:
    server = Server(parse_config(CONFIG, "bench"))
    rows = []
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        for label, path, reference in items(shared):
            pcm, rate = load_audio(path, raw_rate_hz=16000)
            pcm16 = resample(pcm, rate, 16000)
            direct = await transcribe_pcm16(pcm16)
            via, latency = await through_gateway(port, resample(pcm, rate, 24000))
            rows.append(
                {
                    "file": label,
                    "seconds": round(pcm.size / rate, 2),
                    "wer_direct": round(wer(reference, direct), 3),
                    "wer_gateway": round(wer(reference, via), 3),
                    "same_words": transcript_words(direct) == transcript_words(via),
                    "commit_to_completed_ms": round(latency * 1000, 1),
                    "direct": direct,
                    "gateway": via,
                    "reference": reference,
                }
            )
            print(
                f"  {label}: WER direct {rows[-1]['wer_direct']} gateway {rows[-1]['wer_gateway']}",
                file=sys.stderr,
            )
        tg.cancel_scope.cancel()
    return rows


def main() -> None:
    """Run, print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    parser.add_argument("--kind", choices=("pocketsphinx", "whisper"), default="pocketsphinx")
    parser.add_argument(
        "--capacity", default="", help="whisper: concurrent live sessions to try, e.g. 1,2,4,6"
    )
    parser.add_argument(
        "--options", default="", help="whisper: instance options TOML, e.g. 'step_ms = 200'"
    )
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = ROOT / "bench/results" / f"asr_accuracy-{args.kind}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    shared = Path(args.shared)
    if args.capacity:
        counts = [int(n) for n in args.capacity.split(",")]
        rows = anyio.run(run_capacity, shared, counts, args.options, backend="asyncio")
        print(
            "| sessions | turns | first delta p50 / p99 ms | completed p50 / p99 ms "
            "| CPU s per audio s | max loop lag ms |"
        )
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['sessions']} | {r['turns']} | {r['first_delta_p50_ms']} / "
                f"{r['first_delta_p99_ms']} | {r['completed_p50_ms']} / {r['completed_p99_ms']} | "
                f"{r['cpu_per_audio_s']} | {r['max_loop_lag_ms']} |"
            )
        held = [r["sessions"] for r in rows if r["first_delta_p99_ms"] <= 1000]  # type: ignore[operator]
        print(f"\nsessions on one core with first-delta p99 <= 1 s: {max(held, default=0)}")
        out = out.with_name(out.name.replace("asr_accuracy", "whisper_capacity"))
    elif args.kind == "whisper":
        rows = anyio.run(run_whisper, shared, args.options, backend="asyncio")
        print_whisper(rows)
    else:
        rows = anyio.run(run, shared, backend="asyncio")
        print_pocketsphinx(rows)
    out.write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {out}")


def print_pocketsphinx(rows: list[dict[str, object]]) -> None:
    """The pocketsphinx table, and the means of each group."""
    print("| file | audio s | WER direct | WER gateway | same words | commit→completed ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['file']} | {r['seconds']} | {r['wer_direct']} | {r['wer_gateway']} | "
            f"{r['same_words']} | {r['commit_to_completed_ms']} |"
        )
    real = [r for r in rows if not str(r["file"]).startswith("speech_")]
    for name, group in (
        ("real speech (../shared/audio)", real),
        ("fixtures (espeak-ng)", [r for r in rows if r not in real]),
    ):
        if group:
            print(
                f"\n{name}: mean WER direct "
                f"{np.mean([r['wer_direct'] for r in group]):.3f}, gateway "
                f"{np.mean([r['wer_gateway'] for r in group]):.3f}, identical words "
                f"{sum(bool(r['same_words']) for r in group)}/{len(group)}"
            )


if __name__ == "__main__":
    main()
