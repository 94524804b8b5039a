"""Rule-based rewards of the R1-Zero recipe. Each returns 0.0 or 1.0 and never raises.

The completion is what the model wrote *after* the prompt, which already ends in ``<think>``.
"""

from __future__ import annotations

import re
import string
from typing import Callable, Sequence

# The paper's code (VisualThinker-R1-Zero, src/open-r1-multimodal/src/open_r1/grpo.py):
#   format:   re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", "<think>" + completion, re.DOTALL)
#   accuracy: m = re.search(r'<answer>(.*?)</answer>', content)          # no DOTALL
#             student_answer = m.group(1).strip() if m else content.strip(); reward = student_answer == truth
# Without DOTALL an answer whose tags span a line break ("<answer>left\n</answer>") does not match, and the
# whole completion is compared instead (it scores 0): `exact` keeps that. `normalized` reads across lines.
FORMAT_PATTERN = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
ANSWER_PATTERN = re.compile(r"<answer>(.*?)</answer>")
LENIENT_ANSWER_PATTERN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def format_reward(completion: str, **_) -> float:
    """1 when ``"<think>" + completion`` is exactly ``<think>…</think> <answer>…</answer>`` (paper)."""
    try:
        return 1.0 if FORMAT_PATTERN.fullmatch("<think>" + completion) else 0.0
    except Exception:  # noqa: BLE001 -- a reward must never stop a run
        return 0.0


def extract_answer(completion: str, lenient: bool = False) -> str:
    """Text inside the first ``<answer>…</answer>``, or the whole completion when there is none, stripped.

    The paper's rule matches within one line; ``lenient`` also matches tags that span line breaks.
    """
    m = (LENIENT_ANSWER_PATTERN if lenient else ANSWER_PATTERN).search(completion)
    return (m.group(1) if m else completion).strip()


_PUNCT = str.maketrans("", "", string.punctuation)


def _normalize(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCT).split())


def _letter(text: str) -> int | None:
    """Option index of a bare letter answer: A, a, (A), (a), A. -> 0."""
    m = re.fullmatch(r"\(?\s*([A-Za-z])\s*[\).:]?", text.strip())
    return ord(m.group(1).upper()) - ord("A") if m else None


def accuracy_reward(completion: str, answer: str, choices: Sequence[str] = (), mode: str = "exact", **_) -> float:
    """1 when the extracted answer is the correct option.

    exact (paper, character for character): the first single-line ``<answer>…</answer>`` (else the whole
    completion), stripped, equals the option text. normalized: also reads tags across line breaks, ignores
    case, punctuation and extra spaces, and accepts the option's letter (A, (a), ...) when ``choices`` are given.
    """
    try:
        pred = extract_answer(completion, lenient=mode == "normalized")
        if pred == answer.strip():
            return 1.0
        if mode != "normalized":
            return 0.0
        if _normalize(pred) == _normalize(answer) and _normalize(answer):
            return 1.0
        idx = _letter(pred)
        if idx is not None and 0 <= idx < len(choices) and choices[idx].strip() == answer.strip():
            return 1.0
        return 0.0
    except Exception:  # noqa: BLE001
        return 0.0


REWARD_FUNCS: dict[str, Callable[..., float]] = {"format": format_reward, "accuracy": accuracy_reward}


def compute_rewards(
    completions: list[str], answers: list[str], choices: list[Sequence[str]], funcs: list[str], accuracy_mode: str = "exact"
) -> dict[str, list[float]]:
    """One list of rewards per reward function, each aligned with ``completions``."""
    out: dict[str, list[float]] = {}
    for name in funcs:
        fn = REWARD_FUNCS[name]
        out[name] = [fn(c, answer=a, choices=ch, mode=accuracy_mode) for c, a, ch in zip(completions, answers, choices)]
    return out


def reflection_rate(completions: list[str], words: list[str]) -> float:
    """Share of completions that use any reflection word (whole-word, case-insensitive)."""
    if not completions or not words:
        return 0.0
    pattern = re.compile(r"(?<![\w-])(" + "|".join(re.escape(w) for w in words) + r")(?![\w-])", re.IGNORECASE)
    return sum(1 for c in completions if pattern.search(c)) / len(completions)
