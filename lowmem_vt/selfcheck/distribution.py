"""The rollout's distribution check: what a sampler draws, not only what it reports.

Comparing the log-probs a backend reports with the trainer's cannot see a sampler that draws from another
distribution than the one it reports (an engine sampling at temperature 0.8 while reporting temperature-1.0
log-probs passes that comparison, issue 26). Here, at a few fixed prefixes (a check prompt + the first j tokens
of hf's greedy completion), each backend draws ``DRAWS`` next tokens through its own sampling path, and the
counts are judged against the target the trainer defines: ``softmax(logits / T)`` of the policy's own forward
(``model.sequence_hidden`` and the LM head in fp32), restricted to the top-k / top-p support and renormalised
(``sampling_target``, a float64 reference written apart from the samplers' code).

Backends drawn through ``generate`` (engine, vLLM) decode ``DECODE_STEPS`` tokens per row, so the engine's decode
step samples too (a CUDA graph's replay on a GPU): their second tokens, grouped by the first, are judged the same
way against the policy's distribution after each first token (``judge_groups``).

Per position and token, three tests:

* support: a draw clearly outside the top-k / top-p support fails (probability 0 under the target; "clearly":
  beyond the logit rounding of the run's dtype, ``LOGIT_SLACK``, so a token at the cut that rounding can move in
  or out is never counted against a sampler);
* Pearson's chi-square over the tokens expected at least ``MIN_EXPECTED`` (10) times (the rest, and the tokens at the
  cut, pooled in one "other" cell): any change of shape;
* temperature: the draws' mean log-prob under ``softmax(logits / T)`` against its target mean, as a z-score (the
  score test for a temperature change: a colder sampler draws likely tokens too often, z > 0; a hotter one, or a
  sampler ignoring top-k / top-p, z < 0).

False alarms: the chi-square and temperature tests (first and second token) each run at ``FALSE_ALARM /
(TESTS_PER_POSITION x positions)`` (Bonferroni), so a correct sampler fails the whole check with probability at
most ``FALSE_ALARM`` = 1e-4 (the support test cannot fail it). The seeds are fixed, so one machine's verdict repeats; ``tests/test_selfcheck_sampling.py``
measures the rate over many seeds (the p-values of a correct sampler are uniform) and the power: with
``DRAWS`` = 2048 per position, temperature x0.8 or x1.25, top-k ignored or off by 3, top-p ignored all fail.
Each position's figures state the power against a colder sampler (T x0.8) at that position: how far its
temperature z would move, against the threshold.

Draws go through each backend's own sampling path: the engine and vLLM through ``generate`` on copies of the
prefix as prompts (``SAMPLES_PER_PROMPT`` rows each); ``hf`` through ``HFRollout.draw_next`` (generate's own
warpers and multinomial on the policy's logits at the prefix: n prefills of the prompt would cost far more).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..inputs import PromptInputs, build_sequences
from ..model import sequence_hidden
from ..rollout import SamplingParams

# a correct sampler fails the whole check (every position and test) with at most this probability
FALSE_ALARM = 1e-4
# draws of the next token per position: temperature x0.8 shifts the temperature z by ~0.25 x sqrt(DRAWS x
# varentropy), 11 at a varentropy of 1 nat^2, against a threshold of ~4.3
DRAWS = 2048
# a chi-square cell needs this many expected draws. The textbook 5 is for p-values near 0.05; at the check's
# 1.25e-5 Pearson's statistic over cells of 5-10 has a heavier tail than the chi-square: a correct engine's second
# tokens gave p 1.9e-6 with cells >= 5, 8.7e-4 with cells >= 10, 0.09 with >= 20, on the same draws. 20 would
# halve the power against a top-k 3 too small (99 -> 48 of 100 seeds), so 10
MIN_EXPECTED = 10.0
# logits a sampler may see differently from the trainer by rounding (the engine's LM head writes the model dtype):
# a token within this of the top-k / top-p cut is neither required nor forbidden
LOGIT_SLACK = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.1}
# the alternative each position's power figure is stated for
COLDER = 0.8
SEED = 2026_1126
# rows of [rows, V] float32 sampling buffers one draw call holds (~1 GiB at V = 151,936 with top-p)
BUFFER_BYTES = 2**30
# tokens each generate call of the check decodes: the second comes from the engine's decode step, and with 4 its
# 3 decode steps are captured as a CUDA graph on a GPU (the engine captures a bucket of more than 2 steps)
DECODE_STEPS = 4
# samples per prompt copy in the check's generate calls (the engine attends over a prompt's samples x 128 slots)
SAMPLES_PER_PROMPT = 64
# the second token is judged given the first: for the most frequent first tokens, drawn at least this often
DECODE_GROUPS, GROUP_MIN = 8, 64
# chi-square and temperature, on the first token and on the second: Bonferroni over these x positions
TESTS_PER_POSITION = 4


@dataclass
class Target:
    """The distribution a sampler must draw from at one position, and the sets that judge its draws. [V] each."""

    probs: torch.Tensor  # float64: softmax(logits / T) on the support, renormalised
    logprobs: torch.Tensor  # float64: log softmax(logits / T), untruncated (the temperature test's score)
    allowed: torch.Tensor  # bool: the support, widened by the rounding slack (a draw outside fails)
    inside: torch.Tensor  # bool: the support, narrowed by the slack (tokens that may have a cell of their own)


def _mass_above(values: torch.Tensor, probs: torch.Tensor, threshold: torch.Tensor, inclusive: bool = False) -> torch.Tensor:
    """For each threshold t, the mass of tokens whose value is > t (>= t when ``inclusive``). values, probs,
    threshold [V]."""
    order = values.argsort(descending=True)
    cum = torch.cat([probs.new_zeros(1), probs[order].cumsum(0)])
    ascending = values[order].flip(0)
    greater = values.numel() - torch.searchsorted(ascending, threshold, right=not inclusive)
    return cum[greater]


def sampling_target(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                    slack: float = 0.0) -> Target:
    """The target of one position from the policy's logits [V] (any float dtype): temperature, then top-k (the k
    largest scaled logits, ties at the k-th kept), then top-p (the most likely tokens of what top-k kept until their
    mass reaches top_p: a token stays while the mass strictly above it is < top_p), as HF's warpers and
    ``rollout.sampling.sample_tokens`` define them. ``slack``: logit rounding allowance (before the temperature)."""
    scaled = logits.double() / temperature
    s = slack / temperature
    V = scaled.numel()
    exact = torch.ones(V, dtype=torch.bool, device=scaled.device)
    wide, narrow = exact.clone(), exact.clone()
    if 0 < top_k < V:
        kth = torch.topk(scaled, top_k).values[-1]
        exact, wide, narrow = scaled >= kth, scaled >= kth - s, scaled >= kth + s
    if top_p < 1.0:
        kept = torch.where(exact, scaled, float("-inf")).softmax(0)
        above = _mass_above(scaled, kept, scaled)
        exact = exact & (above < top_p)
        # a logit moved by s changes each probability by at most a factor e^(2s): the cut moves by ~2s of mass
        margin = 4 * s
        wide = wide & (_mass_above(scaled, kept, scaled + s) < top_p + margin)
        narrow = narrow & (_mass_above(scaled, kept, scaled - s, inclusive=True) - kept < top_p - margin)
    probs = torch.where(exact, scaled, float("-inf")).softmax(0)
    return Target(probs, torch.log_softmax(scaled, 0), wide | exact, narrow & exact)


def _chi2_sf(x: float, df: int) -> float:
    """P(chi-square with ``df`` degrees of freedom > x)."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2, dtype=torch.float64)))


