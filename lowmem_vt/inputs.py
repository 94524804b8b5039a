"""Our own input builder: tokenizer + image processor -> ids, token types, M-RoPE positions, for any family
of ``families`` (what differs between families, the placeholder and the positions, is asked of it).

Why not ``Qwen2VLProcessor``: it cannot be constructed without torchvision (transformers 5.x), and owning
this step is how padding and truncation are kept from corrupting image tokens:
- each ``<|image_pad|>`` is expanded into grid_t·grid_h·grid_w / merge² tokens;
- prompt truncation shortens the question text only, never the image block or the template, and cuts
  the question's middle: its start and the sentence listing the answer options are kept;
- M-RoPE positions are computed per prompt, unpadded, and carried with it, so no padding side can shift
  them; completion token j of a prompt sits at position ``next_position + j`` in all three axes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .data import OPTIONS_SENTENCE, R1_ZERO_TEMPLATE, DataError
from .families import family_for

log = logging.getLogger(__name__)

ELLIPSIS = " … "  # marks where a truncated question was cut


@dataclass
class PromptInputs:
    """One encoded prompt (unpadded). L = prompt tokens, P = image patches (of all its images, in order)."""

    input_ids: torch.Tensor  # [L] long
    mm_token_type_ids: torch.Tensor  # [L] int: 1 on image tokens
    position_ids: torch.Tensor  # [3, L] long, M-RoPE (temporal, height, width)
    pixel_values: torch.Tensor  # [P, C·T·patch·patch] float32
    image_grid_thw: torch.Tensor  # [images, 3] long
    next_position: int  # position of the first completion token (all three axes)
    truncated: bool = False

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_image_tokens(self) -> int:
        return int(self.mm_token_type_ids.sum())


class InputBuilder:
    """Turns (image, question) into PromptInputs for a model of ``model_config``'s family."""

    def __init__(self, tokenizer, image_processor, model_config, *, max_prompt_length: int, min_pixels: int, max_pixels: int):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = model_config
        self.family = family_for(model_config)
        self.image_token_id = self.family.image_token_id(model_config)
        self.merge = self.family.merge_size(model_config)
        self.max_prompt_length = max_prompt_length
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        head, tail = R1_ZERO_TEMPLATE.split("{question}")
        self._head, self._tail = self.family.image_placeholder + head, tail
        self.truncated_prompts = 0  # prompts whose question was shortened to fit max_prompt_length

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_image(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel patches [P, ...] and grids [images, 3] of one image or a list of them."""
        size = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        out = self.image_processor(images=images if isinstance(images, list) else [images], size=size, return_tensors="pt")
        return out["pixel_values"].float(), out["image_grid_thw"].long()

    def encode(self, images, question: str) -> PromptInputs:
        """One prompt: ``images`` (one image, or a multi-image question's list) first, each in its placeholder,
        then the template with the question."""
        try:
            pixel_values, grid = self.encode_image(images)
        except (ValueError, TypeError, OSError) as exc:  # the processor refuses a shape (e.g. an aspect ratio over 200)
            sizes = ", ".join("x".join(map(str, getattr(im, "size", ()))) or "?"
                              for im in (images if isinstance(images, list) else [images]))
            raise DataError(f"image {sizes} cannot be encoded ({exc})") from exc
        counts = (grid.prod(-1) // self.merge**2).tolist()  # image tokens of each image
        n_image, k = sum(counts), len(counts)
        head = self.family.image_placeholder * (k - 1) + self._head
        ids = self._ids(head + question + self._tail)
        truncated = False
        if len(ids) - k + n_image > self.max_prompt_length:
            # Shorten the question text only; image tokens and the template are never cut.
            head, tail = self._ids(head), self._ids(self._tail)
            room = self.max_prompt_length - (len(head) - k + n_image) - len(tail)
            if room < 0:
                raise DataError(
                    f"the prompt needs {len(head) - k + n_image + len(tail)} tokens for the images ({n_image} tokens) and "
                    f"the template alone, over grpo.max_prompt_length {self.max_prompt_length}: raise it or lower data.max_pixels"
                )
            ids = head + self._shorten(question, room) + tail
            truncated = True
            self.truncated_prompts += 1
            if self.truncated_prompts == 1:
                log.warning(
                    "a prompt is longer than grpo.max_prompt_length (%d tokens): its question was shortened in the middle "
                    "(the answer options are kept). Raise grpo.max_prompt_length to avoid this; further cases are only "
                    "counted (metric prompts_truncated)", self.max_prompt_length)
        return self._expand(ids, pixel_values, grid, counts, truncated)

    def _shorten(self, question: str, room: int) -> list[int]:
        """The question's tokens cut to ``room`` by removing its middle: the options sentence (if any) is kept
        whole when it fits, the rest of the room goes to the question's start."""
        k = question.rfind(OPTIONS_SENTENCE)
        before, after = (question[:k], question[k:]) if k >= 0 else (question, "")
        b, a, mark = self._ids(before), self._ids(after), self._ids(ELLIPSIS)
        if len(b) + len(a) <= room:
            return b + a
        if not a:  # no options sentence: keep the start and the end of the question
            keep = max(0, room - len(mark))
            return (b[: keep - keep // 2] + mark + b[len(b) - keep // 2 :]) if keep else b[:room]
        if len(a) + len(mark) > room:  # the options alone do not fit: cut, the question could not be answered
            raise DataError(f"the answer options alone need {len(a)} tokens but grpo.max_prompt_length leaves {room} for the "
                            "question; raise grpo.max_prompt_length (the record is skipped)")
        return b[: room - len(a) - len(mark)] + mark + a

    def _expand(self, ids: list[int], pixel_values, grid, counts: list[int], truncated: bool) -> PromptInputs:
        """Each image placeholder token expanded into that image's tokens."""
        if ids.count(self.image_token_id) != len(counts):
            raise DataError(f"expected {len(counts)} image placeholder(s) in the prompt, found {ids.count(self.image_token_id)}")
        expanded, left = [], iter(counts)
        for t in ids:
            expanded += [t] * next(left) if t == self.image_token_id else [t]
        input_ids = torch.tensor(expanded, dtype=torch.long)
        types = (input_ids == self.image_token_id).int()
        positions, nxt = self.family.positions(types, grid, self.config)
        return PromptInputs(input_ids, types, positions, pixel_values, grid, nxt, truncated)


# ----------------------------------------------------------------------------------------- batching


def collate_prompts_left(prompts: list[PromptInputs], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch for ``generate`` (input_ids, attention_mask, mm_token_type_ids, image tensors)."""
    L = max(p.length for p in prompts)
    B = len(prompts)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    types = torch.zeros((B, L), dtype=torch.int)
    for i, p in enumerate(prompts):
        input_ids[i, L - p.length :] = p.input_ids
        attention_mask[i, L - p.length :] = 1
        types[i, L - p.length :] = p.mm_token_type_ids
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": types,
        "pixel_values": torch.cat([p.pixel_values for p in prompts]),
        "image_grid_thw": torch.cat([p.image_grid_thw for p in prompts]),
    }


@dataclass
class SequenceBatch:
    """Prompt + completion rows, right-padded: row i = [prompt_i, completion_i, pad...].

    No left padding means no fully-masked query rows, no shifted positions, and no pad token before a real one
    in a causal conv or recurrent state (linear attention); completion token j of row i is predicted by the hidden
    state at ``completion_index[i, j]``.
    """

    input_ids: torch.Tensor  # [B, S] long
    attention_mask: torch.Tensor  # [B, S] long
    image_mask: torch.Tensor  # [B, S] bool: the prompt's image tokens (a sampled <|image_pad|> is text)
    position_ids: torch.Tensor  # [3, B, S] long
    completion_index: torch.Tensor  # [B, T] long: where the hidden state that predicts token j lives
    prompt_rows: list[int]  # which prompt (index into the step's prompt list) each row holds

    def to(self, device) -> "SequenceBatch":
        return SequenceBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.image_mask.to(device), self.position_ids.to(device),
            self.completion_index.to(device), self.prompt_rows,
        )


def completion_hidden(inner, batch: SequenceBatch, image_embeds) -> torch.Tensor:
    """Final hidden states that predict each completion token: [B, T, H].

    inner: the model's inner model (``...ForConditionalGeneration.model``: input embeddings, language model);
    batch on its device; image_embeds: the image features of each prompt, indexed by ``batch.prompt_rows``
    ([levels, tokens_i, H] each, see ``families.base``): level 0 scattered into the image tokens' embeddings,
    the others handed to the language model as its family takes them. No LM head.
    """
    family = family_for(inner.config)
    embeds = inner.get_input_embeddings()(batch.input_ids)
    image_mask = batch.image_mask.unsqueeze(-1)
    feats = torch.cat([image_embeds[r] for r in batch.prompt_rows], dim=1).to(embeds.dtype)
    check_image_features(image_mask, feats[0], "the batch")
    embeds = embeds.masked_scatter(image_mask, feats[0])
    # the 2-D mask: full-attention layers build their causal mask from it, linear-attention layers (Qwen3.5) zero
    # the padded positions with it; right padding keeps every pad token after the real ones of its row
    out = family.language_model(inner)(
        inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False,
        **family.language_model_kwargs(batch.image_mask, feats),
    )
    hidden = out.last_hidden_state
    idx = batch.completion_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, idx)


def check_image_features(image_mask: torch.Tensor, feats: torch.Tensor, where: str) -> None:
    """RuntimeError unless the image tokens of ``image_mask`` (bool/0-1, any shape) are as many as the feature
    rows of ``feats`` [N, H]: a mismatch means image tokens were cut or features computed for another image.
    Skipped on fake tensors (the memory simulator), which have no values."""
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(image_mask):
        return
    n = int(image_mask.sum())
    if n != feats.shape[0]:
        raise RuntimeError(f"{n} image tokens in {where} but {feats.shape[0]} image features")


def build_sequences(
    prompts: list[PromptInputs], prompt_rows: list[int], completion_ids: torch.Tensor, completion_mask: torch.Tensor, pad_token_id: int
) -> SequenceBatch:
    """Rows for the policy/reference forward. completion_ids, completion_mask: [B, T]; prompt_rows: [B]."""
    B, T = completion_ids.shape
    lengths = [prompts[r].length for r in prompt_rows]
    S = max(lengths) + T
    input_ids = torch.full((B, S), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, S), dtype=torch.long)
    image_mask = torch.zeros((B, S), dtype=torch.bool)
    position_ids = torch.zeros((3, B, S), dtype=torch.long)
    completion_index = torch.zeros((B, T), dtype=torch.long)
    steps = torch.arange(T)
    for i, r in enumerate(prompt_rows):
        p, L = prompts[r], lengths[i]
        input_ids[i, :L] = p.input_ids
        input_ids[i, L : L + T] = completion_ids[i].cpu()
        attention_mask[i, :L] = 1
        image_mask[i, :L] = p.mm_token_type_ids.bool()
        attention_mask[i, L : L + T] = completion_mask[i].cpu().long()
        position_ids[:, i, :L] = p.position_ids
        position_ids[:, i, L : L + T] = (p.next_position + steps).view(1, -1)
        completion_index[i] = L - 1 + steps
    return SequenceBatch(input_ids, attention_mask, image_mask, position_ids, completion_index, list(prompt_rows))
