"""SAT data: the real loader (hub id or local files), the paper's question format, and a generator of
SAT-style spatial questions with rendered images written in SAT's own schema.

SAT schema (``array/SAT``, ``SAT_train.parquet``): ``image_bytes`` (a list of encoded images; the paper
keeps single-image rows), ``question``, ``answers`` (option texts), ``correct_answer`` (an option text).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageDraw

from .errors import UserError, what_is_at

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"

# The paper's base-model prompt, verbatim; the completion is primed with "<think>".
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question about the image, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then provides the user "
    "with the answer.\nUser: {question} \nAssistant: Let me solve this step by step.\n<think>"
)


class DataError(UserError, ValueError):
    """A record that cannot be used; the message names the record."""


@dataclass
class Example:
    """One prompt: its image, the question text as asked (options included), the options and the answer;
    ``more_images``: a multi-image question's images after the first (``data.max_images_per_question``)."""

    uid: str
    image: Image.Image
    question: str
    choices: list[str]
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)
    more_images: list[Image.Image] = field(default_factory=list)

    @property
    def images(self) -> list[Image.Image]:
        return [self.image, *self.more_images]


def join_options(options: list[str]) -> str:
    """``[a, b, c]`` -> ``"a, b or c"`` (the paper's joining)."""
    if len(options) == 1:
        return options[0]
    return ", ".join(options[:-1]) + " or " + options[-1]


# the sentence that lists the options; prompt truncation keeps it whole (see inputs.InputBuilder)
OPTIONS_SENTENCE = " Choose between the following options: "
SAT_COLUMNS = ("image_bytes", "question", "answers", "correct_answer")


def sat_question(question: str, options: list[str]) -> str:
    return f"Answer in natural language. {question}{OPTIONS_SENTENCE}{join_options(options)}"


def build_prompt_text(question: str) -> str:
    """The full prompt string, image placeholder first (the placeholder is expanded by the input builder)."""
    return IMAGE_PLACEHOLDER + R1_ZERO_TEMPLATE.format(question=question)


