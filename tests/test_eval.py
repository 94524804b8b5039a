"""CV-Bench evaluation: the schema reader, the generated set's known answers, scoring of hand-made responses,
the two overall figures, and the command end to end on the tiny model."""

import json
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lowmem_vt.cvbench import generate_cvbench_records, load_cvbench, record_to_item
from lowmem_vt.data import COLORS, draw_shape, write_parquet
from lowmem_vt.data import DataError
from lowmem_vt.eval import Scored, choice_index, evaluate, score, summarize, to_markdown


@pytest.fixture(scope="module")
def records():
    return generate_cvbench_records(16, size=112, seed=0)


@pytest.fixture(scope="module")
def parquet(records, tmp_path_factory):
    return write_parquet(records, tmp_path_factory.mktemp("cvbench") / "test.parquet")


def test_generated_set_has_cvbench_schema_and_known_answers(records, parquet):
    items = load_cvbench(str(parquet.parent))  # a folder: its test.parquet
    assert len(items) == 16
    assert [it.task for it in items[::4]] == ["Count", "Relation", "Depth", "Distance"]  # CV-Bench's order
    assert {(it.type, it.source) for it in items} == {("2D", "ADE20K"), ("2D", "COCO"), ("3D", "Omni3D")}
    for rec, it in zip(records, items):
        assert set(rec) >= {"idx", "type", "task", "source", "image", "prompt", "choices", "answer"}
        assert it.answer in {f"({c})" for c in "ABCD"[: len(it.choices)]}
        assert f"{it.answer} {it.answer_text}" in it.prompt  # the lettered option lines
        assert it.load_image().size == (112, 112)
    for it in items:
        assert _answer_from_pixels(it) == it.answer_text, it.prompt


def _answer_from_pixels(item) -> str:
    """Read the answer off the rendered image: shape areas (count, depth) and centroids (relation, distance)."""
    img = np.asarray(item.load_image())

    def blob(name):
        color, shape = name.split()
        m = (img == COLORS[color]).all(-1)
        ys, xs = np.nonzero(m)
        return m.sum(), np.array([xs.mean(), ys.mean()]), shape

    names = re.findall(r"(?:red|blue|green|yellow) (?:circle|square|triangle)", item.prompt.split(" Select")[0])
    if item.task == "Count":
        area, _, shape = blob(names[0].rstrip("s"))
        one = Image.new("RGB", (112, 112))
        draw_shape(ImageDraw.Draw(one), shape, 56, 56, 112 * 0.1, (255, 0, 0))
        return str(round(area / (np.asarray(one)[..., 0] == 255).sum()))
    if item.task == "Relation":
        a, b = blob(names[0]), blob(names[1])
        return "left" if a[1][0] < b[1][0] else "right"
    if item.task == "Depth":
        return max(names[:2], key=lambda n: blob(n)[0])  # the closer object is drawn larger
    ref = blob(names[0])[1]
    return min(names[1:3], key=lambda n: np.linalg.norm(blob(n)[1] - ref))


