"""Server VAD detectors compared on speech in noise: energy vs silero (false starts, missed turns).

Audio: every recording in ../shared/audio (LibriVox lines, CMU cards, goforward.raw,
numbers.raw, jfk.flac) and fixtures/audio/speech_in_noise.wav. Each shared recording gets 1.0 s
of digital silence before and 1.5 s after (so there is noise with no speech in it, where false
starts show), then is heard clean and with noise mixed in at 10 dB and 0 dB SNR: `noise.wav`
(fixtures/audio: white Gaussian noise, tiled from a seeded offset) and pink (1/f) noise from a
seeded generator; and with non-speech sounds at the speech's level (0 dB) and silence between
them, one every 1.0-2.0 s, 150-500 ms long: pink noise bursts (a rustle, a door) and 1 kHz
beeps. SNR is the mean power of the clean signal inside the reference regions over the noise's
mean power (over one burst's power for the bursts). speech_in_noise.wav is used as it is (its
own -45 dBFS noise).

Reference turns: where the *energy* detector finds speech in the clean recording (prefix
padding 0, silence 500 ms), so the energy rows of the clean condition are right by
construction; for speech_in_noise.wav, the manifest's segments (measured before its noise was
added). Each detector runs with OpenAI's defaults (threshold 0.5, silence 500 ms, padding 0
here) on the mix resampled to 24 kHz and fed in 20 ms appends, as a client sends it.

Counts, per condition, over all files:
* false starts: speech_started whose onset is not within [start - 250 ms, end] of a reference;
* missed turns: references with no speech_started inside that span (a turn merged into the one
  before it, or into a turn that noise started, counts as missed);
* splits: more than one speech_started inside one reference (a turn cut in two);
* onset vs ref: mean of (first onset - reference start) over the turns found, in ms (+: later);
* CPU: the detector's process time per second of audio (the resampling to 24 kHz is not in it).

Prints a markdown table, writes JSON to bench/results/. Usage:
python bench/vad_compare.py [--shared ../shared] [--seed 20261203]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spear_rt.audio import (  # noqa: E402
    Detector,
    SpeechStarted,
    SpeechStopped,
    VadConfig,
    VadEvent,
    VoiceActivityDetector,
    frames,
    load_audio,
    resample,
    silero,
)
from spear_rt.audio.silero import SileroVad  # noqa: E402

RATE = 16000
CLIENT_RATE = 24000
LEAD_S, TAIL_S = 1.0, 1.5
TOLERANCE_MS = 250
DETECTORS = ("energy", "silero")
Regions = list[tuple[int, int]]


def recordings(shared: Path) -> list[tuple[str, NDArray[np.int16]]]:
    """(label, 16 kHz int16) of every shared recording, padded with silence."""
    audio = shared / "audio"
    paths = sorted(audio.glob("librivox_*.wav")) + sorted(audio.glob("cards_*.wav"))
    paths += [audio / "goforward.raw", audio / "numbers.raw", audio / "jfk.flac"]
    out = []
    for path in paths:
        if not path.exists():
            continue
        pcm, rate = load_audio(path)
        pcm = resample(pcm, rate, RATE)
        lead = np.zeros(int(LEAD_S * RATE), np.int16)
        tail = np.zeros(int(TAIL_S * RATE), np.int16)
        label = path.stem.replace("librivox_sense_and_sensibility_01_austen_64kb-", "librivox_")
        out.append((label, np.concatenate([lead, pcm, tail])))
    return out


def make(config: VadConfig, rate_hz: int) -> Detector:
    """The detector `config` names (as spear_rt.session.turns.detector_for picks it)."""
    if config.detector == "silero":
        return SileroVad(config, rate_hz)
    return VoiceActivityDetector(config, rate_hz)


def events_of(detector: str, pcm16k: NDArray[np.int16]) -> tuple[list[VadEvent], float]:
    """The detector's events on `pcm16k` sent as 24 kHz 20 ms appends; CPU seconds it took."""
    pcm = resample(pcm16k, RATE, CLIENT_RATE)
    vad = make(VadConfig(prefix_padding_ms=0, detector=detector), CLIENT_RATE)
    events: list[VadEvent] = []
    started = time.process_time()
    for frame in frames(pcm, CLIENT_RATE):
        events += vad.process(frame)
    return events, time.process_time() - started


def regions_of(events: list[VadEvent], end_ms: int) -> Regions:
    """[start, end] ms of each turn the events describe (an open turn ends at `end_ms`)."""
    out: Regions = []
    start: int | None = None
    for event in events:
        if isinstance(event, SpeechStarted):
            start = event.audio_start_ms
        elif isinstance(event, SpeechStopped) and start is not None:
            out.append((start, event.audio_end_ms))
            start = None
    if start is not None:
        out.append((start, end_ms))
    return out


