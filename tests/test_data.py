import io
import json

import pytest
from PIL import Image

from lowmem_vt.data import (
    DataError,
    build_prompt_text,
    examples_from_records,
    generate_sat_records,
    read_sat_records,
    sat_question,
    write_parquet,
)


def test_question_format_is_the_papers():
    q = sat_question("Which is closer?", ["a", "b", "c"])
    assert q == "Answer in natural language. Which is closer? Choose between the following options: a, b or c"
    assert sat_question("Q?", ["x", "y"]).endswith("options: x or y")
    p = build_prompt_text("Q?")
    assert p.startswith("<|vision_start|><|image_pad|><|vision_end|>A conversation between User and Assistant.")
    assert p.endswith("User: Q? \nAssistant: Let me solve this step by step.\n<think>")


def test_generated_records_have_sat_schema_and_correct_answers():
    recs = generate_sat_records(8, size=56, seed=3)
    for r in recs:
        assert set(r) >= {"image_bytes", "question", "answers", "correct_answer"}
        assert r["correct_answer"] in r["answers"]
        assert isinstance(r["image_bytes"], list) and len(r["image_bytes"]) == 1
        Image.open(io.BytesIO(r["image_bytes"][0])).verify()
    assert {r["question_type"] for r in recs} == {"left_right", "above_below", "closer", "count"}


def test_generated_left_right_answer_matches_the_drawing():
    for r in generate_sat_records(12, size=56, tasks=["left_right"], seed=5):
        img = Image.open(io.BytesIO(r["image_bytes"][0])).convert("RGB")
        color = r["question"].split("the ")[1].split()[0]  # "Is the <color> <shape> to the ..."
        rgb = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (230, 200, 30)}[color]
        xs = [x for x in range(56) for y in range(56) if img.getpixel((x, y)) == rgb]
        side = "left" if sum(xs) / len(xs) < 28 else "right"
        assert side == r["correct_answer"]


def test_sat_loader_reads_local_parquet_and_jsonl(tmp_path):
    recs = generate_sat_records(6, seed=1)
    write_parquet(recs, tmp_path / "SAT_train.parquet")
    rows = read_sat_records(str(tmp_path), "SAT_train.parquet", max_samples=100)
    assert len(rows) == 6 and rows[0]["question"] == recs[0]["question"]
    ex, report = examples_from_records(rows, max_samples=4, shuffle_options=True, max_pixels=401408, seed=0)
    assert len(ex) == 4 and report.kept == 4
    assert all(e.answer in e.choices for e in ex)
    assert sorted(ex[0].choices) == sorted(recs[0]["answers"])
    # JSONL with image file names beside it
    img = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(img)
    (tmp_path / "d.jsonl").write_text(json.dumps({"image_bytes": "img.png", "question": "Q?", "answers": ["a", "b"], "correct_answer": "a"}))
    rows = read_sat_records(str(tmp_path / "d.jsonl"), "", 10)
    ex, _ = examples_from_records(rows, max_samples=10, shuffle_options=False, max_pixels=401408, seed=0, image_dir=str(tmp_path))
    assert ex[0].question.endswith("options: a or b")


def test_bad_records_are_skipped_and_counted(caplog):
    good = generate_sat_records(2, seed=0)
    bad = [
        {**good[0], "image_bytes": [b"not an image"]},
        {**good[0], "question": "  "},
        {**good[0], "correct_answer": "purple"},
        {k: v for k, v in good[0].items() if k != "answers"},
        {**good[0], "image_bytes": [good[0]["image_bytes"][0]] * 2},
    ]
    ex, report = examples_from_records(bad + good, max_samples=10, shuffle_options=False, max_pixels=401408, seed=0)
    assert len(ex) == 2
    assert report.as_metrics() == {"data_kept": 2, "data_skipped": 5}
    assert "record 0" in caplog.text and "unreadable image" in caplog.text and "record 3" in caplog.text
    with pytest.raises(DataError, match="record 0 .*not among the options"):
        examples_from_records(bad[2:3], max_samples=1, shuffle_options=False, max_pixels=401408, seed=0, on_error="raise")


def test_oversized_image_is_rejected():
    rec = generate_sat_records(1, size=200, seed=0)[0]
    with pytest.raises(DataError, match="over 16 x max_pixels"):
        examples_from_records([rec], max_samples=1, shuffle_options=False, max_pixels=100, seed=0, on_error="raise")