# ------------------------------------------------------------------------------------------- decoding


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB, faithfully: 16/32-bit and float images are scaled (not clipped) to 0..255, and transparent
    pixels are composited on white (not shown in the colour hidden under them)."""
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            top = 1.0 if a.size and a.max() <= 1.0 else 255.0  # float pixels: 0..1, or 0..255 when larger
        else:
            top = 65535.0  # integer grey: 16-bit (PNG stores 16-bit grey as I;16 or I)
        return Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def decode_image(value: Any, image_dir: str = "") -> Image.Image:
    """An image from SAT's ``image_bytes`` cell (bytes, {'bytes': ...}, {'path': ...}) or a file name."""
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise DataError("image cell has neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        img = Image.open(io.BytesIO(value))
    elif isinstance(value, str):
        if _URL.match(value):  # (a Path would also fold its "//" into "/")
            raise DataError(f"image {value[:120]!r} is a URL; URLs are not fetched: download the images and name the files "
                            "(relative to data.image_dir), or store their bytes in the record")
        p = Path(image_dir) / value if image_dir and not os.path.isabs(value) else Path(value)
        if not p.is_file():
            what = what_is_at(p)
            raise DataError(f"image file not found: {p}" if what == "does not exist" else f"image file {p} {what}")
        img = Image.open(p)
    else:
        raise DataError(f"unsupported image value of type {type(value).__name__}")
    img.load()
    return to_rgb(img)


# Qwen2-VL's image processor refuses images whose long side is over 200 times the short one
MAX_ASPECT_RATIO = 200


def check_image_shape(image: Image.Image) -> None:
    """DataError for an image the processor cannot take: empty, or an aspect ratio over MAX_ASPECT_RATIO."""
    w, h = image.size
    if w < 1 or h < 1:
        raise DataError(f"image {w}x{h} is empty")
    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise DataError(f"image {w}x{h} has an aspect ratio over {MAX_ASPECT_RATIO} (the image processor refuses it)")


def record_text(value: Any, what: str) -> str:
    """A text field of a record: a string, UTF-8 bytes (parquet binary columns) or a number; DataError otherwise
    (never the Python repr of bytes or of a structure)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{what} is bytes that are not UTF-8 text") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{what} is {type(value).__name__}, not text")


def record_to_example(
    record: dict,
    index: int,
    *,
    rng: random.Random,
    shuffle_options: bool,
    max_pixels: int,
    image_dir: str = "",
    max_images: int = 1,
) -> Example:
    """Validate one SAT-schema record and turn it into an Example. Raises DataError naming the record.
    ``max_images``: records with more images are refused (1: the paper's single-image rows)."""
    if not isinstance(record, dict):
        raise DataError(f"record {index}: is {type(record).__name__}, not an object with the fields {', '.join(SAT_COLUMNS)}")
    uid = str(record.get("id", record.get("idx", index)))[:80]
    where = f"record {index} (id {uid})"
    for key in ("image_bytes", "question", "answers", "correct_answer"):
        if key not in record or record[key] is None:
            raise DataError(f"{where}: missing field {key!r}")
    images = record["image_bytes"]
    if not isinstance(images, (list, tuple)):
        images = [images]
    images = list(images)
    if not images:
        raise DataError(f"{where}: no image")
    if len(images) > max_images:
        raise DataError(f"{where}: {len(images)} images; the recipe keeps questions with at most {max_images} "
                        "(data.max_images_per_question)" if max_images > 1 else
                        f"{where}: {len(images)} images; the recipe uses single-image rows (data.max_images_per_question: 1)")
    try:
        question = record_text(record["question"], "'question'").strip()
        if not isinstance(record["answers"], (list, tuple)):
            raise DataError(f"'answers' is {type(record['answers']).__name__} {str(record['answers'])[:60]!r}; expected a list of option texts")
        options = [record_text(a, f"option {i} of 'answers'") for i, a in enumerate(record["answers"])]
        answer = record_text(record["correct_answer"], "'correct_answer'")
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    if not question:
        raise DataError(f"{where}: empty question")
    if len(options) < 2:
        raise DataError(f"{where}: fewer than two answer options")
    if answer not in options:
        raise DataError(f"{where}: correct_answer {answer[:60]!r} is not among the options {[o[:40] for o in options[:8]]}")
    decoded = []
    for cell in images:
        try:
            image = decode_image(cell, image_dir)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from exc
        except Exception as exc:  # PIL raises many types for corrupt bytes
            raise DataError(f"{where}: unreadable image ({type(exc).__name__}: {exc})") from exc
        # Images are resized to max_pixels by the processor; one this far beyond it is a broken record
        # (it would cost a decode of tens of megapixels for nothing), so it is skipped.
        if image.width * image.height > 16 * max_pixels:
            raise DataError(f"{where}: image {image.width}x{image.height} is over 16 x max_pixels ({max_pixels})")
        try:
            check_image_shape(image)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        decoded.append(image)
    if shuffle_options:
        options = options[:]
        rng.shuffle(options)
    return Example(uid, decoded[0], sat_question(question, options), options, answer, {"raw_question": question},
                   more_images=decoded[1:])


def _text_of(path: Path) -> str:
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"data file {path} is UTF-16 text; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"data file {path} line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save it as UTF-8") from None


def read_table(path: Path, limit: int | None = None) -> list:
    """The records of one .parquet / .json / .jsonl file (the first ``limit`` if given). Raises DataError
    naming the file (and line) for an empty, unreadable or malformed file. A record that is not an object is
    returned as it is (``record_to_example`` skips it, counted)."""
    if path.suffix not in (".parquet", ".json", ".jsonl"):
        raise DataError(f"unsupported data file {path}; expected .parquet, .json or .jsonl")
    if not path.is_file():  # a device or a pipe is never read: it could not end
        raise DataError(f"data file {path} {what_is_at(path)}; give a .parquet, .json or .jsonl file")
    try:
        if path.stat().st_size == 0:
            raise DataError(f"data file {path} is empty")
    except OSError as exc:
        raise DataError(f"data file {path} cannot be read ({exc.strerror or exc})") from None
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            if limit is None:
                return pq.read_table(path).to_pylist()
            batch = next(pq.ParquetFile(path).iter_batches(batch_size=limit), None)
            return [] if batch is None else batch.to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"data file {path} is not a readable parquet file ({type(exc).__name__}: {exc}); "
                            "re-export it, or point data.path at the right file") from None
    try:
        text = _text_of(path)
    except OSError as exc:
        raise DataError(f"data file {path} cannot be read ({exc.strerror or exc})") from None
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except (json.JSONDecodeError, RecursionError) as exc:
                    msg = f"{exc.msg}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "nested too deep"
                    raise DataError(f"{path} line {n}: not valid JSON ({msg}); fix or remove that line") from None
            if limit is not None and len(rows) >= limit:
                break
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg}); fix the file") from None
    except RecursionError:
        raise DataError(f"{path}: not valid JSON (nested too deep); fix the file") from None
    rows = data if isinstance(data, list) else data.get("data", []) if isinstance(data, dict) else []
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a list of records (or an object whose 'data' is one)")
    return rows[:limit] if limit is not None else rows