def score(events: list[VadEvent], reference: Regions) -> dict[str, Any]:
    onsets = [e.audio_start_ms for e in events if isinstance(e, SpeechStarted)]
    hits: list[list[int]] = [[] for _ in reference]
    false_starts = 0
    for onset in onsets:
        inside = [i for i, (a, b) in enumerate(reference) if a - TOLERANCE_MS <= onset <= b]
        if inside:
            hits[inside[0]].append(onset)
        else:
            false_starts += 1
    found = [(h[0], reference[i][0]) for i, h in enumerate(hits) if h]
    return {
        "turns": len(reference),
        "starts": len(onsets),
        "false_starts": false_starts,
        "missed": sum(1 for h in hits if not h),
        "splits": sum(max(0, len(h) - 1) for h in hits),
        "onset_offsets_ms": [a - b for a, b in found],
    }


def white_noise_from_file(n: int, rng: np.random.Generator) -> NDArray[np.float64]:
    pcm, rate = load_audio(ROOT / "fixtures/audio/noise.wav")
    noise = resample(pcm, rate, RATE).astype(np.float64)
    offset = int(rng.integers(len(noise)))
    reps = -(-(n + offset) // len(noise))
    return np.tile(noise, reps)[offset : offset + n]


def pink_noise(n: int, rng: np.random.Generator) -> NDArray[np.float64]:
    spectrum = rng.normal(size=n // 2 + 1) + 1j * rng.normal(size=n // 2 + 1)
    freqs = np.fft.rfftfreq(n, 1 / RATE)
    spectrum[1:] /= np.sqrt(freqs[1:])
    spectrum[0] = 0
    return np.fft.irfft(spectrum, n)


def bursts(n: int, rng: np.random.Generator, kind: str) -> NDArray[np.float64]:
    """Non-speech sounds with nothing between them: one every 1.0-2.0 s, 150-500 ms long,
    10 ms ramps, each of RMS 1: pink noise bursts (a rustle, a door) or 1 kHz beeps."""
    out = np.zeros(n)
    at = int(rng.uniform(0.2, 1.0) * RATE)
    while at < n:
        length = min(int(rng.uniform(0.15, 0.5) * RATE), n - at)
        if kind == "pink":
            sound = pink_noise(max(length, 2), rng)[:length]
        else:
            sound = np.sin(2 * np.pi * 1000 * np.arange(length) / RATE)
        ramp = min(RATE // 100, length // 2)
        envelope = np.ones(length)
        if ramp:
            envelope[:ramp] = envelope[-ramp:][::-1] = 0.5 - 0.5 * np.cos(
                np.linspace(0, np.pi, ramp)
            )
        sound = sound * envelope
        out[at : at + length] = sound / max(float(np.sqrt(np.mean(sound**2))), 1e-12)
        at += length + int(rng.uniform(1.0, 2.0) * RATE)
    return out


def speech_power(clean: NDArray[np.int16], reference: Regions) -> float:
    x = clean.astype(np.float64)
    inside = np.concatenate([x[a * RATE // 1000 : b * RATE // 1000] for a, b in reference])
    return float(np.mean(inside**2))


def mix(
    clean: NDArray[np.int16], noise: NDArray[np.float64], snr_db: float, p_noise: float, p: float
) -> NDArray[np.int16]:
    """`clean` plus `noise` scaled so that speech power `p` over `p_noise` is `snr_db`."""
    scaled = noise * np.sqrt(p / (p_noise * 10 ** (snr_db / 10)))
    mixed: NDArray[np.float64] = np.clip(np.rint(clean.astype(np.float64) + scaled), -32768, 32767)
    return mixed.astype(np.int16)


def run(shared: Path, seed: int) -> dict[str, Any]:
    silero.require()  # load the model before timing anything
    rng = np.random.default_rng(seed)
    cases: list[dict[str, Any]] = []  # one per (condition, file)
    for label, clean in recordings(shared):
        end_ms = len(clean) * 1000 // RATE
        reference = regions_of(events_of("energy", clean)[0], end_ms)
        p = speech_power(clean, reference)
        white = white_noise_from_file(len(clean), rng)
        pink = pink_noise(len(clean), rng)
        conditions = {"clean": clean}
        for snr in (10, 0):
            conditions[f"noise.wav {snr} dB"] = mix(clean, white, snr, float(np.mean(white**2)), p)
            conditions[f"pink {snr} dB"] = mix(clean, pink, snr, float(np.mean(pink**2)), p)
        # bursts: their own RMS (1) sets the level, not their mean power over the file
        conditions["pink bursts 0 dB"] = mix(clean, bursts(len(clean), rng, "pink"), 0, 1.0, p)
        conditions["1 kHz beeps 0 dB"] = mix(clean, bursts(len(clean), rng, "beep"), 0, 1.0, p)
        for condition, pcm in conditions.items():
            cases.append(
                {"file": label, "condition": condition, "pcm": pcm, "reference": reference}
            )
    manifest = json.loads((ROOT / "fixtures/audio/manifest.json").read_text())
    entry = next(m for m in manifest if m["file"] == "speech_in_noise.wav")
    pcm, rate = load_audio(ROOT / "fixtures/audio/speech_in_noise.wav")
    cases.append(
        {
            "file": "speech_in_noise",
            "condition": "speech_in_noise.wav",
            "pcm": resample(pcm, rate, RATE),
            "reference": [tuple(s) for s in entry["segments_ms"]],
        }
    )
    results = []
    for case in cases:
        for detector in DETECTORS:
            events, cpu_s = events_of(detector, case["pcm"])
            results.append(
                {
                    "file": case["file"],
                    "condition": case["condition"],
                    "detector": detector,
                    "audio_s": len(case["pcm"]) / RATE,
                    "cpu_s": cpu_s,
                    "reference_ms": case["reference"],
                    "turns_ms": regions_of(events, len(case["pcm"]) * 1000 // RATE),
                    **score(events, case["reference"]),
                }
            )
    return {"seed": seed, "tolerance_ms": TOLERANCE_MS, "cases": results, "cost": cost()}


def cost() -> dict[str, float]:
    """CPU ms per second of audio for each detector and append size (speech_two_utterances)."""
    pcm, rate = load_audio(ROOT / "fixtures/audio/speech_two_utterances.wav")
    out = {}
    for detector in DETECTORS:
        config = VadConfig(detector=detector)
        for label, in_rate, chunk_ms in (
            ("24k_20ms", CLIENT_RATE, 20),
            ("24k_100ms", CLIENT_RATE, 100),
            ("16k_whole", RATE, 0),
        ):
            audio = resample(pcm, rate, in_rate)
            best = float("inf")
            for _ in range(5):
                vad = make(config, in_rate)
                chunks = [audio] if chunk_ms == 0 else list(frames(audio, in_rate, chunk_ms))
                started = time.process_time()
                for chunk in chunks:
                    vad.process(chunk)
                best = min(best, time.process_time() - started)
            out[f"{detector}_{label}"] = round(best * 1000 / (len(audio) / in_rate), 2)
    return out


def summary(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    conditions = list(dict.fromkeys(r["condition"] for r in results))
    for condition in conditions:
        for detector in DETECTORS:
            group = [
                r for r in results if r["condition"] == condition and r["detector"] == detector
            ]
            offsets = [e for r in group for e in r["onset_offsets_ms"]]
            audio_s = sum(r["audio_s"] for r in group)
            rows.append(
                {
                    "condition": condition,
                    "detector": detector,
                    "files": len(group),
                    "audio_s": round(audio_s, 1),
                    "turns": sum(r["turns"] for r in group),
                    "false_starts": sum(r["false_starts"] for r in group),
                    "missed": sum(r["missed"] for r in group),
                    "splits": sum(r["splits"] for r in group),
                    "onset_ms": round(float(np.mean(offsets))) if offsets else None,
                    "cpu_ms_per_s": round(1000 * sum(r["cpu_s"] for r in group) / audio_s, 2),
                }
            )
    return rows


def main() -> None:
    """Run, print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    parser.add_argument("--seed", type=int, default=20261203)
    args = parser.parse_args()
    data = run(Path(args.shared), args.seed)
    rows = summary(data["cases"])
    data["summary"] = rows
    print(
        "| condition | detector | files | turns | false starts | missed turns | splits "
        "| onset vs ref ms | CPU ms/s audio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['condition']} | {r['detector']} | {r['files']} | {r['turns']} | "
            f"{r['false_starts']} | {r['missed']} | {r['splits']} | {r['onset_ms']} | "
            f"{r['cpu_ms_per_s']} |"
        )
    print("\nCPU ms per second of audio, by append size (best of 5):")
    for key, value in data["cost"].items():
        print(f"  {key}: {value}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = ROOT / "bench/results" / f"vad_compare-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