def _z_threshold(alpha: float) -> float:
    """Two-sided: |z| above it with probability alpha under the null."""
    return float(-torch.special.ndtri(torch.tensor(alpha / 2, dtype=torch.float64)))


@dataclass
class Judgement:
    ok: bool
    problems: list[str]
    figures: dict


def _cells(counts: torch.Tensor, n: int, target: Target) -> tuple[list[float], list[float]]:
    """Observed and expected counts of the chi-square's cells: each token of the narrowed support expected at
    least MIN_EXPECTED times, then one cell for the rest (pooled with the smallest cell when it expects less)."""
    expected = n * target.probs.cpu()
    cells = target.inside.cpu() & (expected >= MIN_EXPECTED)
    observed, wanted = counts[cells].tolist(), expected[cells].tolist()
    other_o, other_e = n - sum(observed), max(n - sum(wanted), 0.0)
    if other_e >= MIN_EXPECTED or not wanted:
        observed.append(other_o)
        wanted.append(other_e)
    else:
        i = int(np.argmin(wanted))
        observed[i] += other_o
        wanted[i] += other_e
    return observed, wanted


def judge_groups(groups: list[tuple[torch.Tensor, Target]], alpha: float) -> Judgement:
    """Independent groups of draws, each [n_g] long from its own ``Target``, judged together: the support of each,
    one chi-square summed over the groups (degrees of freedom added) and one temperature z over all draws; each
    statistical test at ``alpha``."""
    chi2, df, score, var_total, colder, n_total, outside, worst = 0.0, 0, 0.0, 0.0, 0.0, 0, 0, None
    for draws, target in groups:
        draws = draws.cpu().long()
        n = draws.numel()
        if n == 0:
            continue
        q, lp = target.probs.cpu(), target.logprobs.cpu()
        counts = torch.bincount(draws, minlength=q.numel()).double()
        off = torch.where(target.allowed.cpu(), 0.0, counts)
        if off.sum() > 0:
            outside += int(off.sum())
            worst = worst or (int(off.argmax()), int(off.max()))
        observed, wanted = _cells(counts, n, target)
        if len(wanted) > 1:
            chi2 += sum((o - e) ** 2 / e for o, e in zip(observed, wanted))
            df += len(wanted) - 1
        live_lp = torch.where(q > 0, lp, 0.0)
        mean = float((q * live_lp).sum())
        var = float((q * (live_lp - mean) ** 2).sum())
        score += float(lp[draws].sum()) - n * mean
        var_total += n * var
        colder += n * math.sqrt(var) * _colder_shift(target)
        n_total += n
    p_chi2 = _chi2_sf(chi2, df) if df > 0 else 1.0
    z = score / math.sqrt(var_total) if var_total > 1e-12 else 0.0
    z_max = _z_threshold(alpha)
    # the power figure: the mean z a sampler at COLDER x the temperature would give on these draws
    colder_z = colder / math.sqrt(var_total) if var_total > 1e-12 else 0.0
    figures = {"draws": n_total, "outside_support": outside, "chi2": round(chi2, 2), "df": df, "p_chi2": p_chi2,
               "temperature_z": round(z, 2), "z_threshold": round(z_max, 2), "colder_z": round(colder_z, 1)}
    problems = []
    if outside:
        problems.append(f"{outside} of {n_total} draws outside the top-k/top-p support (token {worst[0]} {worst[1]} times)")
    if p_chi2 < alpha:
        problems.append(f"counts differ from the target: chi-square {chi2:.1f} on {df} degrees of freedom, p {p_chi2:.1e} < {alpha:.1e}")
    if abs(z) > z_max:
        problems.append(f"draws {'favour likely' if z > 0 else 'favour unlikely'} tokens: temperature z {z:+.1f} "
                        f"(|z| <= {z_max:.1f}): sampled {'colder' if z > 0 else 'hotter or wider'} than the target")
    return Judgement(not problems, problems, figures)


