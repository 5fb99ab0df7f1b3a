"""Word error rate the way the issues define it: both sides normalized, then word Levenshtein.

Normalization (`normalized`): lowercase, hyphens and slashes as spaces, punctuation stripped,
digits as English words ("10" -> "ten", "5-5-5" -> "five five five"), so "Go forward 10
meters." and "go forward ten meters" score 0.
"""

from __future__ import annotations

import re

__all__ = ["normalized", "normalized_wer", "number_words", "transcript_words", "word_error_rate"]

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """An integer below a million as English words (`105` -> "one hundred five"); else digits."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + (" " + number_words(rest) if rest else "")
    if n < 1_000_000:
        rest = n % 1000
        return number_words(n // 1000) + " thousand" + (" " + number_words(rest) if rest else "")
    return " ".join(_ONES[int(d)] for d in str(n))


def normalized(text: str) -> str:
    """Lowercase, hyphens as spaces, punctuation stripped, numbers as words."""
    text = re.sub(r"[-–—/]", " ", text.lower())
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # 1,000 -> 1000
    text = re.sub(r"\d+", lambda m: f" {number_words(int(m.group()))} ", text)
    return " ".join(re.findall(r"[a-z']+", text))


def transcript_words(text: str) -> list[str]:
    """Lowercase words without punctuation (no number rule): the plain comparison."""
    return re.findall(r"[a-z0-9']+", text.lower())


def word_error_rate(reference: str, hypothesis: str) -> tuple[float, int, int]:
    """(WER, word edits, reference words): word Levenshtein over the reference length."""
    ref, hyp = transcript_words(reference), transcript_words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    edits = row[-1]
    return (edits / len(ref) if ref else float(edits > 0)), edits, len(ref)


def normalized_wer(reference: str, hypothesis: str) -> tuple[float, int, int]:
    """`word_error_rate` after `normalized` on both sides."""
    return word_error_rate(normalized(reference), normalized(hypothesis))
