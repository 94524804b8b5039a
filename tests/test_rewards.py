import re

import pytest
pytest.importorskip("hypothesis", reason="a dev package (the GPU machine has it: requirements/gpu-machine.txt)")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lowmem_vt.rewards import accuracy_reward, extract_answer, format_reward, reflection_rate

# completion (what follows the prompt's "<think>"), answer, format, exact accuracy
TABLE = [
    ("I see it on the left. </think> <answer>left</answer>", "left", 1.0, 1.0),
    ("reasoning</think><answer> left </answer>", "left", 1.0, 1.0),  # stripped
    ("reasoning</think>\n\n<answer>right</answer>", "left", 1.0, 0.0),  # wrong answer
    ("reasoning</think> <answer>left</answer> and more text", "left", 0.0, 1.0),  # extra text after </answer>
    ("no tags at all", "left", 0.0, 0.0),
    ("left", "left", 0.0, 1.0),  # no <answer>: the whole completion is the answer
    ("", "left", 0.0, 0.0),  # empty
    ("x</think>", "left", 0.0, 0.0),  # missing answer tags
    ("x <answer>left</answer>", "left", 0.0, 1.0),  # missing </think>
    ("a</think><answer>Left</answer>", "left", 1.0, 0.0),  # case differs: exact rule says no
    ("a</think><answer>left</answer><answer>right</answer>", "left", 1.0, 1.0),  # first <answer> counts
    # the paper searches without DOTALL: tags spanning a line break do not match, the whole completion is
    # compared and scores 0, while the format rule (DOTALL) still accepts it
    ("a</think> <answer>left\n</answer>", "left", 1.0, 0.0),
    ("a</think> <answer>\nleft</answer>", "left", 1.0, 0.0),
    ("a\nb</think>\n<answer>left</answer>", "left", 1.0, 1.0),  # line breaks outside the tags are fine
    ("a</think> <answer>x\ny</answer> <answer>left</answer>", "left", 1.0, 1.0),  # first one-line match counts
]


@pytest.mark.parametrize("completion,answer,fmt,acc", TABLE)
def test_reward_table(completion, answer, fmt, acc):
    assert format_reward(completion) == fmt
    assert accuracy_reward(completion, answer) == acc


def test_normalized_accuracy_accepts_case_punctuation_and_letters():
    choices = ["red circle", "blue square"]
    assert accuracy_reward("<answer>Red Circle.</answer>", "red circle", choices, mode="normalized") == 1.0
    assert accuracy_reward("<answer>(b)</answer>", "blue square", choices, mode="normalized") == 1.0
    assert accuracy_reward("<answer>A</answer>", "blue square", choices, mode="normalized") == 0.0
    assert accuracy_reward("<answer>Red Circle.</answer>", "red circle", choices, mode="exact") == 0.0


def test_extract_answer_and_reflection_rate():
    assert extract_answer("x <answer> 3 </answer>") == "3"
    assert extract_answer("  plain  ") == "plain"
    texts = ["Wait, let me re-check.", "it is left", "However it may be", "awaited"]
    assert reflection_rate(texts, ["wait", "re-check", "however"]) == 0.5


def paper_accuracy(content: str, sol: str) -> float:
    """The paper's string rule, quoted from its code (open_r1/grpo.py, accuracy_reward), with the solution
    written as ``<answer>{option}</answer>`` as its data does."""
    sol_match = re.search(r'<answer>(.*?)</answer>', sol)
    ground_truth = sol_match.group(1).strip() if sol_match else sol.strip()
    content_match = re.search(r'<answer>(.*?)</answer>', content)
    student_answer = content_match.group(1).strip() if content_match else content.strip()
    return 1.0 if student_answer == ground_truth else 0.0


def paper_format(completion: str) -> float:
    """The paper's format rule, quoted: ``"<think>" + completion`` fully matched with DOTALL."""
    pattern = r"<think>.*?</think>\s*<answer>.*?</answer>"
    return 1.0 if re.fullmatch(pattern, "<think>" + completion, re.DOTALL) else 0.0


PIECES = ["<answer>", "</answer>", "</think>", "<think>", "left", "right", " ", "\n", "\t", "x", "Left"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=12), st.sampled_from(["left", "right", " left "]))
def test_exact_mode_is_the_papers_rule_character_for_character(pieces, answer):
    completion = "".join(pieces)
    assert accuracy_reward(completion, answer, mode="exact") == paper_accuracy(completion, f"<answer>{answer}</answer>")
    assert format_reward(completion) == paper_format(completion)


def test_normalized_mode_reads_answers_across_line_breaks():
    assert accuracy_reward("a</think> <answer>left\n</answer>", "left", mode="exact") == 0.0
    assert accuracy_reward("a</think> <answer>left\n</answer>", "left", mode="normalized") == 1.0
    assert extract_answer("<answer>\n left \n</answer>", lenient=True) == "left"