def judge_draws(draws: torch.Tensor, target: Target, alpha: float) -> Judgement:
    """Draws [n] long of one position against ``target``; each of the two statistical tests at ``alpha``."""
    return judge_groups([(draws, target)], alpha)


@dataclass
class Position:
    """One prefix the check draws at: check prompt ``prompt`` followed by ``prefix`` (hf's greedy tokens)."""

    prompt: int
    prefix: list[int]
    logits: torch.Tensor  # [V] float32, the policy's (CPU)
    target: Target


def extend_prompt(prompt: PromptInputs, tokens: list[int]) -> PromptInputs:
    """``prompt`` followed by text ``tokens`` (already decoded), as a prompt: the next token is what follows them."""
    if not tokens:
        return prompt
    t = torch.tensor(tokens, dtype=torch.long)
    steps = prompt.next_position + torch.arange(len(tokens), dtype=torch.long)
    return dataclasses.replace(
        prompt, input_ids=torch.cat([prompt.input_ids, t]),
        mm_token_type_ids=torch.cat([prompt.mm_token_type_ids, torch.zeros(len(tokens), dtype=prompt.mm_token_type_ids.dtype)]),
        position_ids=torch.cat([prompt.position_ids, steps.expand(3, -1)], dim=1), next_position=prompt.next_position + len(tokens))


