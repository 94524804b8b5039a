"""Offline models: a tiny random model of any family (``families``) with a locally built tokenizer and
image-processor config, saved with ``save_pretrained`` so tests and the demo load it through the same code
path as the real model; the tiny *base* model of the demo (a brief pre-training); and the names that build
them on first use (``resolve_model_path``):

- ``tiny:<dir>`` / ``tiny-base:<dir>``: the tiny Qwen2-VL, random / pre-trained;
- ``tiny-<model_type>:<dir>`` / ``tiny-base-<model_type>:<dir>``: the same for another family, e.g.
  ``tiny-qwen3_vl:artifacts/tiny-qwen3vl``.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

from .data import R1_ZERO_TEMPLATE, decode_image, generate_sat_records, sat_question
from .families import DEFAULT_FAMILY, QwenVLFamily, family_named
from .families.qwen2_vl import qwen2_vl_2b_config  # noqa: F401 -- the GPU tests build the 2B architecture from here

# In the real tokenizer these tags are several tokens each; the tiny tokenizer makes them one token so a
# tiny model can learn the format in a CPU test's budget. They are ordinary (non-special) tokens: decoding
# keeps them, exactly as the real tokenizer's text does.
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]


def _corpus() -> list[str]:
    lines = [R1_ZERO_TEMPLATE.format(question="")]
    for rec in generate_sat_records(400, size=28, seed=1234):
        lines.append(sat_question(rec["question"], rec["answers"]))
        lines.extend(rec["answers"])
    lines += ["wait, let me verify. however, I re-check the image.", "The answer is", "left right above below closer"]
    return lines


def build_tiny_tokenizer(family: QwenVLFamily | None = None):
    """A word-level tokenizer over the generated SAT-style corpus, with the family's special tokens.

    About 100 tokens: a random tiny policy then samples a given answer word with probability ~1 %, so
    rule-based rewards give GRPO a signal within a CPU test's budget (a 151k vocabulary never would).
    Words outside the corpus map to ``<unk>``: this tokenizer is for the offline tiny model only.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    family = family or family_named(DEFAULT_FAMILY)
    special = list(family.tiny_special_tokens)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=special + ["<unk>"], show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=family.tiny_eos_token, pad_token=family.tiny_pad_token, unk_token="<unk>",
        extra_special_tokens={}
    )
    fast.add_special_tokens({"additional_special_tokens": [t for t in special if t != family.tiny_pad_token]})
    fast.add_tokens(TAG_TOKENS)
    return fast


