"""The GRPO trainer. ``Trainer.step()`` is the recipe, in order, one short method per phase:
rollout -> rewards and advantages -> reference log-probs -> policy update -> metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import signal
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from . import checkpoint as ckpt
from . import preflight
from .config import RecipeConfig, to_dict
from .data import DataError, Example, load_examples
from .distributed import init_from_env, wrap_policy
from .grpo import (
    LossCounts,
    LossVariant,
    SamplerCorrection,
    group_advantages,
    loss_scale,
    overlong_penalty,
    truncated_rows,
    zero_variance_groups,
)
from .held_memory import HeldMemoryWatch, device_capacity, held_bytes
from .inputs import InputBuilder, PromptInputs, build_sequences
from .kernels.head import TRITON_HEAD, fused_grpo_loss, token_logprobs
from .metrics import MetricsWriter, format_summary, run_summary
from .model import LoadedModel, image_embeddings, load_model, resolve_device, sequence_hidden, trainable_parameters
from .reporting import Reporters
from .rewards import compute_rewards, reflection_rate
from .rollout import RolloutResult, SamplingParams, make_rollout
from .selfcheck import SelfCheckError, run_selfcheck
from .selfcheck.head import HeadSettings, recheck
from .selfcheck.rollout import LOGPROB_MAX_BOUND
from .tiny import resolve_model_path

log = logging.getLogger(__name__)
# mean |sampling log-prob - policy log-prob| above which a step warns (bf16 rounding alone stays below 0.01)
SAMPLER_DIFF_WARN = 0.05


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the last good checkpoint is intact."""


class StepInterrupted(Exception):
    """SIGINT/SIGTERM arrived during a step; the step is abandoned and the state before it is saved."""


@dataclass
class StepBatch:
    examples: list[Example]
    prompts: list[PromptInputs]
    seeds: list[int]  # per-prompt sampling seeds


@dataclass
class Rollout:
    embeds: list[torch.Tensor]  # each prompt's image features, computed once for the step
    result: RolloutResult
    seconds: float
    backend: str  # the rollout backend that ran (the run may switch to hf: Trainer._watch_sampler)


@dataclass
class Scored:
    texts: list[str]
    answers: list[str]
    per_func: dict[str, list[float]]  # each reward function's value per completion
    rewards: torch.Tensor  # [B] their sum
    advantages: torch.Tensor  # [B]


@dataclass
class Reference:
    slices: list[slice]  # the micro-batches
    ref_logp: torch.Tensor | None  # [B, T] reference (adapter off), when beta > 0
    old_logp: torch.Tensor | None  # [B, T] the policy before the update, when num_iterations > 1


@dataclass
class Update:
    tokens_all: float  # completion tokens over all ranks
    seqs_all: float  # completions over all ranks
    loss: float = 0.0
    kl_sum: float = 0.0
    clipped: float = 0.0
    grad_norm: float = float("nan")
    skipped: bool = False
    drift_sum: float = 0.0  # |sampling log-prob - policy log-prob| summed over tokens, before the first update
    drift_max: float = 0.0
    lr: float = 0.0
    recheck: dict | None = None  # the loss head's periodic re-check against the reference (kernels_recheck_every)
    sums: dict | None = None  # the loss's other sums for the logs (lowmem_vt.grpo.loss_stats), first update
    mins: dict | None = None


@dataclass
class Refill:
    """What DAPO's dynamic sampling did in one step (``Trainer._dynamic_sampling``)."""

    rounds: int = 1  # rollout rounds the step ran (1 = none extra)
    groups_dropped: int = 0  # zero-variance groups left out
    groups_kept: int = 0
    cap_hit: bool = False


_LOGGED = ("kl_sum", "clipped_tokens", "tokens")  # summed by Update's own fields