@torch.no_grad()
def pick_positions(lm, prompts, embeds, greedy, temperature: float, top_k: int, top_p: float, dtype: str) -> list[Position]:
    """Per check prompt, the prefix (prompt + the first j tokens of hf's greedy completion ``greedy``, j >= 1 where the
    completion allows) where a colder sampler would show most: one forward of the greedy rows gives the policy's
    logits at every j. Chosen from the policy's distribution alone, so the choice does not bias the tests."""
    T = greedy.completion_ids.shape[1]
    seqs = build_sequences(prompts, greedy.prompt_rows, greedy.completion_ids, torch.ones_like(greedy.completion_mask),
                           lm.pad_token_id).to(lm.device)
    hidden = sequence_hidden(lm, seqs, embeds)  # [rows, T, H]: position j predicts token j after the first j
    slack = LOGIT_SLACK.get(dtype, 0.1)
    positions = []
    for r in range(greedy.completion_ids.shape[0]):
        ids = greedy.completion_ids[r].tolist()
        length = int(greedy.completion_mask[r].sum())
        logits = (hidden[r, : max(length, 1)].float() @ lm.lm_head_weight.float().T).cpu()
        best = None
        for j in range(min(length, T)):
            target = sampling_target(logits[j], temperature, top_k, top_p, slack)
            key = (j >= 1 or length == 1, _colder_shift(target))
            if best is None or key > best[0]:
                best = (key, Position(greedy.prompt_rows[r], ids[:j], logits[j], target))
        if best is not None:
            positions.append(best[1])
    return positions


def _colder_shift(target: Target) -> float:
    """Per-draw mean shift of the temperature score (in standard deviations) a sampler at COLDER x T gives."""
    q = target.probs
    live = q > 0
    lp = torch.where(live, target.logprobs, 0.0)
    mean = float((q * lp).sum())
    var = float((q * (lp - mean) ** 2 * live).sum())
    if var <= 1e-12:
        return 0.0
    colder = torch.where(live, target.logprobs / COLDER, float("-inf")).softmax(0)
    return (float((colder * lp).sum()) - mean) / math.sqrt(var)


@torch.no_grad()
def _next_logits(lm, prompts, embeds, prompt: int, sequences: list[list[int]]) -> torch.Tensor:
    """The policy's logits [len(sequences), V] (float32, CPU) of the token after prompt ``prompt`` + each sequence
    (all of one length m): the trainer's forward over rows of m + 1 tokens, read where token m is predicted."""
    m = len(sequences[0])
    ids = torch.tensor([seq + [lm.pad_token_id] for seq in sequences], dtype=torch.long)
    seqs = build_sequences(prompts, [prompt] * len(sequences), ids, torch.ones(ids.shape), lm.pad_token_id).to(lm.device)
    hidden = sequence_hidden(lm, seqs, embeds)[:, m]
    return (hidden.float() @ lm.lm_head_weight.float().T).cpu()


