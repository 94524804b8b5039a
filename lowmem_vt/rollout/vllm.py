"""``rollout.backend: vllm``: vLLM in the training process, on the same GPU, its weights refreshed in
place from the policy before every rollout.

UNTESTED in this project: vLLM needs CUDA and cannot be installed where the tests run, so its test skips
and nothing here has been executed. It relies on vLLM APIs that have moved between releases
(``LLM.apply_model``, the model's ``load_weights`` accepting Hugging Face parameter names, image-embedding
inputs for Qwen2-VL behind ``enable_mm_embeds``); see docs/rollout.md. The in-process engine
(``rollout.backend: engine``) needs none of this and is what the tests cover.

vLLM keeps its own copy of the weights (it cannot run on ours); only the LoRA-targeted matrices change
during training, so each rollout sends W + scaling * B @ A for those, one matrix at a time.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from .base import RolloutBackend, RolloutResult, SamplingParams, finish

# vLLM's share of the GPU (its weights + KV cache); the rest stays with the trainer.
GPU_MEMORY_UTILIZATION = 0.3
MAX_MODEL_LEN = 4096  # prompt + completion; vLLM sizes its KV cache to hold at least one such sequence


class VLLMRollout(RolloutBackend):
    def __init__(self, lm):
        try:
            import vllm
        except ImportError as e:
            raise RuntimeError(
                "rollout.backend: vllm needs the vllm package (pip install vllm; CUDA only), which is not installed; "
                "use rollout.backend: engine (in-process, no extra dependency) or hf"
            ) from e
        if lm.device.type != "cuda":
            raise RuntimeError("rollout.backend: vllm needs a CUDA GPU; use rollout.backend: engine or hf")
        model = lm.hf_model
        if not lm.family.vllm_rollout:
            raise RuntimeError(f"rollout.backend: vllm is wired for Qwen2-VL only (weight names, image-embedding inputs), "
                               f"not {lm.family.label}; use rollout.backend: engine or hf")
        self.lm = lm
        self.vllm = vllm
        self.lora_layers = [(name, m) for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
        if any(not m.base_layer.weight.dtype.is_floating_point for _, m in self.lora_layers):
            raise RuntimeError("rollout.backend: vllm cannot take quantized (model.quantization: nf4) weights; use rollout.backend: engine")
        # One process: the engine core runs here, so apply_model reaches vLLM's model object directly and the
        # weight update is a device-to-device copy, not a serialisation to a worker process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        args = dict(
            model=model.config._name_or_path,
            dtype=str(model.dtype).removeprefix("torch."),
            gpu_memory_utilization=GPU_MEMORY_UTILIZATION,
            max_model_len=MAX_MODEL_LEN,
            limit_mm_per_prompt={"image": 1},
            enable_mm_embeds=True,  # the trainer's image features go in; vLLM's vision tower is never run
            enable_prefix_caching=True,  # a prompt's G samples share its prefill
        )
        # keyword names differ between vLLM releases: pass only those this one knows
        known = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
        self.llm = vllm.LLM(**{k: v for k, v in args.items() if k in known})

    def _merged_weights(self):
        """(vLLM parameter name, W + scaling * B @ A) for every LoRA layer, one matrix alive at a time."""
        for name, module in self.lora_layers:
            base = module.base_layer.weight
            merged = base.float()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    merged += module.get_delta_weight(adapter).float()
            # Qwen2-VL checkpoints name the language model "model.layers...", as vLLM's loader expects
            yield name.replace("model.language_model.", "model.", 1) + ".weight", merged.to(base.dtype)

    @torch.no_grad()
    def generate(self, prompts, image_embeds, params: SamplingParams) -> RolloutResult:
        lm, vllm = self.lm, self.vllm
        self.llm.apply_model(lambda model: model.load_weights(self._merged_weights()))
        # per-prompt seeds, else drawn from the global RNG so torch.manual_seed reproduces a run
        seeds = params.seeds if params.seeds is not None else torch.randint(2**31, (len(prompts),)).tolist()
        sampling = [
            vllm.SamplingParams(
                n=params.num_generations, max_tokens=params.max_new_tokens, seed=int(seed) % 2**63,
                temperature=0.0 if params.greedy else params.temperature, top_p=params.top_p, top_k=params.top_k or -1,
                stop_token_ids=[lm.eos_token_id], detokenize=False,
            )
            for seed in seeds
        ]
        image_token = lm.family.image_token_id(lm.config)
        requests = []
        for p, feats in zip(prompts, image_embeds):
            # vLLM expands the single <|image_pad|> itself from image_grid_thw: collapse our expanded run
            ids = p.input_ids.tolist()
            first = ids.index(image_token) if image_token in ids else len(ids)
            ids = ids[: first + 1] + ids[first + p.num_image_tokens :] if p.num_image_tokens else ids
            requests.append({
                "prompt_token_ids": ids,
                "multi_modal_data": {"image": {"image_embeds": feats[0].cpu(), "image_grid_thw": p.image_grid_thw}},
            })
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        rows = [list(c.token_ids) for out in outputs for c in out.outputs]
        T = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), T), lm.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        # no sampling_logprobs: vLLM reports raw-logit log-probs, not the tempered ones the trainer uses
        return finish(ids.to(lm.device), lm.eos_token_id, lm.pad_token_id, len(prompts), params.num_generations)
