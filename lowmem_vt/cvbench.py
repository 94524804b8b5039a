"""CV-Bench in its own schema: the reader (hub id or local parquet / JSON + images) and a generator of
CV-Bench-schema questions with rendered images and known answers (for offline tests and the demo).

CV-Bench schema (``nyu-visionx/CV-Bench``, ``test.parquet``; ``test.jsonl`` + ``img/`` for the raw files):
``idx``, ``type`` (2D / 3D), ``task`` (Count, Relation, Depth, Distance), ``source`` (ADE20K, COCO, Omni3D),
``image`` (an encoded image; the JSON files name it in ``filename`` instead), ``question``, ``prompt`` (the
question followed by lettered options), ``choices`` (option texts) and ``answer`` (a letter, ``"(A)"``).
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .data import COLORS, SHAPES, DataError, check_image_shape, decode_image, draw_shape, png_bytes, read_table, record_text
from .errors import what_is_at

CVBENCH_HUB_ID = "nyu-visionx/CV-Bench"
CVBENCH_DATA_FILE = "test.parquet"  # the full set with images embedded
REQUIRED_FIELDS = ("idx", "type", "task", "source", "prompt", "choices", "answer")
TABLE_SUFFIXES = (".parquet", ".json", ".jsonl")
_ANSWER = re.compile(r"\(([A-Z])\)")


@dataclass
class CVBenchItem:
    """One validated CV-Bench question; the image is decoded on use (the full set would not fit in memory)."""

    idx: int | str
    type: str
    task: str
    source: str
    prompt: str
    choices: list[str]
    answer: str  # "(A)"
    image_cell: Any  # the record's image (bytes, {'bytes'/'path'}, PIL) or its file name
    image_dir: str = ""

    @property
    def answer_index(self) -> int:
        return ord(self.answer[1]) - ord("A")

    @property
    def answer_text(self) -> str:
        return self.choices[self.answer_index]

    def load_image(self) -> Image.Image:
        try:
            image = decode_image(self.image_cell, self.image_dir)
            check_image_shape(image)
            return image
        except DataError as exc:
            raise DataError(f"CV-Bench record idx {self.idx}: {exc}") from exc
        except Exception as exc:  # PIL raises many types for corrupt bytes
            raise DataError(f"CV-Bench record idx {self.idx}: unreadable image ({type(exc).__name__}: {exc})") from exc


def record_to_item(record: dict, index: int, image_dir: str = "") -> CVBenchItem:
    """Validate one CV-Bench record. Raises DataError naming the record (position and ``idx``)."""
    if not isinstance(record, dict):
        raise DataError(f"CV-Bench record {index}: is {type(record).__name__}, not an object with the fields {', '.join(REQUIRED_FIELDS)}")
    where = f"CV-Bench record {index} (idx {str(record.get('idx', '?'))[:40]})"
    for key in REQUIRED_FIELDS:
        if record.get(key) is None:
            raise DataError(f"{where}: missing field {key!r}")
    image = record.get("image") if record.get("image") is not None else record.get("filename")
    if image is None:
        raise DataError(f"{where}: missing field 'image' (or 'filename' for the JSON annotations)")
    try:
        if not isinstance(record["choices"], (list, tuple)):
            raise DataError(f"'choices' is {type(record['choices']).__name__}; expected a list of option texts")
        choices = [record_text(c, f"choice {i}") for i, c in enumerate(record["choices"])]
        answer = record_text(record["answer"], "'answer'").strip()
        texts = [record_text(record[k], repr(k)) for k in ("type", "task", "source", "prompt")]
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    if len(choices) < 2:
        raise DataError(f"{where}: fewer than two choices")
    m = _ANSWER.fullmatch(answer)
    if not m or ord(m.group(1)) - ord("A") >= len(choices):
        raise DataError(f"{where}: answer {answer[:40]!r} is not a letter in parentheses naming one of the {len(choices)} choices")
    idx = record["idx"] if isinstance(record["idx"], (int, str)) else str(record["idx"])
    return CVBenchItem(idx, *texts, choices, answer, image, image_dir)


def _table_path(path: str, data_file: str) -> Path:
    """The annotation file of a local file or folder, or the hub file downloaded (cached) for an owner/name id."""
    p = Path(os.path.expanduser(path))
    if p.is_file():
        return p
    if p.is_dir():
        if (p / data_file).is_file():
            return p / data_file
        tables = sorted(x for x in p.iterdir() if x.suffix in TABLE_SUFFIXES)
        if len(tables) == 1:
            return tables[0]
        found = ", ".join(x.name for x in tables) or "none"
        raise DataError(f"{p}: no {data_file}; found data files: {found}. Name one with --data-file")
    if p.exists():
        raise DataError(f"CV-Bench data {path} {what_is_at(p)}; give a .parquet, .json or .jsonl file or a folder of them")
    if path.count("/") != 1 or path.startswith((".", "/", "~")):
        raise DataError(f"CV-Bench data {path!r} is neither a local file or folder nor a hub id owner/name")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(path, data_file, repo_type="dataset"))
    except Exception as exc:  # offline, unknown repo or file, network: each has its own type
        raise DataError(f"cannot get {data_file} of the hub dataset {path} ({type(exc).__name__}: {exc}); "
                        "download it and pass the local file or folder as --data") from exc


def spread(n_total: int, limit: int | None) -> list[int]:
    """``limit`` indices evenly spaced over ``range(n_total)`` (all when None): CV-Bench is ordered by task,
    so a prefix would test Count only."""
    if limit is None or limit >= n_total:
        return list(range(n_total))
    return [i * n_total // limit for i in range(limit)]


def load_cvbench(path: str = CVBENCH_HUB_ID, data_file: str = CVBENCH_DATA_FILE, *, limit: int | None = None,
                 image_dir: str | None = None) -> list[CVBenchItem]:
    """Validated items of a CV-Bench-schema set. ``image_dir`` (for records naming image files) defaults to the
    annotation file's folder, where the hub's ``img/`` lies."""
    table = _table_path(path, data_file)
    records = read_table(table)
    if not records:
        raise DataError(f"{table} holds no records")
    base = str(table.parent) if image_dir is None else image_dir
    return [record_to_item(records[i], i, base) for i in spread(len(records), limit)]


# ------------------------------------------------------------------------------------------- generator

TASKS = ("Count", "Relation", "Depth", "Distance")
TASK_TYPE = {"Count": "2D", "Relation": "2D", "Depth": "3D", "Distance": "3D"}
TYPE_SOURCES = {"2D": ("ADE20K", "COCO"), "3D": ("Omni3D",)}


def lettered_prompt(question: str, choices: list[str]) -> str:
    """CV-Bench's prompt: the question, then one ``(A) option`` line per choice."""
    lines = [f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(choices)]
    return question + " Select from the following choices.\n" + "\n".join(lines)