def build_tiny_base_model(out_dir: str | Path, seed: int = 0, steps: int = 200, format_share: float = 0.1,
                          tasks: tuple[str, ...] = ("color",), family: QwenVLFamily | None = None) -> Path:
    """The tiny model after a brief causal-LM pre-training that makes it an R1-Zero-like *base* model.

    The random tiny model never writes ``</think> <answer>…</answer>``, so GRPO's rule-based rewards are
    all 0 and nothing is learned (the demo showed reward 0.000 on every step). A real base model has read
    such text now and then; this one reads the prompt template followed by free-form "thinking" that ends
    in the tagged format with probability ``format_share`` and otherwise in untagged text. Its answers are
    drawn uniformly from the question's options, never from the image: it learns *where* an answer goes
    and which words answer a question, not how to read the picture. GRPO must then turn the format into a
    habit and learn to answer from the image, as in the paper. ``pretraining.json`` records the corpus and
    the final loss. Idempotent: a complete directory is reused.
    """
    import torch

    out = Path(out_dir)
    if (out / "pretraining.json").is_file() and (out / "config.json").is_file():
        return out
    family = family or family_named(DEFAULT_FAMILY)
    raw = build_tiny_model(out.with_name(out.name + "-random"), seed=seed, family=family)
    from .inputs import InputBuilder, build_sequences, completion_hidden

    tok = build_tiny_tokenizer(family)
    model = family.model_class().from_pretrained(raw, dtype=torch.float32)
    # one 2x2 block of merged patches per image: 4 image tokens
    side = family.patch_size(model.config) * family.merge_size(model.config) * 2
    processor = family.image_processor(str(raw), side * side, side * side)
    ib = InputBuilder(tok, processor, model.config, max_prompt_length=512, min_pixels=side * side, max_pixels=side * side)
    gen = random.Random(seed + 1)
    # other images than the demo's data (seed), the same kinds of questions (tasks)
    records = generate_sat_records(256, size=side, tasks=list(tasks), seed=seed + 99)
    prompts = [ib.encode(decode_image(r["image_bytes"][0]), sat_question(r["question"], r["answers"])) for r in records]
    inner = family.inner_model(model)
    family.vision_tower(model).requires_grad_(False)  # the vision tower stays the random one GRPO will see
    with torch.no_grad():  # frozen: each image's features once, not at every step that draws it
        feats = family.image_features(inner, torch.cat([p.pixel_values for p in prompts]),
                                      torch.cat([p.image_grid_thw for p in prompts]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    model.train()
    losses, formatted = [], 0
    torch.manual_seed(seed)
    for step in range(steps):
        rows = [gen.randrange(len(records)) for _ in range(32)]
        texts = [base_completion(records[r]["answers"], gen, format_share) for r in rows]
        formatted += sum("<answer>" in t for t in texts)
        ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
        T = max(len(i) for i in ids)
        comp = torch.tensor([i + [tok.pad_token_id] * (T - len(i)) for i in ids])
        mask = torch.tensor([[1.0] * len(i) + [0.0] * (T - len(i)) for i in ids])
        seqs = build_sequences(prompts, rows, comp, mask, tok.pad_token_id)
        hidden = completion_hidden(inner, seqs, feats)
        nll = torch.nn.functional.cross_entropy(family.lm_head(model)(hidden).flatten(0, 1), comp.flatten(), reduction="none")
        loss = (nll * mask.flatten()).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "preprocessor_config.json").write_text((raw / "preprocessor_config.json").read_text())
    (tmp / "pretraining.json").write_text(json.dumps({
        "steps": steps, "batch": 32, "tasks": list(tasks), "format_share": format_share, "seed": seed,
        "formatted_share_seen": formatted / (32 * steps),
        "loss_first_10": sum(losses[:10]) / 10, "loss_last_10": sum(losses[-10:]) / 10,
    }, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# Free-form "thinking" of the tiny base model, from words its tokenizer knows.
THOUGHTS = [
    "let me solve this step by step", "the user asks a question about the image", "wait, let me verify",
    "however, I re-check the image", "the object is in the image", "I re-check the image", "let me verify the image",
    "the answer is in the image",
]


def base_completion(options: list[str], rng: random.Random, format_share: float) -> str:
    """One pre-training completion (the text after the prompt's ``<think>``): thoughts, then an answer drawn
    at random from ``options``, tagged ``</think> <answer>…</answer>`` with probability ``format_share``."""
    thought = rng.choice(THOUGHTS)
    answer = rng.choice(options)
    if rng.random() < format_share:
        return f"{thought} </think> <answer> {answer} </answer>"
    return rng.choice([
        f"{thought} . The answer is {answer} .",
        f"{thought} </think> The answer is {answer} .",
        f"{thought} , {answer} .",
        f"{thought} . {answer} or {rng.choice(options)} ?",
    ])


def build_tiny_model(out_dir: str | Path, seed: int = 0, hidden_size: int = 64, layers: int = 2, head_std: float = 0.2,
                     family: QwenVLFamily | None = None) -> Path:
    """Write a tiny random model of ``family`` (Qwen2-VL by default) + tokenizer + image-processor config to
    ``out_dir``; returns the path.

    The head is frozen under LoRA and the final RMSNorm gives hidden states of norm ~sqrt(hidden_size).
    With the default init (std 0.02) the largest logit gap a policy could ever reach is ~2.5 nats, so no
    token could pass a few % probability; ``head_std`` 0.2 allows a gap of ~13 nats (a confident policy, as a
    trained head allows; 0.1 capped p(answer) near 0.86) while the random start stays spread over the
    vocabulary (logit std ~1.6). The head is untied here:
    tied to random embeddings, a 2-layer model's residual stream makes it repeat its last input token with
    probability ~1. Idempotent: a complete directory is reused.
    """
    import torch
    from transformers import GenerationConfig

    family = family or family_named(DEFAULT_FAMILY)
    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file() and (out / "preprocessor_config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(family)
    cfg = family.tiny_config(tok, hidden_size=hidden_size, layers=layers)
    torch.manual_seed(seed)
    model = family.model_class()(cfg).float()
    with torch.no_grad():
        family.lm_head(model).weight.normal_(0.0, head_std)
    family.tiny_init(model)
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.text_config.bos_token_id, eos_token_id=cfg.text_config.eos_token_id, pad_token_id=cfg.text_config.pad_token_id
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    side = family.patch_size(cfg) * family.merge_size(cfg) * 4  # up to 4x4 image tokens
    (out / "preprocessor_config.json").write_text(json.dumps(family.image_processor_config(min_pixels=3136, max_pixels=side * side), indent=2))
    return out


_TINY_NAME = re.compile(r"tiny(-base)?(?:-(\w+))?:(.+)")


def parse_tiny_name(name_or_path: str) -> tuple[QwenVLFamily, bool, str] | None:
    """(family, pre-trained?, folder) of a ``tiny[-base][-<model_type>]:<dir>`` name; None for other names."""
    m = _TINY_NAME.fullmatch(name_or_path)
    if not m:
        return None
    return family_named(m[2] or DEFAULT_FAMILY), bool(m[1]), m[3]


def resolve_model_path(name_or_path: str) -> str:
    """A hub id or local path as given; a tiny model's name (module docstring) builds it in its folder first."""
    tiny = parse_tiny_name(name_or_path)
    if tiny is None:
        return name_or_path
    family, base, folder = tiny
    build = build_tiny_base_model if base else build_tiny_model
    return str(build(folder, family=family))
