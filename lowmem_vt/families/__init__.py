"""Model families behind one seam (``base.QwenVLFamily``), one module each, chosen from ``config.model_type``.

Adding a family is one module (a ``QwenVLFamily`` subclass) registered in ``FAMILIES``, plus its tests.
"""

from __future__ import annotations

from .base import IMAGE_PLACEHOLDER, QwenVLFamily, mrope_positions
from .qwen2_5_vl import Qwen25VL
from .qwen2_vl import Qwen2VL
from .qwen3_5 import Qwen35
from .qwen3_vl import Qwen3VL

FAMILIES: dict[str, QwenVLFamily] = {f.model_type: f for f in (Qwen2VL(), Qwen25VL(), Qwen3VL(), Qwen35())}
DEFAULT_FAMILY = "qwen2_vl"
# model types refused with a reason (a neighbour of a known family that the trainer does not handle)
REFUSED = {"qwen3_5_moe": "Qwen3.5-MoE (qwen3_5_moe) is not supported (its experts' routing, LoRA targets and memory "
                          "are not handled); use a dense Qwen3.5 (qwen3_5)"}


class UnknownFamily(ValueError):
    """A model type no family module handles."""


def family_named(model_type: str) -> QwenVLFamily:
    """The family of ``model_type`` (``config.model_type``); UnknownFamily names the known ones."""
    if model_type in REFUSED:
        raise UnknownFamily(REFUSED[model_type])
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnknownFamily(f"model_type {model_type!r} is not a model family this trainer knows; known: "
                            + ", ".join(f"{f.label} ({t})" for t, f in FAMILIES.items())) from None


def family_for(config) -> QwenVLFamily:
    """The family of a model config (the whole model's, as ``...ForConditionalGeneration.config``)."""
    return family_named(getattr(config, "model_type", None))


def known_labels() -> str:
    return ", ".join(f.label for f in FAMILIES.values())


def published_config(name_or_path: str):
    """The config of a model known by its hub id (each family carries its published models' config values),
    matched on the id or a local folder of that name; None for others."""
    name = name_or_path.rstrip("/").rsplit("/", 1)[-1]
    for family in FAMILIES.values():
        for hub_id, make in family.published_configs().items():
            if name == hub_id.rsplit("/", 1)[-1]:
                return make()
    return None


__all__ = ["DEFAULT_FAMILY", "FAMILIES", "REFUSED", "IMAGE_PLACEHOLDER", "QwenVLFamily", "UnknownFamily", "family_for",
           "family_named", "known_labels", "mrope_positions", "published_config"]