def _local_files(p: Path, data_file: str) -> list[Path]:
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise DataError(f"data.path {p} {what_is_at(p)}; give a .parquet, .json or .jsonl file or a folder of them")
    f = p / data_file
    files = [f] if f.is_file() else sorted(x for x in p.iterdir() if x.suffix in (".parquet", ".json", ".jsonl"))
    if not files:
        raise DataError(f"no {data_file} or .parquet/.json/.jsonl files in {p}")
    return files


def peek_records(data_cfg, n: int = 8) -> None:
    """A local dataset's first file has SAT's columns and at least one of its first ``n`` records is usable;
    raises DataError naming the file, the missing column or the first record's problem."""
    f = _local_files(Path(os.path.expanduser(data_cfg.path)), data_cfg.data_file)[0]
    rows = read_table(f, limit=n)
    if not rows:
        raise DataError(f"data file {f} holds no records")
    if f.suffix == ".parquet":
        import pyarrow.parquet as pq

        columns = pq.read_schema(f).names
    else:
        first_object = next((r for r in rows if isinstance(r, dict)), None)
        if first_object is None:
            raise DataError(f"data file {f}: none of the first {len(rows)} records is an object (a JSON record with the "
                            f"fields {', '.join(SAT_COLUMNS)})")
        columns = list(first_object)
    for col in SAT_COLUMNS:
        if col not in columns:
            raise DataError(f"data file {f}: no column {col!r} (it has: {', '.join(map(str, columns)) or 'none'}); "
                            f"SAT's schema needs {', '.join(SAT_COLUMNS)}")
    first = None
    for i, rec in enumerate(rows):
        try:
            record_to_example(rec, i, rng=random.Random(0), shuffle_options=False, max_pixels=data_cfg.max_pixels,
                              image_dir=data_cfg.image_dir, max_images=data_cfg.max_images_per_question)
            return
        except DataError as exc:
            first = first or exc
    raise DataError(f"data file {f}: none of the first {len(rows)} records is usable; {first}")


def read_sat_records(path: str, data_file: str, max_samples: int) -> list[dict]:
    """Raw records from a local file/folder or, for an ``owner/name`` hub id, through ``datasets``."""
    p = Path(os.path.expanduser(path))
    if p.exists():
        rows: list[dict] = []
        for f in _local_files(p, data_file):
            rows.extend(read_table(f))
        return rows[: max_samples * 2] if p.is_file() else rows
    from datasets import load_dataset  # only the hub path needs it

    # streaming: read only as many rows as needed from a large parquet (SAT is ~175k rows)
    rows = []
    try:
        ds = load_dataset(path, data_files=data_file, split="train", streaming=True)
        for row in ds:
            rows.append(row)
            if len(rows) >= max_samples * 2:  # headroom for multi-image rows skipped below
                break
    except Exception as exc:  # noqa: BLE001 -- hub, network and format errors come in many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"data.path {path!r}: could not read the hub dataset ({type(exc).__name__}: {first[:160]}); "
                        "check the id and the network, or point data.path at a local parquet/JSON file") from None
    return rows


@dataclass
class LoadReport:
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def as_metrics(self) -> dict[str, int]:
        return {"data_kept": self.kept, "data_skipped": sum(self.skipped.values())}


def examples_from_records(
    records: Iterable[dict],
    *,
    max_samples: int,
    shuffle_options: bool,
    max_pixels: int,
    seed: int,
    on_error: str = "skip",
    image_dir: str = "",
    max_images: int = 1,
) -> tuple[list[Example], LoadReport]:
    """Valid examples (at most ``max_samples``), skipping bad records with a warning, or raising."""
    rng = random.Random(seed)
    report = LoadReport()
    out: list[Example] = []
    for i, rec in enumerate(records):
        if len(out) >= max_samples:
            break
        try:
            out.append(record_to_example(rec, i, rng=rng, shuffle_options=shuffle_options, max_pixels=max_pixels,
                                         image_dir=image_dir, max_images=max_images))
        except DataError as exc:
            if on_error == "raise":
                raise
            reason = str(exc).split(": ", 1)[-1].split(" (")[0]
            report.skipped[reason[:60]] += 1
            log.warning("skipping %s", exc)
    report.kept = len(out)
    if not out:
        raise DataError("no usable records in the dataset (every record was skipped; see the warnings above)")
    return out, report


# ------------------------------------------------------------------------------------------- generator

COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
GENERATED_TASKS = ("left_right", "above_below", "closer", "count", "color")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color: tuple) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def generate_sat_records(n: int, *, size: int = 112, tasks: list[str] | None = None, seed: int = 0) -> list[dict]:
    """``n`` SAT-schema records with rendered images and known answers.

    Tasks: ``left_right``, ``above_below``, ``closer`` (the larger object is closer), ``count``, and
    ``color`` (one large shape, red or blue: the simplest image-dependent question, used by the learning test).
    """
    tasks = tasks or ["left_right", "above_below", "closer", "count"]
    unknown = set(tasks) - set(GENERATED_TASKS)
    if unknown:
        raise DataError(f"unknown generated task(s) {sorted(unknown)}; known: {', '.join(GENERATED_TASKS)}")
    rng = random.Random(seed)
    records = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        img = Image.new("RGB", (size, size), (245, 245, 245))
        draw = ImageDraw.Draw(img)
        (c1, c2) = rng.sample(list(COLORS), 2)
        (s1, s2) = rng.sample(SHAPES, 2)
        a, b = f"{c1} {s1}", f"{c2} {s2}"
        r = size * 0.12
        if task == "left_right":
            left = rng.random() < 0.5
            xa, xb = (size * 0.25, size * 0.75) if left else (size * 0.75, size * 0.25)
            draw_shape(draw, s1, xa, size * rng.uniform(0.3, 0.7), r, COLORS[c1])
            draw_shape(draw, s2, xb, size * rng.uniform(0.3, 0.7), r, COLORS[c2])
            question, answers, correct = f"Is the {a} to the left or to the right of the {b}?", ["left", "right"], "left" if left else "right"
        elif task == "above_below":
            above = rng.random() < 0.5
            ya, yb = (size * 0.25, size * 0.75) if above else (size * 0.75, size * 0.25)
            draw_shape(draw, s1, size * rng.uniform(0.3, 0.7), ya, r, COLORS[c1])
            draw_shape(draw, s2, size * rng.uniform(0.3, 0.7), yb, r, COLORS[c2])
            question, answers, correct = f"Is the {a} above or below the {b}?", ["above", "below"], "above" if above else "below"
        elif task == "color":
            color = rng.choice(["red", "blue"])
            draw_shape(draw, s1, size * 0.5, size * 0.5, size * 0.45, COLORS[color])
            question, answers, correct = "What color is the shape?", ["red", "blue"], color
        elif task == "closer":
            a_closer = rng.random() < 0.5
            ra, rb = (r * 1.6, r * 0.7) if a_closer else (r * 0.7, r * 1.6)
            draw_shape(draw, s1, size * 0.28, size * 0.5, ra, COLORS[c1])
            draw_shape(draw, s2, size * 0.72, size * 0.5, rb, COLORS[c2])
            question, answers, correct = f"Which object is closer to the camera, the {a} or the {b}?", [a, b], a if a_closer else b
        else:
            k = rng.randint(1, 4)
            cells = rng.sample([(x, y) for x in range(3) for y in range(3)], k)
            for x, y in cells:
                draw_shape(draw, s1, size * (x + 0.5) / 3, size * (y + 0.5) / 3, size * 0.1, COLORS[c1])
            question = f"How many {c1} {s1}s are in the image?"
            answers, correct = ["1", "2", "3", "4"], str(k)
        records.append(
            {"image_bytes": [png_bytes(img)], "question": question, "answers": answers, "correct_answer": correct, "question_type": task}
        )
    return records


def write_parquet(records: list[dict], path: str | os.PathLike) -> Path:
    """Records (in SAT or CV-Bench schema) as one parquet file; parent folders are created."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), p)
    return p


def load_examples(data_cfg) -> tuple[list[Example], LoadReport]:
    """Examples for a recipe's ``data`` section (see config.DataConfig)."""
    if data_cfg.source == "generated":
        records = generate_sat_records(
            data_cfg.generated_samples, size=data_cfg.generated_image_size, tasks=data_cfg.generated_tasks, seed=data_cfg.seed
        )
    else:
        records = read_sat_records(data_cfg.path, data_cfg.data_file, data_cfg.max_samples)
    return examples_from_records(
        records,
        max_samples=data_cfg.max_samples,
        shuffle_options=data_cfg.shuffle_options,
        max_pixels=data_cfg.max_pixels,
        seed=data_cfg.seed,
        on_error=data_cfg.on_error,
        image_dir=data_cfg.image_dir,
        max_images=data_cfg.max_images_per_question,
    )
