"""CV-Bench evaluation: ``lowmem-vt eval`` / ``python -m lowmem_vt.eval``.

Each question is asked in the training prompt (R1-Zero template, image first) with CV-Bench's ``prompt`` as
the question, answered by greedy decoding through the rollout backend, and scored on the ``<answer>`` tag
(the whole response when there is none) against the option letter (A, a, (A), (a)) or the option text.

Two overall figures are reported, because papers use both:
- ``mean``: the plain mean over all items (VisualThinker-R1-Zero's 59.47 % is this one);
- ``cvbench``: CV-Bench's own, 2D accuracy averaged over its sources (ADE20K, COCO), 3D over its (Omni3D),
  then the mean of 2D and 3D.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import string
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .cvbench import CVBENCH_DATA_FILE, CVBENCH_HUB_ID, CVBenchItem, load_cvbench
from .data import DataError
from .rewards import extract_answer, format_reward

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 1024
# The prompt is never truncated in evaluation: room for the largest image (max_pixels / 28² tokens) and text.
MAX_PROMPT_LENGTH = 16384

# ------------------------------------------------------------------------------------------- scoring

_PUNCT = str.maketrans("", "", string.punctuation)
_LETTER = re.compile(r"\(?\s*([A-Za-z])\s*\)?\.?")
_LETTER_THEN_TEXT = re.compile(r"\(?\s*([A-Za-z])\s*[).:]\s*(.+)", re.DOTALL)


def _normalize(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCT).split())


def choice_index(prediction: str, choices: Sequence[str]) -> int | None:
    """The option a prediction names, or None.

    Accepted: the letter (``A``, ``a``, ``(A)``, ``(a)``, ``A.``), the option text (case, punctuation and
    spacing ignored), or both (``(A) left``, where the text must be that letter's option).
    """
    text = prediction.strip()
    m = _LETTER.fullmatch(text)
    if m:
        i = ord(m.group(1).upper()) - ord("A")
        if i < len(choices):
            return i
    norm = _normalize(text)
    if norm:
        for i, c in enumerate(choices):
            if _normalize(c) == norm:
                return i
    m = _LETTER_THEN_TEXT.fullmatch(text)
    if m:
        i = ord(m.group(1).upper()) - ord("A")
        if i < len(choices) and _normalize(choices[i]) == _normalize(m.group(2)):
            return i
    return None


@dataclass
class Scored:
    """One answered question."""

    idx: int | str
    type: str
    task: str
    source: str
    answer: str  # "(B)"
    prediction: str | None  # the letter the response names, "(A)", or None
    correct: bool
    format_ok: bool  # <think>…</think> <answer>…</answer>
    response_tokens: int
    response: str


def score(item: CVBenchItem, response: str, response_tokens: int = 0) -> Scored:
    """Score one response (the text after the prompt's ``<think>``)."""
    i = choice_index(extract_answer(response, lenient=True), item.choices)
    pred = None if i is None else f"({chr(ord('A') + i)})"
    return Scored(item.idx, item.type, item.task, item.source, item.answer, pred, pred == item.answer,
                  format_reward(response) == 1.0, response_tokens, response)


def _acc(rows: list[Scored]) -> float:
    return sum(r.correct for r in rows) / len(rows)


def summarize(rows: list[Scored]) -> dict:
    """Accuracy per task, per source and per type, the two overall figures, format rate, response length.

    The CV-Bench overall averages the types present (both, for the full set), each type being the mean of
    its sources' accuracies. Groups keep the order of first appearance (CV-Bench's: Count, Relation, Depth, Distance).
    """
    if not rows:
        raise ValueError("no scored items to summarize")
    groups: dict[str, dict[str, list[Scored]]] = {"task": defaultdict(list), "source": defaultdict(list), "type": defaultdict(list)}
    for r in rows:
        groups["task"][r.task].append(r)
        groups["source"][r.source].append(r)
        groups["type"][r.type].append(r)
    per_type = {}
    for kind, members in groups["type"].items():
        sources = sorted({r.source for r in members})
        per_type[kind] = {
            "n": len(members),
            "accuracy": _acc(members),
            "source_mean": sum(_acc(groups["source"][s]) for s in sources) / len(sources),
            "sources": sources,
        }
    return {
        "n": len(rows),
        "overall": {
            "mean": _acc(rows),
            "cvbench": sum(t["source_mean"] for t in per_type.values()) / len(per_type),
        },
        "per_type": per_type,
        "per_task": {k: {"n": len(v), "accuracy": _acc(v)} for k, v in groups["task"].items()},
        "per_source": {k: {"n": len(v), "accuracy": _acc(v)} for k, v in groups["source"].items()},
        "format_rate": sum(r.format_ok for r in rows) / len(rows),
        "no_answer_rate": sum(r.prediction is None for r in rows) / len(rows),
        "mean_response_tokens": sum(r.response_tokens for r in rows) / len(rows),
    }


def to_markdown(summary: dict, title: str = "CV-Bench") -> str:
    """The summary as a markdown table (percentages)."""
    pct = lambda x: f"{100 * x:.2f}"  # noqa: E731
    lines = [f"### {title}", "", "| split | n | accuracy (%) |", "|---|---:|---:|",
             f"| **overall, mean of items** | {summary['n']} | **{pct(summary['overall']['mean'])}** |",
             f"| overall, CV-Bench (mean of 2D and 3D) | {summary['n']} | {pct(summary['overall']['cvbench'])} |"]
    for kind, t in summary["per_type"].items():
        lines.append(f"| {kind} (mean of items) | {t['n']} | {pct(t['accuracy'])} |")
        lines.append(f"| {kind} (mean of sources: {', '.join(t['sources'])}) | {t['n']} | {pct(t['source_mean'])} |")
    for task, t in summary["per_task"].items():
        lines.append(f"| {task} | {t['n']} | {pct(t['accuracy'])} |")
    lines += ["", f"Format-valid responses: {pct(summary['format_rate'])} %; no option named: {pct(summary['no_answer_rate'])} %; "
              f"mean response length: {summary['mean_response_tokens']:.1f} tokens."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- models


def load_eval_model(*, checkpoint: str | None, model: str | None, device: torch.device, dtype: str | None,
                    min_pixels: int | None, max_pixels: int | None, max_new_tokens: int | None = None,
                    allow_other_base: bool = False):
    """The model to evaluate and the pixel budget to use: a checkpoint's base + adapter (``model`` overrides
    its base path), or a plain base / merged model. Returns (model, min_pixels, max_pixels). Everything is checked
    before the weights load (the checkpoint verified, the base's config, the base's identity against the one the
    checkpoint was trained on unless ``allow_other_base``, the adapter against it, the response budget against the
    model's positions)."""
    from .preflight import PreflightError, check_adapter_fits, check_checkpoint_base, check_model_source

    def check_budget(config) -> None:
        limit = getattr(config.text_config, "max_position_embeddings", None)
        if max_new_tokens is not None and limit and max_new_tokens > limit:
            raise PreflightError(f"--max-new-tokens {max_new_tokens} exceeds the model's {limit} positions; lower it")

    if checkpoint is None:
        if model is None:
            raise ValueError("name a --checkpoint (base + adapter) or a --model (base or merged model)")
        dtype = dtype or ("auto" if device.type == "cuda" else "float32")
        min_px, max_px = min_pixels or 3136, max_pixels or 401408
        from .model import load_plain_model
        from .tiny import resolve_model_path

        check_budget(check_model_source(model, "--model"))
        path = resolve_model_path(model)
        return load_plain_model(path, device, dtype=dtype, min_pixels=min_px, max_pixels=max_px), min_px, max_px
    from .merge import checkpoint_configs
    from .model import load_model
    from .tiny import resolve_model_path

    model_cfg, lora_cfg, data = checkpoint_configs(checkpoint)
    if model is not None:
        model_cfg.name_or_path = model
    if dtype is not None:
        model_cfg.dtype = dtype
    if model_cfg.quantization == "nf4" and device.type != "cuda":
        log.warning("the checkpoint was trained with QLoRA (nf4); 4-bit needs a GPU, so the base is loaded in %s", model_cfg.dtype)
        model_cfg.quantization = "none"
    min_px, max_px = min_pixels or data.get("min_pixels", 3136), max_pixels or data.get("max_pixels", 401408)
    where = "--model" if model is not None else f"{checkpoint}/recipe.yaml: key 'model.name_or_path'"
    config = check_model_source(model_cfg.name_or_path, where)
    other_base = check_checkpoint_base(checkpoint, model_cfg.name_or_path, where, allow_other=allow_other_base)
    if other_base:
        log.warning(other_base)
    check_adapter_fits(Path(checkpoint) / "adapter", config, where)
    check_budget(config)
    model_cfg.name_or_path = resolve_model_path(model_cfg.name_or_path)
    lm = load_model(model_cfg, lora_cfg, device, min_pixels=min_px, max_pixels=max_px,
                    adapter_path=str(Path(checkpoint) / "adapter"), trainable=False)
    lm.peft_model.eval()
    return lm, min_px, max_px


class ModelResponder:
    """Greedy answers of a loaded model (LoadedModel or PlainModel) to batches of CV-Bench items."""

    def __init__(self, lm, *, backend: str = "hf", max_new_tokens: int = MAX_NEW_TOKENS, min_pixels: int, max_pixels: int):
        from .inputs import InputBuilder
        from .rollout import SamplingParams, make_rollout

        self.lm = lm
        self.inputs = InputBuilder(lm.tokenizer, lm.image_processor, lm.config, max_prompt_length=MAX_PROMPT_LENGTH,
                                   min_pixels=min_pixels, max_pixels=max_pixels)
        if backend == "hf":
            from .rollout.hf import hf_takes_features

            if not hf_takes_features(lm.family, lm.config):  # DeepStack before transformers 5.18
                log.info("%s on this transformers: answers through the engine (HF generate cannot take its DeepStack "
                         "features before 5.18)", lm.family.label)
                backend = "engine"
        self.rollout = make_rollout(backend, lm)
        self.params = SamplingParams(num_generations=1, max_new_tokens=max_new_tokens, greedy=True)

    def __call__(self, items: list[CVBenchItem]) -> list[tuple[str, int] | None]:
        """(response text, response tokens incl. EOS) per item; None for an item whose image or prompt cannot be
        used (skipped with a warning: ``evaluate`` counts it)."""
        from .model import image_embeddings

        prompts, kept = [], []
        for i, it in enumerate(items):
            try:
                prompts.append(self.inputs.encode(it.load_image(), it.prompt))
                kept.append(i)
            except DataError as exc:
                log.warning("skipping %s", exc)
        out: list[tuple[str, int] | None] = [None] * len(items)
        if not prompts:
            return out
        embeds = image_embeddings(self.lm, [p.pixel_values for p in prompts], [p.image_grid_thw for p in prompts])
        roll = self.rollout.generate(prompts, embeds, self.params)
        texts = self.lm.tokenizer.batch_decode(roll.completion_ids, skip_special_tokens=True)
        for i, answer in zip(kept, zip(texts, roll.completion_mask.sum(1).long().tolist())):
            out[i] = answer
        return out


def evaluate(items: list[CVBenchItem], respond: Callable[[list[CVBenchItem]], list[tuple[str, int]]], *,
             batch_size: int = 8, progress: bool = True) -> tuple[list[Scored], dict]:
    """Answer and score every item in batches; returns the scored items and their summary."""
    from tqdm.auto import tqdm

    rows: list[Scored] = []
    skipped = 0
    with tqdm(total=len(items), desc="CV-Bench", unit="q", dynamic_ncols=True, disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            for it, answer in zip(batch, respond(batch)):
                if answer is None:  # an unusable image or prompt: not asked, counted
                    skipped += 1
                    continue
                rows.append(score(it, *answer))
            bar.update(len(batch))
            if rows:
                bar.set_postfix(acc=f"{_acc(rows):.3f}")
    if not rows:
        raise DataError(f"none of the {len(items)} items could be asked (every image or prompt was unusable; see the warnings)")
    summary = summarize(rows)
    summary["skipped"] = skipped
    return rows, summary


def write_results(out_dir: str | Path, rows: list[Scored], summary: dict, settings: dict) -> dict[str, Path]:
    """results.json (summary + settings), results.md (the table), predictions.jsonl (one line per item)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "predictions": out / "predictions.jsonl"}
    paths["json"].write_text(json.dumps({**summary, "settings": settings}, indent=2) + "\n")
    paths["markdown"].write_text(to_markdown(summary, title=f"CV-Bench: {settings['model_label']}"))
    with open(paths["predictions"], "w") as f:
        for r in rows:
            f.write(json.dumps(asdict(r)) + "\n")
    return paths


# ------------------------------------------------------------------------------------------- command line


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="a training checkpoint (out/<run>/checkpoint-N): its base + adapter")
    p.add_argument("--model", default=None, help="a base or merged model (hub id or folder); with --checkpoint, overrides its base")
    p.add_argument("--data", default=CVBENCH_HUB_ID, help=f"hub id or local parquet/JSON file or folder (default {CVBENCH_HUB_ID})")
    p.add_argument("--data-file", default=CVBENCH_DATA_FILE, help="annotation file in the hub repo or folder")
    p.add_argument("--image-dir", default=None, help="folder of the images JSON records name (default: the JSON's folder)")
    p.add_argument("--limit", type=int, default=None, help="evaluate N items spread evenly over the set (every task represented)")
    p.add_argument("--batch-size", type=int, default=8, help="questions decoded together")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help=f"response budget (default {MAX_NEW_TOKENS})")
    p.add_argument("--backend", default="hf", choices=["hf", "engine", "vllm"], help="rollout backend")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: the checkpoint's recipe; bfloat16 on a GPU, float32 on CPU for a plain model")
    p.add_argument("--min-pixels", type=int, default=None, help="default: the checkpoint's recipe, else 3136")
    p.add_argument("--max-pixels", type=int, default=None, help="default: the checkpoint's recipe, else 401408")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint>/cvbench, or out/eval/<model name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--allow-other-base", action="store_true",
                   help="with --checkpoint: evaluate its adapter on a base other than the one it was trained on (its "
                        "base.json); refused without this, and recorded in results.json with it")


def default_out_dir(checkpoint: str | None, model: str | None) -> Path:
    if checkpoint is not None:
        return Path(checkpoint) / "cvbench"
    return Path("out/eval") / Path(str(model).split(":")[-1].rstrip("/")).name


RESULT_FILES = ("results.json", "results.md", "predictions.jsonl")


def _other_base_warning(args) -> str | None:
    """A checkpoint's base checked before anything else loads (the data, the model): PreflightError when it is not the
    one the checkpoint was trained on, unless --allow-other-base; then the warning results.json records."""
    from .checkpoint import BASE_FILE
    from .preflight import check_checkpoint_base, checkpoint_recipe

    if args.checkpoint is None or not (Path(args.checkpoint) / BASE_FILE).is_file():
        return None
    base, where = args.model, "--model"
    if base is None:
        model = checkpoint_recipe(args.checkpoint).get("model")
        base = model.get("name_or_path") if isinstance(model, dict) else None
        where = f"{args.checkpoint}/recipe.yaml: key 'model.name_or_path'"
    if not isinstance(base, str):
        return None  # not a recipe this version reads: load_eval_model says so
    return check_checkpoint_base(args.checkpoint, base, where, allow_other=args.allow_other_base)


def cmd_eval(args) -> int:
    import importlib.util

    from .checkpoint import model_folder
    from .preflight import PreflightError, check_device, check_output_folder

    if args.checkpoint is None and args.model is None:
        print("error: name a --checkpoint (base + adapter) or a --model (base or merged model)", file=sys.stderr)
        return 2
    if (args.limit is not None and args.limit < 1) or args.batch_size < 1 or args.max_new_tokens < 1:
        print("error: --limit, --batch-size and --max-new-tokens must be >= 1", file=sys.stderr)
        return 2
    for name in ("min_pixels", "max_pixels"):
        value = getattr(args, name)
        if value is not None and not 1 <= value <= 1 << 28:
            print(f"error: --{name.replace('_', '-')} must be in [1, {1 << 28}], got {value}", file=sys.stderr)
            return 2
    # validate first: the output folder (checked before the evaluation, not after it), the device, the backend
    out = Path(args.out) if args.out else default_out_dir(args.checkpoint, args.model)
    inputs = {}
    if args.checkpoint is not None:
        inputs["the checkpoint"] = Path(args.checkpoint)
    if args.model is not None and model_folder(args.model) is not None:
        inputs["the model"] = model_folder(args.model)
    if Path(args.data).exists():
        inputs["the data"] = Path(args.data)
    check_output_folder(out, "--out", inputs, own=RESULT_FILES, inside_ok=("the checkpoint",))
    base_warning = _other_base_warning(args)
    device = check_device(args.device, "--device")
    if args.backend == "vllm":
        if device.type != "cuda":
            raise PreflightError(f"--backend vllm needs a CUDA GPU; use --backend engine or hf on {device}")
        if importlib.util.find_spec("vllm") is None:
            raise PreflightError("--backend vllm needs the vllm package, which is not installed; pip install vllm, or use --backend engine")
    try:
        items = load_cvbench(args.data, args.data_file, limit=args.limit, image_dir=args.image_dir)
        lm, min_px, max_px = load_eval_model(checkpoint=args.checkpoint, model=args.model, device=device, dtype=args.dtype,
                                             min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                                             max_new_tokens=args.max_new_tokens, allow_other_base=args.allow_other_base)
        respond = ModelResponder(lm, backend=args.backend, max_new_tokens=args.max_new_tokens, min_pixels=min_px, max_pixels=max_px)
        t0 = time.perf_counter()
        rows, summary = evaluate(items, respond, batch_size=args.batch_size, progress=not args.no_progress)
    except (DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    label = args.checkpoint if args.checkpoint else args.model
    settings = {
        "model_label": str(label), "checkpoint": args.checkpoint, "model": args.model, "data": args.data, "data_file": args.data_file,
        "limit": args.limit, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "backend": args.backend,
        "device": str(device), "min_pixels": min_px, "max_pixels": max_px, "decoding": "greedy",
        "seconds": round(time.perf_counter() - t0, 1), "skipped_items": summary.get("skipped", 0),
    }
    if base_warning:
        settings["warning"] = base_warning
    try:
        paths = write_results(out, rows, summary, settings)
    except OSError as exc:
        from .checkpoint import _write_problem

        print(f"error: the results could not be written: {_write_problem(exc, out)}", file=sys.stderr)
        return 2
    print(paths["markdown"].read_text())
    for p in paths.values():
        print(p)
    if summary.get("skipped"):
        print(f"{summary['skipped']} item(s) skipped (unusable image or prompt; see the warnings)", file=sys.stderr)
    return 0


def register_cli(sub) -> None:
    """``lowmem-vt eval``: called by cli.build_parser."""
    p = sub.add_parser("eval", help="CV-Bench accuracy of a checkpoint (base + adapter), a base or a merged model")
    add_eval_args(p)
    p.set_defaults(func=cmd_eval)


def main(argv: list[str] | None = None) -> int:
    """``python -m lowmem_vt.eval ARGS`` is ``lowmem-vt eval ARGS``."""
    from .cli import main as cli_main

    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