def generate_cvbench_records(n: int, *, size: int = 112, seed: int = 0) -> list[dict]:
    """``n`` records in CV-Bench's schema with rendered images, in CV-Bench's order: a block per task (Count,
    Relation, Depth, Distance), 2D sources alternating between ADE20K and COCO.

    The answers follow from the drawing: Depth's closer object is drawn larger; Distance's objects have equal
    sizes and the answer is the one drawn nearer the reference object.
    """
    rng = random.Random(seed)
    records = []
    counts = {t: 0 for t in ("2D", "3D")}
    for i in range(n):
        task = TASKS[i * len(TASKS) // n]
        kind = TASK_TYPE[task]
        sources = TYPE_SOURCES[kind]
        source = sources[counts[kind] % len(sources)]
        counts[kind] += 1
        img = Image.new("RGB", (size, size), (245, 245, 245))
        draw = ImageDraw.Draw(img)
        c1, c2, c3 = rng.sample(list(COLORS), 3)
        s1, s2, s3 = rng.sample(SHAPES, 3)
        a, b, ref = f"{c1} {s1}", f"{c2} {s2}", f"{c3} {s3}"
        r = size * 0.12
        if task == "Count":
            k = rng.randint(1, 4)
            for x, y in rng.sample([(x, y) for x in range(3) for y in range(3)], k):
                draw_shape(draw, s1, size * (x + 0.5) / 3, size * (y + 0.5) / 3, size * 0.1, COLORS[c1])
            question = f"How many {c1} {s1}s are in the image?"
            choices, correct = [str(v) for v in rng.sample(range(0, 5), 4)], str(k)
            if correct not in choices:
                choices[rng.randrange(4)] = correct
        elif task == "Relation":
            left = rng.random() < 0.5
            xa, xb = (size * 0.25, size * 0.75) if left else (size * 0.75, size * 0.25)
            draw_shape(draw, s1, xa, size * rng.uniform(0.3, 0.7), r, COLORS[c1])
            draw_shape(draw, s2, xb, size * rng.uniform(0.3, 0.7), r, COLORS[c2])
            question = (f"Considering the relative positions of the {a} and the {b} in the image provided, "
                        f"where is the {a} located with respect to the {b}?")
            choices, correct = ["left", "right"], "left" if left else "right"
        elif task == "Depth":
            a_closer = rng.random() < 0.5
            ra, rb = (r * 1.6, r * 0.7) if a_closer else (r * 0.7, r * 1.6)
            draw_shape(draw, s1, size * 0.28, size * 0.5, ra, COLORS[c1])
            draw_shape(draw, s2, size * 0.72, size * 0.5, rb, COLORS[c2])
            question = f"Which object is closer to the camera taking this photo, the {a} or the {b}?"
            choices, correct = [a, b], a if a_closer else b
        else:
            a_near = rng.random() < 0.5
            xa, xb = (size * 0.42, size * 0.85) if a_near else (size * 0.85, size * 0.42)
            draw_shape(draw, s3, size * 0.15, size * 0.5, r, COLORS[c3])
            draw_shape(draw, s1, xa, size * 0.3, r, COLORS[c1])
            draw_shape(draw, s2, xb, size * 0.7, r, COLORS[c2])
            question = (f"Estimate the real-world distances between objects in this image. "
                        f"Which object is closer to the {ref}, the {a} or the {b}?")
            choices, correct = [a, b], a if a_near else b
        if task != "Count":
            rng.shuffle(choices)
        records.append({
            "idx": i, "type": kind, "task": task, "source": source,
            "image": {"bytes": png_bytes(img), "path": None},
            "question": question, "prompt": lettered_prompt(question, choices), "choices": choices,
            "answer": f"({chr(ord('A') + choices.index(correct))})",
            "filename": f"img/{kind}/{task.lower()}/generated_{i}.png",
        })
    return records
