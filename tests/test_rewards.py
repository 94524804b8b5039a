import pytest

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
