"""Our input builder against transformers' processor, for every model family (issue #26).

    python bench/processor.py --out DIR [--smoke]

``lowmem_vt/inputs.py`` builds the prompt itself (image tokens expanded, M-RoPE positions per prompt) with the
PIL image processor, which needs no torchvision. transformers' processor (``AutoProcessor``) is the oracle: for a
tiny model of each family (built locally), the same prompts go through both, and these must agree:

- ``input_ids`` and the image-token mask: equal;
- ``image_grid_thw``: equal;
- M-RoPE positions: ours equal the model's own ``get_rope_index`` on the processor's ids, and our first
  completion position equals its ``L + delta``;
- ``pixel_values``: relative norm of the difference ``|ours - theirs| / |theirs|`` at most 1e-5 when both
  sides use the same image-processor class or the image needs no resize (only the rescale/normalise arithmetic
  differs: fp32 rounding); at most 0.1 for a resized image through another class (PIL's and torchvision's
  bicubic filters differ in the last grey levels; a wrong layout, normalisation or channel order is O(1)).

Cases per family: one image already a multiple of the patch grid, one that is resized, and a two-image
prompt. The report names the image-processor class each side picked: where torchvision is installed (the GPU
machine) ``AutoProcessor`` picks the fast, torchvision-based one. Where it is not, ``AutoProcessor`` cannot be
built (its video processor needs torchvision): on the GPU machine that fails the stage; with ``--smoke`` (CPU
rehearsal) the family's processor class is built around the PIL image processor instead, so transformers' own
text expansion is still compared, and the report says that the torchvision path was not compared here.

``LOWMEM_BENCH_FAULT=1`` (the GPU check's ``--fault``): our pixel values ×1.01, which must fail the stage.
Writes DIR/processor.json and .md; exit 1 on any disagreement.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import report

SAME_PIXELS = 1e-5  # relative norm: fp32 rounding of rescale + normalise only
RESIZED_OTHER_CLASS = 0.1  # relative norm: two bicubic implementations


def _image(width: int, height: int, seed: int):
    """A smooth picture (gradients and a square), as the generated data draws; random noise would exaggerate the
    interpolation differences of a resize."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x / width * 255, y / height * 255, np.full_like(x, rng.integers(0, 256), dtype=float)], -1)
    x0, y0 = width // 4, height // 4
    rgb[y0:y0 + height // 3, x0:x0 + width // 3] = rng.integers(0, 256, 3)
    return Image.fromarray(rgb.astype("uint8"))


def transformers_processor(model_dir: Path, our_image_processor, smoke: bool) -> tuple[object, str | None]:
    """(processor, note): ``AutoProcessor``'s; under ``--smoke``, where it cannot be built without torchvision,
    the family's processor class around our (PIL) image processor, and the note saying so."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model_dir), None
    except ImportError as exc:
        if not smoke:
            raise
        why = str(exc).strip().split(". ")[0]
    from unittest import mock

    import transformers
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.processing_utils import ProcessorMixin

    cls = getattr(transformers, PROCESSOR_MAPPING_NAMES[AutoConfig.from_pretrained(model_dir).model_type])
    check = ProcessorMixin.check_argument_for_proper_class
    # the class's own __init__, with no video processor (the one part that needs torchvision)
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class",
                           lambda self, name, arg: None if arg is None else check(self, name, arg)):
        proc = cls(image_processor=our_image_processor, tokenizer=AutoTokenizer.from_pretrained(model_dir), video_processor=None)
    return proc, f"AutoProcessor cannot be built here ({why}): {cls.__name__} around the PIL image processor instead; " \
                 "the fast (torchvision) image processor was NOT compared"


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def compare_family(model_type: str, work: Path, smoke: bool, fault: bool) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    from lowmem_vt.families import family_named
    from lowmem_vt.inputs import InputBuilder
    from lowmem_vt.tiny import build_tiny_model

    family = family_named(model_type)
    model_dir = build_tiny_model(work / model_type, family=family)
    pre = json.loads((model_dir / "preprocessor_config.json").read_text())
    cfg = AutoConfig.from_pretrained(model_dir)
    ours_ip = family.image_processor(str(model_dir), pre["min_pixels"], pre["max_pixels"])
    builder = InputBuilder(AutoTokenizer.from_pretrained(model_dir), ours_ip, cfg, max_prompt_length=1024,
                           min_pixels=pre["min_pixels"], max_pixels=pre["max_pixels"])
    proc, note = transformers_processor(model_dir, ours_ip, smoke)
    theirs_ip = type(proc.image_processor).__name__
    same_class = type(proc.image_processor) is type(ours_ip)
    inner = AutoModelForImageTextToText.from_pretrained(model_dir).model
    step = family.patch_size(cfg) * family.merge_size(cfg)
    cases = {"on the patch grid": [_image(2 * step, 4 * step, 0)],
             "resized": [_image(2 * step + 5, 3 * step + 9, 1)],
             "two images": [_image(2 * step, 3 * step, 2), _image(3 * step + 3, 2 * step, 3)]}
    question = "What color is the square? Options: red, green, blue."
    rows = []
    for case, images in cases.items():
        ours = builder.encode(images if len(images) > 1 else images[0], question)
        pixels = ours.pixel_values * (1.01 if fault else 1.0)  # the --fault: a normalisation 1 % off
        text = family.image_placeholder * len(images) + builder._head.removeprefix(family.image_placeholder) + question + builder._tail
        got = proc(text=[text], images=images, return_tensors="pt")
        ids = got["input_ids"][0]
        mask = got.get("mm_token_type_ids")
        pos, delta = inner.get_rope_index(got["input_ids"], mm_token_type_ids=(mask if mask is not None else
                                          (got["input_ids"] == builder.image_token_id).int()),
                                          image_grid_thw=got["image_grid_thw"], attention_mask=got["attention_mask"])
        resized = any(im.size[0] % step or im.size[1] % step for im in images)
        bound = RESIZED_OTHER_CLASS if resized and not same_class else SAME_PIXELS
        pix = rel(pixels, got["pixel_values"]) if pixels.shape == got["pixel_values"].shape else float("inf")
        checks = {
            "input_ids": torch.equal(ours.input_ids, ids),
            "image tokens": mask is None or torch.equal(ours.mm_token_type_ids.long(), mask[0].long()),
            "image_grid_thw": torch.equal(ours.image_grid_thw, got["image_grid_thw"]),
            "M-RoPE positions": ours.position_ids.shape == pos[:, 0].shape and torch.equal(ours.position_ids, pos[:, 0]),
            "next position": ours.next_position == ids.numel() + int(delta.flatten()[0]),
            "pixel_values": pix <= bound,
        }
        rows.append({"family": model_type, "case": case, "tokens": int(ids.numel()), "pixel_rel": pix, "pixel_bound": bound,
                     "failed": [k for k, ok in checks.items() if not ok]})
    return {"family": model_type, "ours": type(ours_ip).__name__, "theirs": theirs_ip,
            "processor": type(proc).__name__, "note": note, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="CPU rehearsal: without torchvision, the PIL processor on both sides")
    args = p.parse_args(argv)
    import torch  # noqa: F401 -- before transformers, as everywhere

    from lowmem_vt.families import FAMILIES

    res: dict = {"families": [], "failures": []}
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in FAMILIES:
            try:
                fam = compare_family(model_type, Path(tmp), args.smoke, report.fault())
            except Exception as exc:  # noqa: BLE001 -- a processor that cannot be built or called is the finding
                fam = {"family": model_type, "error": f"{type(exc).__name__}: {str(exc).strip()[:300]}", "rows": []}
                res["failures"].append(f"{model_type}: {fam['error']}")
            res["families"].append(fam)
            res["failures"] += [f"{r['family']} / {r['case']}: {', '.join(r['failed'])} differ" for r in fam["rows"] if r["failed"]]
            report.write(args.out, "processor", res, markdown(res))
    for line in res["failures"]:
        print(f"FAIL {line}", file=sys.stderr)
    print(markdown(res))
    return 1 if res["failures"] else 0


def markdown(res: dict) -> str:
    lines = [report.table(["family", "our image processor", "transformers' processor / image processor", "note"],
                          [[f["family"], f.get("ours"), f"{f.get('processor')} / {f.get('theirs')}" if "theirs" in f else f.get("error"),
                            f.get("note") or ""] for f in res["families"]]), ""]
    rows = [[r["family"], r["case"], r["tokens"], r["pixel_rel"], r["pixel_bound"], ", ".join(r["failed"]) or "all equal"]
            for f in res["families"] for r in f["rows"]]
    lines.append(report.table(["family", "case", "tokens", "pixel rel. diff", "bound", "ids, mask, grid, positions, pixels"], rows))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