def _accumulate_stats(u: Update, stats: dict) -> None:
    """Add one micro-batch's loss stats to the step's (sums; min / max for the extremes). One host sync."""
    keys = [k for k in stats if k not in _LOGGED]
    if not keys:
        return
    values = torch.stack([stats[k].float() for k in keys]).tolist()
    u.sums, u.mins = u.sums or {}, u.mins or {}
    for k, v in zip(keys, values):
        if k == "is_ratio_min":
            u.mins[k] = min(u.mins.get(k, math.inf), v)
        elif k == "is_ratio_max":
            u.mins[k] = max(u.mins.get(k, -math.inf), v)
        else:
            u.sums[k] = u.sums.get(k, 0.0) + v
    u.sums.setdefault("tokens", 0.0)
    u.sums["tokens"] += float(stats["tokens"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_scheduler(optimizer, kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    t = cfg.train
    kw = dict(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, **kw)
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise RuntimeError(f"train.optimizer {t.optimizer} needs bitsandbytes (pip install bitsandbytes)") from exc
    cls = bnb.optim.PagedAdamW8bit if t.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, **kw)


class Trainer:
    def __init__(self, cfg: RecipeConfig, *, resume: str | None = None, overwrite: bool = False, lm: LoadedModel | None = None,
                 selfcheck_force: bool = False):
        self.cfg = cfg
        self.out = Path(cfg.log.output_dir)
        self._release = None
        # everything checkable before loading the model, in one place shared with the CLI (raises PreflightError):
        # the recipe, the data, the run folder, the model's config and, for a resume, the checkpoint against them
        model_config = preflight.check_recipe(cfg, check_model=lm is None, overwrite=overwrite and not resume,
                                              model_config=None if lm is None else lm.config)
        resumed_from = preflight.check_resume(cfg, resume, model_config) if resume else None  # verified, read only
        seed_everything(cfg.train.seed)
        self.device = resolve_device(cfg.train.device)
        self.dist = init_from_env(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if cfg.train.prompts_per_step % self.dist.world_size:
            raise DataError(
                f"{cfg.source_file}: key 'train.prompts_per_step': {cfg.train.prompts_per_step} prompts do not split over "
                f"{self.dist.world_size} ranks; use a multiple of the number of processes"
            )
        # One run per folder: rank 0 locks it (refusing a folder holding another run unless resumed or overwritten)
        lock = ckpt.claim_run_folder(self.out, resume=bool(resume), overwrite=overwrite) if self.dist.is_main else None
        try:
            self._setup(cfg, resume, resumed_from, lm, selfcheck_force)
        except BaseException:
            if lock is not None:
                lock.release(cleanup=True)  # refused before the run's first write: a folder it made goes again
            raise
        self._release = weakref.finalize(self, lock.release) if lock else None  # by close(), or at exit

    def _setup(self, cfg: RecipeConfig, resume: str | None, resumed_from: Path | None, lm: LoadedModel | None,
               selfcheck_force: bool) -> None:
        self.loss_variant = LossVariant.of(cfg.grpo)
        # Data before the model: a broken dataset fails fast, before minutes of loading.
        self.examples, self.data_report = load_examples(cfg.data)
        self.steps_per_epoch = len(self.examples) // cfg.train.prompts_per_step
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{len(self.examples)} usable examples, fewer than train.prompts_per_step ({cfg.train.prompts_per_step})"
            )
        self.total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else math.ceil(cfg.train.num_epochs * self.steps_per_epoch)
        if self.device.type == "cuda" and lm is None:
            # refuse, before loading, a run whose predicted peak does not fit this GPU (names the knob)
            from .planner import check_fits, config_for, detected_gpu_gib

            memory_plan = check_fits(cfg, config_for(cfg), detected_gpu_gib())
            if self.dist.is_main:
                log.info("memory plan (GiB):\n%s", memory_plan.table())
        if lm is None:
            cfg.model.name_or_path = resolve_model_path(cfg.model.name_or_path)  # a tiny model's name: built (preflight did)
        self.lm = lm or load_model(
            cfg.model, cfg.lora, self.device, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels
        )
        self.device = self.lm.device
        # the base's identity goes into every checkpoint; a resume compares it (again, now that the base is on disk)
        self.base_id = ckpt.base_identity(cfg.model.name_or_path)
        if resumed_from is not None:
            preflight.check_resume_base(cfg.model.name_or_path, resumed_from)
        self.inputs = InputBuilder(
            self.lm.tokenizer, self.lm.image_processor, self.lm.config, max_prompt_length=cfg.grpo.max_prompt_length,
            min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels,
        )
        # every fast path measured against its reference on this machine before step 1 (lowmem_vt/selfcheck):
        # writes selfcheck.json, raises SelfCheckError when a named backend fails
        self.selfcheck = run_selfcheck(cfg, self.lm, examples=self.examples, inputs=self.inputs, out_dir=self.out,
                                       dist=self.dist, force=selfcheck_force)
        self.kernel_backend = self.selfcheck.kernels
        self.rollout_backend = self.selfcheck.rollout
        if self.device.type == "cuda" and lm is None:
            self._check_fallback_fits()
        self.rollout = self.selfcheck.rollout_backend or make_rollout(self.rollout_backend, self.lm)
        self._drift_steps = 0  # consecutive steps whose sampler log-probs drift (_sampler_drifts)
        self._logged_backends: tuple[str, str] | None = None
        self.policy = wrap_policy(self.lm, self.dist)  # DDP all-reduces LoRA gradients when several ranks run
        self.params = trainable_parameters(self.lm.peft_model)
        self.optimizer = make_optimizer(self.params, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg.train.lr_scheduler, cfg.train.warmup_steps, self.total_steps)
        self.step_count = 0  # completed optimizer steps
        # prompt batches drawn so far: the step's own, plus dynamic sampling's extra rounds (equal to step_count
        # without it); the data order and the sampling seeds follow it, and checkpoints keep it (exact resume)
        self.data_cursor = 0
        self.bad_steps = 0  # consecutive non-finite steps
        self.skipped_records = 0
        self._interrupt: int | None = None
        self._stopped_by: int | None = None  # the signal that stopped the run at once (a second one)
        self._updated = False
        self._bad_total = 0  # skipped steps over the whole run (kept in checkpoints)
        # memory left allocated after each step, watched for growth
        self._held_watch = HeldMemoryWatch(capacity=device_capacity(self.device))
        if resumed_from:
            self._restore(resumed_from)
        self.recipe_text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
        self.metrics = self.samples = self.reporters = None
        if self.dist.is_main:  # one writer: rank 0 logs and saves; lines after the resumed step are dropped
            if resumed_from is not None and Path(os.path.realpath(resumed_from)).parent == Path(os.path.realpath(self.out)):
                ckpt.set_aside_later_checkpoints(self.out, self.step_count)  # the replayed steps' checkpoints
            self.metrics = MetricsWriter(self.out / "metrics.jsonl", resume_step=self.step_count if resume else None)
            self.samples = MetricsWriter(self.out / "samples.jsonl", resume_step=self.step_count if resume else None)
            (self.out / "recipe.yaml").write_text(self.recipe_text)
            if cfg.log.report_to:
                self.reporters = Reporters(cfg.log.report_to, self.out, resume_step=self.step_count if resume else None,
                                           config=to_dict(cfg), project=cfg.log.wandb_project)
        if resumed_from:
            log.info("resumed from %s at step %d", resumed_from, self.step_count)

    # ------------------------------------------------------------------------------------ data order

    def _batch_indices(self, step: int) -> tuple[list[int], list[int]]:
        """This rank's prompts of optimizer step ``step`` and their sampling seeds.

        The global order is a fixed per-epoch permutation and each prompt's seed depends on (step, its place
        in the global batch) only: resuming replays the same prompts and samples, with any number of ranks.
        """
        epoch, k = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.cfg.data.seed * 1000003 + epoch)
        perm = torch.randperm(len(self.examples), generator=g).tolist()
        n = self.cfg.train.prompts_per_step
        per_rank = n // self.dist.world_size
        lo = k * n + self.dist.rank * per_rank
        seeds = [(self.cfg.train.seed * 1_000_003 + step * 4099 + j) % 2**63 for j in range(lo - k * n, lo - k * n + per_rank)]
        return perm[lo : lo + per_rank], seeds

    def _encode(self, indices: list[int], seeds: list[int]) -> StepBatch:
        examples, prompts, kept_seeds = [], [], []
        for i, seed in zip(indices, seeds):
            ex = self.examples[i]
            try:
                prompts.append(self.inputs.encode(ex.images, ex.question))
                examples.append(ex)
                kept_seeds.append(seed)
            except DataError as exc:
                if self.cfg.data.on_error == "raise":
                    raise
                self.skipped_records += 1
                log.warning("skipping example %s: %s", ex.uid, exc)
        if not prompts:
            raise DataError(f"every prompt of step {self.step_count + 1} was rejected; see the warnings above")
        return StepBatch(examples, prompts, kept_seeds)

    # ----------------------------------------------------------------------------------------- step

    def _check_interrupt(self) -> None:
        # Only before the step's first optimizer update: after it, the state "before the step" is gone.
        # Every rank reaches these checks at the same points, so they agree (a collective) and stop together.
        if self._updated:
            return
        if self.dist.any(self._interrupt is not None):
            raise StepInterrupted(signal.Signals(self._interrupt or signal.SIGTERM).name)

    def step(self) -> dict:
        """One GRPO optimizer step (more with num_iterations > 1) on the next prompts. Returns its metrics."""
        t0 = time.perf_counter()
        self._updated = False
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        batch = self._encode(*self._batch_indices(self.data_cursor))
        self.data_cursor += 1
        vision_before = self.lm.vision_calls[0]
        roll = self._rollout(batch)
        scored = self._rewards(batch, roll)
        train_batch, train_roll, train_scored, refill = batch, roll, scored, None
        if self.cfg.grpo.dynamic_sampling:
            train_batch, train_roll, train_scored, refill = self._dynamic_sampling(batch, roll, scored)
        ref = self._reference(train_batch, train_roll)
        update = self._update(train_batch, train_roll, train_scored, ref)
        return self._metrics(batch, roll, scored, update, vision_before, time.perf_counter() - t0, refill)

    def _rollout(self, batch: StepBatch) -> Rollout:
        """1. G samples per prompt, the image encoded once per prompt and reused by every pass of the step."""
        g, cfg = self.cfg.grpo, self.cfg
        embeds = image_embeddings(self.lm, [p.pixel_values for p in batch.prompts], [p.image_grid_thw for p in batch.prompts])
        params = SamplingParams(g.num_generations, g.max_completion_length, g.temperature, cfg.rollout.top_p,
                                cfg.rollout.top_k, seeds=batch.seeds)
        t = time.perf_counter()
        result = self.rollout.generate(batch.prompts, embeds, params)
        seconds = time.perf_counter() - t
        self._check_interrupt()
        return Rollout(embeds, result, seconds, self.rollout_backend)

    def _rewards(self, batch: StepBatch, roll: Rollout) -> Scored:
        """2. rewards of every completion; 3. advantages, per group of G."""
        cfg = self.cfg
        r = roll.result
        texts = self.lm.tokenizer.batch_decode(r.completion_ids, skip_special_tokens=True)
        answers = [batch.examples[i].answer for i in r.prompt_rows]
        choices = [batch.examples[i].choices for i in r.prompt_rows]
        per_func = compute_rewards(texts, answers, choices, cfg.rewards.funcs, cfg.rewards.accuracy_mode)
        if cfg.rewards.overlong_buffer > 0:  # DAPO's soft overlong punishment, a reward of its own in the logs
            per_func["overlong"] = overlong_penalty(r.completion_mask.sum(1), cfg.grpo.max_completion_length,
                                                    cfg.rewards.overlong_buffer, cfg.rewards.overlong_penalty).tolist()
        rewards = torch.tensor([sum(v) for v in zip(*per_func.values())], dtype=torch.float32)
        advantages = group_advantages(rewards, cfg.grpo.num_generations, cfg.grpo.scale_rewards)
        return Scored(texts, answers, per_func, rewards, advantages)

    def _dynamic_sampling(self, batch: StepBatch, roll: Rollout, scored: Scored) -> tuple[StepBatch, Rollout, Scored, Refill]:
        """DAPO's dynamic sampling (arXiv 2503.14476, sec. 3.2): groups whose G rewards are all equal carry no
        signal and are dropped; more rounds of ``prompts_per_step`` prompts (the next ones in the data order, each
        round the same size as the first: never a bigger rollout) refill the step until it holds as many groups as
        it drew, or ``dynamic_sampling_max_rounds`` extra rounds are spent (one line in the log; the step trains on
        what it has). Every rank runs the same number of rounds (the decision is a collective). The extra rounds
        move ``data_cursor``, which checkpoints keep: a resumed run draws the same prompts and samples."""
        g = self.cfg.grpo
        G, wanted = g.num_generations, len(batch.prompts)
        rounds, refill = [(batch, roll, scored)], Refill()
        kept = [(0, p) for p in (~zero_variance_groups(scored.rewards, G)).nonzero().flatten().tolist()]
        while self.dist.any(len(kept) < wanted) and len(rounds) <= g.dynamic_sampling_max_rounds:
            more = self._encode(*self._batch_indices(self.data_cursor))
            self.data_cursor += 1
            more_roll = self._rollout(more)
            more_scored = self._rewards(more, more_roll)
            kept += [(len(rounds), p) for p in (~zero_variance_groups(more_scored.rewards, G)).nonzero().flatten().tolist()]
            rounds.append((more, more_roll, more_scored))
        refill.rounds = len(rounds)
        refill.groups_dropped = sum(len(b.prompts) for b, _, _ in rounds) - min(len(kept), wanted)
        refill.cap_hit = len(kept) < wanted
        if refill.cap_hit and self.dist.is_main:
            log.info("step %d: dynamic sampling kept %d of %d groups after %d extra rollout rounds "
                     "(grpo.dynamic_sampling_max_rounds); the step trains on those", self.step_count + 1, len(kept),
                     wanted, refill.rounds - 1)
        if not kept:  # nothing carries signal: train on the first round as it is (zero advantages, KL only)
            kept = [(0, p) for p in range(wanted)]
        kept = kept[:wanted]
        refill.groups_kept = len(kept)
        return (*self._select_groups(rounds, kept), refill)

    def _select_groups(self, rounds: list, kept: list[tuple[int, int]]) -> tuple[StepBatch, Rollout, Scored]:
        """One batch of the groups ``kept`` ((round, prompt) pairs) of several rollout rounds."""
        G = self.cfg.grpo.num_generations
        examples, prompts, seeds, embeds, rows, texts, answers = [], [], [], [], [], [], []
        per_func: dict[str, list[float]] = {k: [] for k in rounds[0][2].per_func}
        T = max(int(r.result.completion_ids.shape[1]) for _, r, _ in rounds)
        ids, masks, sampled, seconds = [], [], [], 0.0
        for _, r, _ in rounds:
            seconds += r.seconds
        for i, (k, p) in enumerate(kept):
            b, r, sc = rounds[k]
            examples.append(b.examples[p])
            prompts.append(b.prompts[p])
            seeds.append(b.seeds[p])
            embeds.append(r.embeds[p])
            sl = slice(p * G, (p + 1) * G)
            pad = T - r.result.completion_ids.shape[1]
            ids.append(torch.nn.functional.pad(r.result.completion_ids[sl], (0, pad), value=self.lm.pad_token_id))
            masks.append(torch.nn.functional.pad(r.result.completion_mask[sl], (0, pad)))
            if r.result.sampling_logprobs is not None:
                sampled.append(torch.nn.functional.pad(r.result.sampling_logprobs[sl], (0, pad)))
            rows += [i] * G
            texts += sc.texts[sl]
            answers += sc.answers[sl]
            for key in per_func:
                per_func[key] += sc.per_func[key][sl]
        result = RolloutResult(torch.cat(ids), torch.cat(masks), rows, torch.cat(sampled) if len(sampled) == len(kept) else None)
        rewards = torch.tensor([sum(v) for v in zip(*per_func.values())], dtype=torch.float32)
        advantages = group_advantages(rewards, G, self.cfg.grpo.scale_rewards)  # "batch" scale: over the kept batch
        return (StepBatch(examples, prompts, seeds), Rollout(embeds, result, seconds, rounds[0][1].backend),
                Scored(texts, answers, per_func, rewards, advantages))

    def _reference(self, batch: StepBatch, roll: Rollout) -> Reference:
        """4. reference log-probs (adapter off) and, for several updates per rollout, the old policy's."""
        g = self.cfg.grpo
        B = roll.result.completion_ids.shape[0]
        mb = self.cfg.train.micro_batch_size
        slices = [slice(i, min(i + mb, B)) for i in range(0, B, mb)]
        ref_logp = self._logprobs(batch.prompts, roll.embeds, roll.result, slices, adapter=False) if g.beta > 0 else None
        old_logp = self._logprobs(batch.prompts, roll.embeds, roll.result, slices, adapter=True) if g.num_iterations > 1 else None
        self._check_interrupt()
        return Reference(slices, ref_logp, old_logp)

    def _update(self, batch: StepBatch, roll: Rollout, scored: Scored, ref: Reference) -> Update:
        """5. policy update(s). DDP averages gradients over ranks, so each rank normalises by the per-rank share of
        the global counts: the result is the gradient of the global-batch loss. The first pass also measures how
        far the sampler's log-probs are from the policy's (0 up to rounding when the sampler is the policy)."""
        cfg, g = self.cfg, self.cfg.grpo
        r = roll.result
        loss_mask = r.completion_mask
        if g.mask_truncated_completions:  # DAPO: a completion cut at max_completion_length leaves the loss
            loss_mask = loss_mask * (~truncated_rows(r.completion_ids, loss_mask, self.lm.eos_token_id)).unsqueeze(1).float()
        correction = self.sampler_correction(roll.backend)
        tokens_all, seqs_all = self.dist.sum([float(loss_mask.sum()), float(r.completion_ids.shape[0])])
        W = self.dist.world_size
        counts = LossCounts(seqs_all / W, tokens_all / W, g.max_completion_length)
        eps_high = g.epsilon if g.epsilon_high is None else g.epsilon_high
        scale = loss_scale(self.lm.lm_head_weight.dtype, counts)  # 1 unless the model is float16
        u = Update(tokens_all, seqs_all)
        sampled = r.sampling_logprobs
        every = cfg.kernels_recheck_every
        recheck_due = bool(every) and self.kernel_backend != "torch" and (self.step_count + 1) % every == 0
        for it in range(g.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            u.loss, u.kl_sum, u.clipped = 0.0, 0.0, 0.0
            for j, s in enumerate(ref.slices):
                seqs, T = self._sequences(batch.prompts, r, s)
                sync = j == len(ref.slices) - 1 or not self.dist.enabled  # all-reduce once, after the last micro-batch
                with (contextlib.nullcontext() if sync else self.policy.no_sync()):
                    hidden = self.policy(seqs, roll.embeds)
                    head_inputs = (r.completion_ids[s, :T].to(self.device), loss_mask[s, :T].to(self.device),
                                   scored.advantages[s].to(self.device),
                                   None if ref.old_logp is None else ref.old_logp[s, :T].to(self.device),
                                   None if ref.ref_logp is None else ref.ref_logp[s, :T].to(self.device))
                    if recheck_due and it == 0 and j == 0:  # before this micro-batch's loss: a failure switches now
                        u.recheck = self._recheck_head(hidden, head_inputs, counts)
                    loss, stats, logp = fused_grpo_loss(
                        hidden, self.lm.lm_head_weight, *head_inputs,
                        beta=g.beta, epsilon_low=g.epsilon, epsilon_high=eps_high, loss_type=g.loss_type, counts=counts,
                        temperature=g.temperature, backend=self.kernel_backend, variant=self.loss_variant,
                        correction=correction,
                        sampling_logp=None if not correction.on else sampled[s, :T].to(self.device),
                    )
                    (loss * scale).backward()
                if it == 0 and sampled is not None:
                    drift = (logp - sampled[s, :T].to(logp.device)).abs() * r.completion_mask[s, :T].to(logp.device)
                    total, largest = torch.stack([drift.sum(), drift.max()]).tolist()  # one host sync
                    u.drift_sum, u.drift_max = u.drift_sum + total, max(u.drift_max, largest)
                u.loss += float(loss.detach())
                u.kl_sum += float(stats["kl_sum"])
                u.clipped += float(stats["clipped_tokens"])
                if it == 0:
                    _accumulate_stats(u, stats)
                self._check_interrupt()
            if scale != 1.0:
                for p in self.params:
                    if p.grad is not None:
                        p.grad.div_(scale)
            u.loss, u.kl_sum, u.clipped = self.dist.sum([u.loss, u.kl_sum, u.clipped])
            u.loss /= W
            u.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.train.max_grad_norm or float("inf")))
            if self.dist.any(not (math.isfinite(u.loss) and math.isfinite(u.grad_norm))):
                u.skipped = True
                self.optimizer.zero_grad(set_to_none=True)
                break
            self.optimizer.step()
            self._updated = True
            if not self._weights_finite():  # the update itself overflowed (a learning rate far too large)
                raise TrainingStopped(self._diverged_message(self.step_count + 1))
        self.optimizer.zero_grad(set_to_none=True)
        u.lr = self.scheduler.get_last_lr()[0]
        if u.skipped:
            self.bad_steps += 1
            log.warning("step %d: non-finite loss %s / grad norm %s; update skipped (%d in a row)",
                        self.step_count + 1, u.loss, u.grad_norm, self.bad_steps)
        else:
            self.bad_steps = 0
        self.scheduler.step()
        self.step_count += 1
        return u

    def sampler_correction(self, backend: str) -> SamplerCorrection:
        """The recipe's sampler correction for this rollout backend: ``auto`` is none with hf (the sampler is the
        policy itself: the ratio is 1 up to rounding) and with vllm (it reports no tempered log-probs), and
        token_truncate with the engine (its kernels differ from the trainer's: a bounded per-token weight, which
        never drops a whole completion for rounding noise summed over hundreds of tokens)."""
        g = self.cfg.grpo
        mode = g.sampler_correction
        if mode == "auto":
            mode = "token_truncate" if backend == "engine" else "none"
        return SamplerCorrection(mode, g.sampler_correction_clip_min, g.sampler_correction_clip_max)

    def _metrics(self, batch: StepBatch, roll: Rollout, scored: Scored, u: Update, vision_before: int,
                 elapsed: float, refill: Refill | None = None) -> dict:
        """6. the step's metrics, over all ranks (every rank holds whole groups). Rewards, lengths and rates are
        those of the step's first rollout round (what the policy writes for fresh prompts, before dynamic sampling
        keeps the groups that carry signal)."""
        cfg, r = self.cfg, roll.result
        G, B = cfg.grpo.num_generations, r.completion_ids.shape[0]
        lengths = self.dist.gather(r.completion_mask.sum(1))
        gen_tokens = float(lengths.sum())
        reflect = reflection_rate(scored.texts, cfg.rewards.reflection_words)
        per_func = {k: self.dist.gather(torch.tensor(v, dtype=torch.float64)).tolist() for k, v in scored.per_func.items()}
        rewards = self.dist.gather(scored.rewards)
        vision_calls, n_prompts, reflect_sum, truncated = self.dist.sum(
            [self.lm.vision_calls[0] - vision_before, len(batch.prompts), reflect * B, sum(p.truncated for p in batch.prompts)])
        grouped = rewards.view(-1, G)
        sampled = r.sampling_logprobs is not None
        m = {
            "step": self.step_count,
            "epoch": self.step_count / self.steps_per_epoch,
            "reward": float(rewards.mean()),
            "reward_std": float(grouped.std(1).mean()),
            "frac_reward_zero_std": float((grouped.std(1) == 0).float().mean()),
            **{f"rewards/{k}": float(np.mean(v)) for k, v in per_func.items()},
            "accuracy": float(np.mean(per_func["accuracy"])) if "accuracy" in per_func else None,
            "format_rate": float(np.mean(per_func["format"])) if "format" in per_func else None,
            "completion_length_mean": float(lengths.mean()),
            "completion_length_max": float(lengths.max()),
            "reflection_rate": reflect_sum / u.seqs_all,
            "kl": u.kl_sum / u.seqs_all,
            "clip_fraction": u.clipped / max(u.tokens_all, 1.0),
            # None when the rollout backend reports no log-probs (vllm); see docs/rollout.md
            "sampler_logprob_diff": self.dist.sum([u.drift_sum])[0] / max(u.tokens_all, 1.0) if sampled else None,
            "sampler_logprob_diff_max": float(self.dist.gather(torch.tensor([u.drift_max])).max()) if sampled else None,
            "loss": u.loss,
            "grad_norm": u.grad_norm,
            "lr": u.lr,
            "tokens_per_s": gen_tokens / max(roll.seconds, 1e-9),
            "rollout_s": roll.seconds,
            "step_time_s": elapsed,
            "vision_forward_calls": int(vision_calls),
            "prompts": int(n_prompts),
            "prompts_truncated": int(truncated),
            "skipped_step": u.skipped,
            "bad_steps_total": self._bad_total + int(u.skipped),
            "data_skipped": self.data_report.as_metrics()["data_skipped"] + self.skipped_records,
            "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None,
        }
        m.update(self._loss_metrics(u))
        if refill is not None:
            dropped, kept, rounds = self.dist.sum([refill.groups_dropped, refill.groups_kept, refill.rounds])
            m["dynamic_groups_dropped"] = int(dropped)
            m["dynamic_rounds"] = int(rounds / self.dist.world_size)
            # rollouts (completions) sampled per group the update kept
            m["dynamic_rollouts_per_kept_group"] = rounds / self.dist.world_size * n_prompts * G / max(kept, 1)
        self._bad_total = m["bad_steps_total"]
        if self._sampler_drifts(m) and self.dist.is_main:
            log.warning("step %d: the rollout's log-probs differ from the policy's by %.3f per token on average (bf16 "
                        "rounding gives < 0.01; bound %.2f), %.3f on the worst token (bound %.2g): the sampler "
                        "(rollout.backend: %s) is not the policy the trainer scores; see docs/rollout.md", self.step_count,
                        m["sampler_logprob_diff"], SAMPLER_DIFF_WARN, m["sampler_logprob_diff_max"],
                        self._sampler_max_bound, roll.backend)
        if u.recheck is not None:
            m["kernel_recheck_grad_err"] = u.recheck["grad"]
            m["kernel_recheck_ok"] = u.recheck["ok"]
        backends = (self.kernel_backend, roll.backend)  # what this step's policy update and rollout ran
        if backends != self._logged_backends:  # step 1 (and the first step after a switch) records them
            m["kernels"], m["rollout_backend"] = backends
            if self._logged_backends is None:
                m["selfcheck_s"] = self.selfcheck.seconds
            self._logged_backends = backends
        self._watch_sampler(m)
        self._last_texts = (scored.texts, scored.answers, rewards.tolist())
        return m

    @property
    def _sampler_max_bound(self) -> float:
        """The largest per-token sampler log-prob difference a clean sampler shows in this run's dtype."""
        return LOGPROB_MAX_BOUND.get(str(self.lm.lm_head_weight.dtype).removeprefix("torch."), 0.5)

    def _sampler_drifts(self, m: dict) -> bool:
        """The step's sampler log-probs are not the policy's: the mean over tokens above SAMPLER_DIFF_WARN, or the
        worst token above the dtype's bound (a fault on a few tokens averages out of the mean)."""
        if m["sampler_logprob_diff"] is None:
            return False
        return m["sampler_logprob_diff"] > SAMPLER_DIFF_WARN or m["sampler_logprob_diff_max"] > self._sampler_max_bound

    def _loss_metrics(self, u: Update) -> dict:
        """TRL 1.16's loss metrics from the summed stats of the first update (only those the loss produced)."""
        if not u.sums:
            return {}
        keys = sorted(u.sums)
        sums = dict(zip(keys, self.dist.sum([u.sums[k] for k in keys])))
        m = {}

        def ratio(name: str, num: str, den: str) -> None:
            if num in sums and den in sums:
                m[name] = sums[num] / max(sums[den], 1.0)

        ratio("kl_token_mean", "kl_token_sum", "tokens")
        ratio("entropy", "entropy_sum", "tokens")
        for side in ("low", "high", "region"):
            ratio(f"clip_ratio/{side}_mean", f"clip_{side}", "clip_units")
        ratio("cispo_clip_ratio", "cispo_clipped", "tokens")
        ratio("sampler_is_ratio_mean", "is_ratio_sum", "is_units")
        ratio("sampler_is_masked_fraction", "is_masked", "is_units")
        if "phi_sum" in sums:
            m["vespo/phi_seq_mean"] = sums["phi_sum"] / max(u.seqs_all, 1.0)
        if "is_ratio_min" in (u.mins or {}):
            m["sampler_is_ratio_min"] = float(self.dist.gather(torch.tensor([u.mins["is_ratio_min"]])).min())
            m["sampler_is_ratio_max"] = float(self.dist.gather(torch.tensor([u.mins["is_ratio_max"]])).max())
        return m

    def _watch_sampler(self, m: dict) -> None:
        """With the engine (or vllm): ``rollout.fallback_after`` steps in a row whose sampler log-probs drift
        (``_sampler_drifts``: the mean or the worst token) switch the run to hf (the metric rollout_switched_to_hf
        marks the step). Both figures are over all ranks, so every rank switches at the same step."""
        n = self.cfg.rollout.fallback_after
        if not n or self.rollout_backend == "hf" or m["sampler_logprob_diff"] is None:
            return
        self._drift_steps = self._drift_steps + 1 if self._sampler_drifts(m) else 0
        if self._drift_steps >= n:
            if self.dist.is_main:
                log.warning("step %d: sampler log-probs off the policy's (mean above %.2f or worst token above %.2g) for "
                            "%d steps in a row with rollout.backend %s: the run switches to hf (the reference) from the "
                            "next step on; see docs/selfcheck.md", self.step_count, SAMPLER_DIFF_WARN,
                            self._sampler_max_bound, n, self.rollout_backend)
            self.rollout = make_rollout("hf", self.lm)
            self.rollout_backend = "hf"
            self._drift_steps = 0
            m["rollout_switched_to_hf"] = True

    def _recheck_head(self, hidden: torch.Tensor, head_inputs: tuple, counts: LossCounts) -> dict:
        """The Triton head's gradient against the torch reference on this micro-batch's first rows (issue 21): a
        disagreement (on any rank) switches the run to the torch head, with a warning."""
        # the loss this run computes now: the correction of the rollout backend in use (an hf fallback has none)
        settings = dataclasses.replace(HeadSettings.from_recipe(self.cfg), correction=self.sampler_correction(self.rollout_backend),
                                       also_uncorrected=False)
        result = recheck(hidden, self.lm.lm_head_weight, *head_inputs, counts, settings, self.kernel_backend)
        if self.dist.any(not result["ok"]):
            if self.dist.is_main:
                log.warning("step %d: the loss head %s disagrees with the exact (float64) head on this micro-batch beyond "
                            "the torch reference's own error (%s): the run switches to kernels: torch",
                            self.step_count + 1, self.kernel_backend, "; ".join(result.get("problems", [])) or "a disagreement on another rank")
            self.kernel_backend = "torch"
            result["ok"] = False
        return result

    def _check_fallback_fits(self) -> None:
        """The memory plan assumed the Triton head; when the self-check fell back to torch, its head must fit too."""
        planned = TRITON_HEAD if self.cfg.kernels in ("auto", "triton") else self.cfg.kernels
        if self.kernel_backend == planned:
            return
        from .planner import PlanError, check_fits, config_for, detected_gpu_gib

        gib = detected_gpu_gib()
        if gib is None:
            return
        try:
            check_fits(dataclasses.replace(self.cfg, kernels=self.kernel_backend), config_for(self.cfg), gib)
        except PlanError as exc:
            raise SelfCheckError(
                f"{self.cfg.source_file}: key 'kernels': the self-check fell back to {self.kernel_backend} (see its warnings "
                f"and {self.out / 'selfcheck.json'}), whose memory does not fit this GPU: {str(exc).splitlines()[0]}"
            ) from None

    def _sequences(self, prompts, roll, s: slice):
        mask = roll.completion_mask[s]
        T = max(1, int(mask.sum(1).max()))  # trim the padding every row of this micro-batch has
        seqs = build_sequences(prompts, roll.prompt_rows[s], roll.completion_ids[s, :T], mask[:, :T], self.lm.pad_token_id)
        return seqs.to(self.device), T

    @torch.no_grad()
    def _logprobs(self, prompts, embeds, roll, slices, *, adapter: bool) -> torch.Tensor:
        """Per-token log-probs [B, T_max] of the sampled completions, policy (adapter on) or reference (off)."""
        out = torch.zeros(roll.completion_ids.shape, dtype=torch.float32)
        ctx = self.lm.peft_model.disable_adapter() if not adapter else contextlib.nullcontext()
        with ctx:
            for s in slices:
                seqs, T = self._sequences(prompts, roll, s)
                hidden = sequence_hidden(self.lm, seqs, embeds)
                lp = token_logprobs(hidden, self.lm.lm_head_weight, roll.completion_ids[s, :T].to(self.device),
                                    self.cfg.grpo.temperature, self.kernel_backend)
                out[s, :T] = lp.float().cpu()
        return out

    # ------------------------------------------------------------------------------------ checkpoints

    def _state(self, rng: dict | None = None, step: int | None = None) -> dict:
        return {
            "step": self.step_count if step is None else step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng or ckpt.rng_state(),
            "bad_steps": self.bad_steps,
            "bad_total": self._bad_total,
            "skipped_records": self.skipped_records,
            "data_cursor": self.data_cursor,
        }

    def save(self, rng: dict | None = None) -> Path | None:
        """Rank 0 writes the checkpoint (the adapter and optimizer are identical on every rank)."""
        if not self.dist.is_main:
            self.dist.barrier()
            return None
        if not self._weights_finite():  # never written: a checkpoint holds weights a resume can use
            raise TrainingStopped(self._diverged_message())
        path = ckpt.save_checkpoint(self.out, self.step_count, peft_model=self.lm.peft_model, state=self._state(rng),
                                    recipe_text=self.recipe_text, keep=self.cfg.log.keep_checkpoints, base=self.base_id)
        log.info("saved %s", path)
        self.dist.barrier()
        return path

    def _restore(self, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        adapter = path / "adapter"
        state = ckpt.load_state(path)
        try:
            weights = load_file(str(adapter / "adapter_model.safetensors"), device=str(self.device))
            result = set_peft_model_state_dict(self.lm.peft_model, weights)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"unexpected adapter keys {result.unexpected_keys[:3]}")
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            ckpt.set_rng_state(state["rng"])
            self.step_count = int(state["step"])
            self.bad_steps = int(state["bad_steps"])
        except (KeyError, ValueError, TypeError, RuntimeError, OSError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this run ({type(exc).__name__}: {first[:200]}); "
                                       "use a checkpoint of this recipe") from None
        self._bad_total = state.get("bad_total", 0)
        self.skipped_records = state.get("skipped_records", 0)
        self.data_cursor = int(state.get("data_cursor", self.step_count))  # before dynamic sampling: one batch a step
        lr = self.cfg.train.learning_rate
        if any(b != lr for b in self.scheduler.base_lrs):  # train.learning_rate changed on resume: applied from here
            log.warning("resuming with train.learning_rate %g (the checkpoint's run used %g)", lr, self.scheduler.base_lrs[0])
            self.scheduler.base_lrs = [lr for _ in self.optimizer.param_groups]
            for group, factor in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
                group["initial_lr"] = lr
                group["lr"] = lr * factor(self.scheduler.last_epoch)
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _weights_finite(self) -> bool:
        return bool(torch.stack([p.detach().isfinite().all() for p in self.params]).all())

    # ------------------------------------------------------------------------------------------ loop

    def _on_signal(self, signum, _frame) -> None:
        if self._interrupt is not None:  # a second signal: stop now
            self._stopped_by = signum
            raise KeyboardInterrupt
        self._interrupt = signum
        log.warning("%s received: saving a checkpoint and stopping (again to stop at once)", signal.Signals(signum).name)

    @property
    def stopped_at_once_by(self) -> signal.Signals | None:
        """The second signal that stopped ``train()`` at once (KeyboardInterrupt), if one did."""
        return None if self._stopped_by is None else signal.Signals(self._stopped_by)

    @property
    def interrupted_by(self) -> signal.Signals | None:
        """The signal (SIGINT/SIGTERM) that stopped ``train()`` early, if one did."""
        return None if self._interrupt is None else signal.Signals(self._interrupt)

    def close(self) -> None:
        """Close the logs and release the run folder's lock (``train()`` does this when it returns)."""
        for w in (self.metrics, self.samples, self.reporters):
            if w is not None:
                w.close()
        if self._release is not None:
            self._release()
        self.dist.close()

    def train(self, until_step: int | None = None) -> dict | None:
        """Run to the end, to ``until_step`` (then save) or to an interruption; returns the last step's metrics."""
        from tqdm.auto import tqdm

        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=self.total_steps, initial=self.step_count, desc="GRPO", dynamic_ncols=True,
                   disable=not (self.cfg.log.progress_bar and self.dist.is_main))
        last = None
        try:
            stop_at = self.total_steps if until_step is None else min(until_step, self.total_steps)
            while self.step_count < stop_at:
                rng_before, cursor_before = ckpt.rng_state(), self.data_cursor
                try:
                    m = self.step()
                except StepInterrupted:
                    # the interrupted step made no optimizer update: save the state from before it
                    self.optimizer.zero_grad(set_to_none=True)
                    self.data_cursor = cursor_before
                    self.save(rng=rng_before)
                    bar.write(f"interrupted: checkpoint of step {self.step_count} saved in {self.out}")
                    return last
                except torch.cuda.OutOfMemoryError as exc:
                    raise RuntimeError(self._oom_message()) from exc
                self._note_held_memory(m)  # the step's own tensors are gone now
                if self.metrics is not None:
                    self.metrics.write(m)
                if self.reporters is not None:
                    self.reporters.log(m)
                last = m
                bar.update(1)
                bar.set_postfix(reward=f"{m['reward']:.3f}", kl=f"{m['kl']:.4f}", len=f"{m['completion_length_mean']:.0f}")
                every = self.cfg.log.sample_every
                if every and (self.step_count % every == 0 or self.step_count == 1) and self.dist.is_main:
                    self._log_sample(bar)
                if self.bad_steps >= self.cfg.train.max_bad_steps:
                    raise TrainingStopped(
                        f"{self.bad_steps} steps in a row had a non-finite loss or gradient; stopping. The last good "
                        f"checkpoint in {self.out} is intact. Lower train.learning_rate or check the data."
                    )
                if self.step_count % self.cfg.log.save_steps == 0 or self.step_count == stop_at:
                    self.save()
                if self.dist.any(self._interrupt is not None):
                    if self.step_count % self.cfg.log.save_steps != 0 and self.step_count != stop_at:
                        self.save()
                    bar.write(f"interrupted: checkpoint of step {self.step_count} saved in {self.out}")
                    return last
        finally:
            bar.close()
            self.close()
            for s, h in old.items():
                signal.signal(s, h)
        if self.cfg.log.plot and self.step_count == self.total_steps and self.dist.is_main:
            from .plot import plot_metrics

            plot_metrics(self.out / "metrics.jsonl", self.out / "plots")
        if self.step_count == self.total_steps and self.dist.is_main:
            print(format_summary(run_summary(self.out)), flush=True)
        return last

    def _note_held_memory(self, m: dict) -> None:
        held = held_bytes(self.device)
        m["mem_held_gib"] = None if held is None else held / 2**30
        warning = self._held_watch.add(self.step_count, held)
        if warning and self.dist.is_main:
            log.warning(warning)

    def _log_sample(self, bar) -> None:
        texts, answers, rewards = self._last_texts
        rec = {"step": self.step_count, "answer": answers[0], "reward": rewards[0], "completion": texts[0]}
        self.samples.write(rec)
        if self.reporters is not None:
            self.reporters.sample(rec)
        bar.write(f"[step {self.step_count}] reward {rewards[0]:.1f} answer={answers[0]!r}: <think>{texts[0][:300]!r}")

    def _diverged_message(self, step: int | None = None) -> str:
        step = self.step_count if step is None else step
        return (f"the adapter's weights became non-finite (inf/nan) at step {step}: train.learning_rate "
                f"{self.cfg.train.learning_rate:g} is too large for this run; nothing was saved from it, the last good "
                f"checkpoint in {self.out} is intact (resume it with a lower train.learning_rate)")

    def _oom_message(self) -> str:
        from .planner import plan

        c = self.cfg
        try:
            table = "\nThe memory plan for this recipe:\n" + plan(c, self.lm.config).table()
        except Exception as exc:  # noqa: BLE001 -- the OOM message must not fail itself
            table = f"\n(memory plan unavailable: {exc})"
        return (
            "CUDA out of memory. Turn one of these down: train.micro_batch_size "
            f"({c.train.micro_batch_size}), grpo.num_generations ({c.grpo.num_generations}), grpo.max_completion_length "
            f"({c.grpo.max_completion_length}), data.max_pixels ({c.data.max_pixels}); or set model.quantization: nf4 / "
            "model.gradient_checkpointing: true." + table
        )