def _draw(backend, prompts, embeds, position: Position, params: SamplingParams, seed: int):
    """DRAWS next tokens at ``position`` through ``backend``'s own sampling, in calls of bounded memory: (first [n]
    long, second [n] long or None). ``second``: for backends drawn through ``generate``, the token each row sampled
    after its first, from the engine's decode step (a CUDA graph's replay on a GPU), -1 where the row had ended."""
    V = position.logits.numel()
    rows = int(min(DRAWS, max(SAMPLES_PER_PROMPT, BUFFER_BYTES // (V * 32))))
    first, second = [], []
    if hasattr(backend, "draw_next"):  # hf: generate's sampling on the policy's logits at the prefix
        for c, start in enumerate(range(0, DRAWS, rows)):
            call = SamplingParams(min(rows, DRAWS - start), 1, params.temperature, params.top_p, params.top_k)
            first.append(backend.draw_next(position.logits, call, seed + c))
        return torch.cat(first), None
    # engine, vllm: generate on copies of the prefix as prompts, SAMPLES_PER_PROMPT samples each (the engine's
    # decode attention grows with the square of a prompt's samples); DECODE_STEPS tokens, so that the engine's
    # decode step runs as in training (captured as a CUDA graph on a GPU)
    prompt, feats = extend_prompt(prompts[position.prompt], position.prefix), embeds[position.prompt]
    copies = max(1, rows // SAMPLES_PER_PROMPT)
    for c, start in enumerate(range(0, DRAWS, copies * SAMPLES_PER_PROMPT)):
        k = math.ceil(min(copies * SAMPLES_PER_PROMPT, DRAWS - start) / SAMPLES_PER_PROMPT)
        call = SamplingParams(SAMPLES_PER_PROMPT, DECODE_STEPS, params.temperature, params.top_p, params.top_k,
                              seeds=[seed + 1009 * c + i for i in range(k)])
        roll = backend.generate([prompt] * k, [feats] * k, call)
        ids, mask = roll.completion_ids.cpu(), roll.completion_mask.cpu()
        first.append(ids[:, 0])
        second.append(torch.where(mask[:, 1] > 0, ids[:, 1], -1) if ids.shape[1] > 1 else torch.full_like(ids[:, 0], -1))
    return torch.cat(first)[:DRAWS], torch.cat(second)[:DRAWS]


def _second_groups(lm, prompts, embeds, position: Position, first, second, temperature, top_k, top_p, slack):
    """(draws, target) of the second token for the DECODE_GROUPS most frequent first tokens drawn at least
    GROUP_MIN times: given its first token, a row's second is a draw from the policy's distribution after it."""
    valid = second >= 0
    tokens, counts = first[valid].unique(return_counts=True)
    chosen = [int(t) for t, c in sorted(zip(tokens.tolist(), counts.tolist()), key=lambda x: -x[1])
              if c >= GROUP_MIN][:DECODE_GROUPS]
    if not chosen:
        return []
    logits = _next_logits(lm, prompts, embeds, position.prompt, [position.prefix + [t] for t in chosen])
    return [(second[valid & (first == t)], sampling_target(logits[i], temperature, top_k, top_p, slack))
            for i, t in enumerate(chosen)]


def check_sampler(backend, lm, prompts, embeds, positions: list[Position], params: SamplingParams, dtype: str) -> Judgement:
    """``backend``'s draws at every position against their targets; one Judgement (problems name the position and
    the step: the first token after the prefix, or the second, drawn by the engine's decode step)."""
    alpha = FALSE_ALARM / (TESTS_PER_POSITION * max(len(positions), 1))
    slack = LOGIT_SLACK.get(dtype, 0.1)
    problems, per_position = [], []
    for i, pos in enumerate(positions):
        first, second = _draw(backend, prompts, embeds, pos, params, SEED + 1000 * i)
        judged = [("first", judge_draws(first, pos.target, alpha))]
        if second is not None:
            groups = _second_groups(lm, prompts, embeds, pos, first, second, params.temperature, params.top_k,
                                    params.top_p, slack)
            if groups:
                judged.append(("second", judge_groups(groups, alpha)))
        for step, j in judged:
            per_position.append({"prompt": pos.prompt, "prefix_tokens": len(pos.prefix), "token": step, **j.figures})
            problems += [f"prompt {pos.prompt} + {len(pos.prefix)} tokens, {step} token: {p}" for p in j.problems]
    figures = {"positions": per_position, "false_alarm": FALSE_ALARM, "alpha_per_test": alpha}
    return Judgement(not problems, problems, figures)


def describe(j: Judgement) -> str:
    """One line for the table: draws, the worst p and z, and the power against a colder sampler."""
    firsts = [p for p in j.figures["positions"] if p["token"] == "first"]
    seconds = [p for p in j.figures["positions"] if p["token"] == "second"]
    if not firsts:
        return "distribution: no position to check"
    every = firsts + seconds
    then = f" + {sum(p['draws'] for p in seconds)} second tokens given the first" if seconds else ""
    return (f"distribution: {len(firsts)} positions x {firsts[0]['draws']} draws{then}, chi-square p >= "
            f"{min(p['p_chi2'] for p in every):.2g}, |temperature z| <= {max(abs(p['temperature_z']) for p in every):.1f} "
            f"(threshold {firsts[0]['z_threshold']:.1f}; T x{COLDER} would give >= {min(p['colder_z'] for p in firsts):.1f}), "
            f"{sum(p['outside_support'] for p in every)} outside the support")