def test_json_annotations_with_image_files(records, tmp_path):
    lines = []
    for rec in records[:4]:
        path = tmp_path / rec["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rec["image"]["bytes"])
        lines.append(json.dumps({k: v for k, v in rec.items() if k != "image"}))
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    items = load_cvbench(str(tmp_path / "test.jsonl"))
    first = record_to_item(records[0], 0)
    assert items[0].answer == first.answer and items[0].prompt == first.prompt
    assert list(items[0].load_image().getdata()) == list(first.load_image().getdata())


def test_missing_field_names_the_record(records, tmp_path):
    broken = [dict(r) for r in records[:5]]
    del broken[3]["prompt"]
    write_parquet(broken, tmp_path / "test.parquet")
    with pytest.raises(DataError, match=r"record 3 \(idx 3\): missing field 'prompt'"):
        load_cvbench(str(tmp_path / "test.parquet"))
    bad = dict(records[1], answer="(E)")
    with pytest.raises(DataError, match=r"idx 1\).*answer '\(E\)'"):
        record_to_item(bad, 1)
    no_image = {k: v for k, v in records[2].items() if k not in ("image", "filename")}
    with pytest.raises(DataError, match="missing field 'image'"):
        record_to_item(no_image, 2)


def test_limit_spreads_over_the_tasks(parquet):
    items = load_cvbench(str(parquet), limit=4)
    assert [it.idx for it in items] == [0, 4, 8, 12]
    assert [it.task for it in items] == ["Count", "Relation", "Depth", "Distance"]
    assert len(load_cvbench(str(parquet), limit=100)) == 16


@pytest.mark.parametrize("text, expected", [
    ("B", 1), ("b", 1), ("(B)", 1), ("(b)", 1), (" B. ", 1),
    ("right", 1), ("Right.", 1), ("(B) right", 1), ("B: right", 1),
    ("(A) right", None),  # letter and text disagree
    ("C", None), ("the answer is B", None), ("", None),
])
def test_choice_index_forms(text, expected):
    assert choice_index(text, ["left", "right"]) == expected


def test_scoring_hand_made_responses(records):
    item = record_to_item(dict(records[1], choices=["left", "right"], answer="(B)"), 1)
    cases = {
        "the circle is on the left.</think> <answer>(B)</answer>": (True, True),
        "hm</think> <answer>b</answer>": (True, True),
        "hm</think> <answer>right</answer>": (True, True),
        "B": (True, False),  # no tags: the whole response is the answer
        "right": (True, False),
        "hm</think> <answer>(A)</answer>": (False, True),
        "the answer is B": (False, False),
        "hm</think> <answer>(B)": (False, False),  # unclosed tag: the whole response, which names no option
    }
    for response, (correct, fmt) in cases.items():
        s = score(item, response, 5)
        assert (s.correct, s.format_ok) == (correct, fmt), response
    assert score(item, "<answer>a</answer>").prediction == "(A)"
    assert score(item, "nothing").prediction is None


def _row(kind, source, task, correct):
    return Scored(0, kind, task, source, "(A)", "(A)" if correct else "(B)", correct, correct, 10, "")


def test_summary_plain_mean_and_cvbench_overall():
    rows = ([_row("2D", "ADE20K", "Count", True)] * 3 + [_row("2D", "COCO", "Relation", False)]
            + [_row("3D", "Omni3D", "Depth", True)] + [_row("3D", "Omni3D", "Distance", False)] * 3)
    s = summarize(rows)
    assert s["n"] == 8
    assert s["overall"]["mean"] == pytest.approx(4 / 8)
    # 2D: mean(ADE20K 1.0, COCO 0.0) = 0.5; 3D: Omni3D 0.25; CV-Bench overall = mean(0.5, 0.25)
    assert s["per_type"]["2D"]["source_mean"] == pytest.approx(0.5)
    assert s["per_type"]["2D"]["accuracy"] == pytest.approx(0.75)
    assert s["overall"]["cvbench"] == pytest.approx(0.375)
    assert list(s["per_task"]) == ["Count", "Relation", "Depth", "Distance"]
    assert s["per_task"]["Distance"] == {"n": 3, "accuracy": 0.0}
    assert s["format_rate"] == pytest.approx(0.5) and s["mean_response_tokens"] == 10
    md = to_markdown(s)
    assert "| **overall, mean of items** | 8 | **50.00** |" in md and "| overall, CV-Bench (mean of 2D and 3D) | 8 | 37.50 |" in md


def test_evaluate_with_oracle_and_constant_responders(parquet):
    items = load_cvbench(str(parquet))
    oracle = lambda batch: [(f"look</think> <answer>{it.answer}</answer>", 7) for it in batch]  # noqa: E731
    rows, s = evaluate(items, oracle, batch_size=5, progress=False)
    assert s["overall"] == {"mean": 1.0, "cvbench": 1.0} and s["format_rate"] == 1.0
    text_only = lambda batch: [(it.answer_text.upper(), 3) for it in batch]  # noqa: E731
    _, s = evaluate(items, text_only, batch_size=16, progress=False)
    assert s["overall"]["mean"] == 1.0 and s["format_rate"] == 0.0 and s["mean_response_tokens"] == 3
    _, s = evaluate(items, lambda batch: [("A", 1)] * len(batch), batch_size=3, progress=False)
    assert s["overall"]["mean"] == pytest.approx(sum(it.answer == "(A)" for it in items) / len(items))


def test_eval_command_on_the_tiny_model(tiny_dir, parquet, tmp_path):
    from lowmem_vt.eval import main

    out = tmp_path / "eval"
    rc = main(["--model", str(tiny_dir), "--data", str(parquet), "--limit", "4", "--batch-size", "2",
               "--max-new-tokens", "4", "--device", "cpu", "--out", str(out), "--no-progress"])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    assert result["n"] == 4 and 0.0 <= result["overall"]["mean"] <= 1.0
    assert set(result["per_task"]) == {"Count", "Relation", "Depth", "Distance"}
    assert result["settings"]["max_new_tokens"] == 4 and result["settings"]["decoding"] == "greedy"
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and all(1 <= p["response_tokens"] <= 4 for p in preds)
    assert (out / "results.md").read_text().startswith("### CV-Bench")


def test_eval_command_reports_bad_data(tiny_dir, records, tmp_path, capsys):
    from lowmem_vt.cli import main

    broken = [dict(r) for r in records[:2]]
    del broken[1]["choices"]
    write_parquet(broken, tmp_path / "bad.parquet")
    rc = main(["eval", "--model", str(tiny_dir), "--data", str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "record 1 (idx 1): missing field 'choices'" in capsys.readouterr().err
    assert main(["eval", "--data", str(tmp_path / "bad.parquet")]) == 2  # neither --model nor --checkpoint
