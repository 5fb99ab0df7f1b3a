"""Numbers, table, verdicts and plot of bench/conversation_load.py (see its docstring).

`summarize` joins what the load generator saw (per response: when ``response.create`` was
written, when the first audio delta and ``response.done`` were read...) with what the fake
upstream recorded (when it read each request and wrote each token and WAV, and when it saw a
stream aborted), by the tag every user message carries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

GOAL_ADDED_P50_MS, GOAL_ADDED_P99_MS, GOAL_AT_N = 5.0, 20.0, 50
GOAL_BARGE_P99_MS = 50.0


def pct(values: list[float], q: float) -> float | None:
    """Percentile (numpy's linear interpolation) in ms, None without samples."""
    return round(float(np.percentile(values, q)), 2) if values else None


def dist(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": pct(values, 50), "p99": pct(values, 99),
            "max": round(max(values), 2) if values else None}  # fmt: skip


def summarize(row: dict[str, Any]) -> dict[str, Any]:
    """One step's raw data -> its JSON object (samples kept, per-conversation objects dropped)."""
    fake, convs = row.pop("fake"), row.pop("convs")
    cfg = fake["config"]
    k = int(cfg["tokens_per_sentence"])
    nominal = cfg["first_token_ms"] + (k - 1) * cfg["token_ms"] + cfg["tts_ms"]
    chats: dict[str, list[dict[str, Any]]] = {}
    for rec in fake["chat"]:
        chats.setdefault(rec["tag"], []).append(rec)
    speech: dict[str, list[dict[str, Any]]] = {}
    for rec in fake["speech"]:
        speech.setdefault(rec["tag"], []).append(rec)
    s: dict[str, list[float]] = {
        name: []
        for name in (
            "added", "nominal_added", "to_fake", "sentence_to_tts", "tts_to_client",
            "text_added", "first_audio", "fake_chat", "fake_tts", "server_first_audio",
            "cancel", "cancel_abort", "barge", "barge_abort", "append_to_started", "barge_client",
        )
    }  # fmt: skip
    counts = dict.fromkeys(
        ("answers", "no_audio", "unmatched", "chat_retries", "cancelled", "not_cancelled",
         "aborted", "chat_done_before_cancel", "completed_after_cancel", "speech_after_cancel",
         "speech_after_done", "speech_after_done_answered", "after_done_same",
         "after_done_other", "barge_missed", "speech_aborted"), 0,
    )  # fmt: skip
    not_cancelled: list[str] = []
    late_detail: list[str] = []
    errors: list[str] = []
    failed: list[str] = []
    for c in convs:
        errors += c.errors
        if c.failed:
            failed.append(f"c{c.index}: {c.failed}"[:200])
        for tr in c.tracks:
            ch_list = chats.get(tr.tag) or []
            counts["chat_retries"] += max(0, len(ch_list) - 1)
            ch = ch_list[0] if ch_list else None
            if tr.kind == "turn":
                counts["answers"] += tr.done is not None
                if tr.first_audio is None:
                    counts["no_audio"] += 1
                    continue
                sp = [r for r in speech.get(tr.tag, []) if r["part"] == 1]
                if ch is None or not sp or len(ch["token_at"]) < k or sp[0]["sent"] is None:
                    counts["unmatched"] += 1
                    continue
                total = tr.first_audio - tr.sent
                fchat = ch["token_at"][k - 1] - ch["read"]
                ftts = sp[0]["sent"] - sp[0]["read"]
                s["first_audio"].append(1000 * total)
                s["fake_chat"].append(1000 * fchat)
                s["fake_tts"].append(1000 * ftts)
                s["added"].append(1000 * (total - fchat - ftts))
                s["nominal_added"].append(1000 * total - nominal)
                s["to_fake"].append(1000 * (ch["read"] - tr.sent))
                s["sentence_to_tts"].append(1000 * (sp[0]["read"] - ch["token_at"][k - 1]))
                s["tts_to_client"].append(1000 * (tr.first_audio - sp[0]["sent"]))
                if tr.first_text is not None:
                    s["text_added"].append(
                        1000 * ((tr.first_text - tr.sent) - (ch["token_at"][0] - ch["read"]))
                    )
                if tr.spear and isinstance(tr.spear.get("first_audio_ms"), int | float):
                    s["server_first_audio"].append(float(tr.spear["first_audio_ms"]))
                continue
            t0 = tr.cancel_sent if tr.kind == "cancel" else tr.speech_started
            if tr.kind == "vad" and tr.speech_started is None:
                counts["barge_missed"] += 1
            if tr.status != "cancelled" or t0 is None or tr.done is None:
                counts["not_cancelled"] += 1
                not_cancelled.append(f"{tr.tag}: status={tr.status} reason={tr.reason}")
                continue
            counts["cancelled"] += 1
            s["cancel" if tr.kind == "cancel" else "barge"].append(1000 * (tr.done - t0))
            if tr.kind == "vad" and tr.last_append_before_started is not None:
                s["append_to_started"].append(1000 * (t0 - tr.last_append_before_started))
            if tr.kind == "vad" and tr.trigger_append is not None:
                s["barge_client"].append(1000 * (tr.done - tr.trigger_append))
            counts["after_done_same"] += tr.after_done
            counts["after_done_other"] += tr.after_done_response_events
            if ch is not None and ch["aborted"] is not None:
                counts["aborted"] += 1
                key = "cancel_abort" if tr.kind == "cancel" else "barge_abort"
                s[key].append(1000 * (ch["aborted"] - t0))
            elif ch is not None and ch["done"] is not None and ch["done"] < t0:
                counts["chat_done_before_cancel"] += 1  # nothing left to abort: not a failure
            elif ch is not None and ch["done"] is not None:
                counts["completed_after_cancel"] += 1
            counts["speech_aborted"] += sum(
                1 for r in speech.get(tr.tag, []) if r.get("aborted") is not None
            )
            late = [r for r in speech.get(tr.tag, []) if r["read"] > t0 + 0.0005]
            counts["speech_after_cancel"] += len(late)
            counts["speech_after_done"] += sum(1 for r in late if r["read"] > tr.done)
            counts["speech_after_done_answered"] += sum(
                1 for r in late if r["read"] > tr.done and r["sent"] is not None
            )
            for r in late[:2]:
                late_detail.append(
                    f"{tr.tag} part {r['part']}: read by the fake "
                    f"{1000 * (r['read'] - t0):.1f} ms after the "
                    f"{'cancel was written' if tr.kind == 'cancel' else 'speech_started was read'}"
                    f", {1000 * (r['read'] - tr.done):.1f} ms after response.done was read; "
                    f"{'answered' if r['sent'] is not None else 'aborted before its answer'}"
                )
    n = row["n"]
    ok = sum(1 for c in convs if not c.failed)
    out = {
        **{k2: v for k2, v in row.items() if k2 != "server_log_tail"},
        "conversations_ok": ok,
        "conversations_failed": len(failed),
        "failures": failed[:10],
        "nominal_fake_ms": nominal,
        **counts,
        "not_cancelled_detail": not_cancelled[:10],
        "speech_after_cancel_detail": late_detail[:10],
        "error_events": len(errors),
        "errors": errors[:10],
        "cpu_s_per_conv": round(row["server_cpu_s"] / n, 4),
        "rss_kb_per_conv": round(1024 * (row["rss_open_mb"] - row["rss_idle_mb"]) / n, 1),
        "rss_peak_kb_per_conv": round(1024 * (row["rss_peak_mb"] - row["rss_idle_mb"]) / n, 1),
        "fake_connections": fake["connections"],
        "stats": {name: dist(v) for name, v in s.items()},
        "samples": {name: [round(x, 3) for x in v] for name, v in s.items()},
    }
    if row.get("tracebacks"):
        out["server_log_tail"] = row.get("server_log_tail")
    return out


def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def _pp(st: dict[str, Any], fmt: str = "{:.1f}") -> str:
    return f"{_f(st['p50'], fmt)} / {_f(st['p99'], fmt)}"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| N | conv ok/fail | answers | added p50 / p99 ms | nominal added p50 / p99 | "
        "→fake / sentence→TTS / TTS→client p50 | cancel p50 / p99 | barge-in p50 / p99 | "
        "barge-in from the VAD's append p50 / p99 | "
        "upstream abort p50 / p99 (cancel; barge) | aborted | after done | CPU s/conv | "
        "server CPU % | others CPU % | steal % | RSS idle MB | RSS KB/conv | errors |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        st = r["stats"]
        seg = " / ".join(_f(st[x]["p50"], "{:.2f}") for x in
                         ("to_fake", "sentence_to_tts", "tts_to_client"))  # fmt: skip
        lines.append(
            f"| {r['n']} | {r['conversations_ok']}/{r['conversations_failed']} | "
            f"{r['answers']} | {_pp(st['added'], '{:.2f}')} | {_pp(st['nominal_added'])} | "
            f"{seg} | {_pp(st['cancel'])} | {_pp(st['barge'])} | {_pp(st['barge_client'])} | "
            f"{_pp(st['cancel_abort'])}; {_pp(st['barge_abort'])} | "
            f"{r['aborted']}/{r['cancelled']} | {r['after_done_same'] + r['after_done_other']} | "
            f"{r['cpu_s_per_conv']:.3f} | {r['server_cpu_pct']:.0f} | {r['others_cpu_pct']:.0f} | "
            f"{_f(r.get('steal_pct'), '{:.0f}')} | "
            f"{r['rss_idle_mb']:.0f} | "
            f"{r['rss_kb_per_conv']:.0f} | {r['error_events'] + r['not_cancelled']} |"
        )
    return "\n".join(lines)


NOISY_PCT = 20.0  # % of a core taken by other processes and other guests: a noisy row


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        st = r["stats"]
        noise = max(0.0, r["others_cpu_pct"]) + (r.get("steal_pct") or 0.0)
        if noise > NOISY_PCT:
            out.append(
                f"N={r['n']}: NOISY: other processes took {r['others_cpu_pct']:.0f} % and other "
                f"guests (steal) {_f(r.get('steal_pct'), '{:.0f}')} % of a core during the step; "
                "its latencies and CPU times overstate spear_rt's"
            )
        a50, a99 = st["added"]["p50"], st["added"]["p99"]
        if r["n"] == GOAL_AT_N and a50 is not None:
            ok = a50 <= GOAL_ADDED_P50_MS and a99 <= GOAL_ADDED_P99_MS
            out.append(
                f"N={r['n']}: added to first audio p50 {a50:.2f} ms "
                f"(goal ≤ {GOAL_ADDED_P50_MS:g}), "
                f"p99 {a99:.2f} ms (goal ≤ {GOAL_ADDED_P99_MS:g}): {'MET' if ok else 'MISSED'}"
            )
        b99, c99 = st["barge_client"]["p99"], st["cancel"]["p99"]
        if b99 is not None and c99 is not None:
            worst = max(b99, c99)
            out.append(
                f"N={r['n']}: barge-in (VAD's append -> response.done) p99 {b99:.2f} ms "
                f"(speech_started -> response.done p99 {_f(st['barge']['p99'], '{:.2f}')}), "
                f"response.cancel -> response.done p99 {c99:.2f} ms "
                f"(goal ≤ {GOAL_BARGE_P99_MS:g}): "
                f"{'MET' if worst <= GOAL_BARGE_P99_MS else 'MISSED'}; events after a cancelled "
                f"response.done: {r['after_done_same'] + r['after_done_other']} (must be 0); "
                f"chat streams the fake saw aborted: {r['aborted']}/{r['cancelled']} "
                f"(done before the cancel: {r['chat_done_before_cancel']}, "
                f"ran on after it: {r['completed_after_cancel']}); "
                f"speech requests the fake read after the cancel: {r['speech_after_cancel']}, "
                f"after response.done was read: {r['speech_after_done']} "
                f"(answered: {r['speech_after_done_answered']}); speech requests of cancelled "
                f"responses the fake saw aborted: {r['speech_aborted']}"
            )
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ns = [r["n"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0][0]
    for key, style in (("added", "o-"), ("nominal_added", "s--")):
        ax.plot(ns, [r["stats"][key]["p50"] for r in rows], style, label=f"{key} p50")
        ax.plot(ns, [r["stats"][key]["p99"] for r in rows], style, label=f"{key} p99", alpha=0.6)
    ax.axhline(GOAL_ADDED_P50_MS, color="green", lw=0.8, ls=":", label="goal p50 (N=50)")
    ax.axhline(GOAL_ADDED_P99_MS, color="red", lw=0.8, ls=":", label="goal p99 (N=50)")
    ax.set(xlabel="concurrent conversations", ylabel="ms", title="added latency to first audio")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    for r in rows:
        v = sorted(r["samples"]["added"])
        if v:
            ax.plot(v, np.linspace(0, 1, len(v)), label=f"N={r['n']}")
    ax.set(xlabel="added ms (measured)", ylabel="fraction", title="added latency CDF")
    ax.set_xscale("symlog", linthresh=10)
    ax.legend(fontsize=7)
    ax = axes[1][0]
    for key in ("cancel", "barge", "barge_client", "cancel_abort", "barge_abort"):
        ax.plot(ns, [r["stats"][key]["p99"] for r in rows], "o-", label=f"{key} p99")
        ax.plot(ns, [r["stats"][key]["p50"] for r in rows], "x:", label=f"{key} p50", alpha=0.6)
    ax.axhline(GOAL_BARGE_P99_MS, color="red", lw=0.8, ls=":", label="goal p99")
    ax.set(xlabel="concurrent conversations", ylabel="ms",
           title="cancel / barge-in → response.done; → fake saw abort")  # fmt: skip
    ax.legend(fontsize=7)
    ax = axes[1][1]
    ax.plot(ns, [r["cpu_s_per_conv"] * 1000 for r in rows], "o-", label="server CPU ms / conv")
    ax.set(xlabel="concurrent conversations", ylabel="CPU ms per conversation",
           title="server cost per conversation")  # fmt: skip
    ax2 = ax.twinx()
    ax2.plot(ns, [r["rss_kb_per_conv"] for r in rows], "s--", color="C1", label="RSS KB / conv")
    ax2.set_ylabel("RSS KB per conversation")
    ax.legend(loc="upper left", fontsize=7)
    ax2.legend(loc="upper right", fontsize=7)
    fig.suptitle(
        "spear_rt conversations (server on one core; fakes: chat 200 + 20 ms/token, TTS 50 ms)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
