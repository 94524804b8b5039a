"""The rollout's check: a fast backend (``engine``, or a named ``vllm``) against ``hf`` on 2 prompts of the
run's own data x G samples x a short length, seeded.

* greedy: the same token ids as ``hf``, up to ties (where they first differ, the trainer's log-probs of the two
  tokens must be within ``TIE_TOLERANCE``; what follows a tie legitimately diverges and is not compared);
* sampling (the recipe's temperature / top-k / top-p, per-prompt seeds, as in training): the sampling
  log-probs the backend reports against the trainer's own log-probs of the same tokens (mean over tokens
  within ``LOGPROB_BOUND``, or twice what ``hf`` itself shows, whichever is larger; the worst token within
  ``LOGPROB_MAX_BOUND`` or twice hf's worst, so a fault on a few tokens does not average out);
* distribution (``distribution.py``), ``hf`` included: what each backend draws, not what it reports: many draws
  of the next token at a few prefixes against the trainer's ``softmax(logits / T)`` with top-k / top-p (a wrong
  temperature, top-k or top-p fails; false-alarm rate ``distribution.FALSE_ALARM``);
* CUDA graphs: the engine's capture and replay run inside the sampling call (one graph per 128-step bucket);
  their count is recorded (on CPU the engine decodes eagerly unless given an emulation);
* speed: decode tokens per second of each backend over the same sampling call (wall time, capture included).
"""

from __future__ import annotations

import time

import torch

from ..inputs import build_sequences
from ..kernels.chunked_logprobs import chunked_logprobs_reference
from ..model import sequence_hidden
from ..rollout import SamplingParams, make_rollout
from . import distribution
from .head import _one_line
from .report import PathResult

# mean |sampling log-prob - trainer log-prob| per token a backend may show (bf16 rounding alone stays below
# 0.01; the trainer warns at 0.05)
LOGPROB_BOUND = {"float32": 1e-3, "bfloat16": 2e-2, "float16": 2e-2}
# the largest |sampling log-prob - trainer log-prob| one token may show, here and in the trainer's drift watcher.
# fp32: clean samplers stay below 1e-5 (tests/test_selfcheck_sampling.py); 16 bits: the engine's LM head writes
# logits in the model dtype, whose rounding moves a logit by up to |logit| x 2^-9 (0.08 at 40) and the log-prob by
# twice that with the log-sum-exp, plus the decode path's own rounding through the layers: 0.5 leaves ~3x (the
# tiny model in bf16 on CPU: 3.9e-2 over 2,763 engine tokens, its logits within +-6). Derived, not measured on a GPU
LOGPROB_MAX_BOUND = {"float32": 5e-2, "bfloat16": 0.5, "float16": 0.5}
# a greedy token that differs from hf's is a tie when the trainer's log-probs of the two are this close
TIE_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.1}
SEEDS = (1234, 4321)
# rows of fp32 [rows, V] logits the trainer-side log-probs hold at a time (0.3 GiB at V = 151,936: within the plan)
LOGPROB_CHUNK = 256


def check_length(max_completion_length: int, device: torch.device) -> int:
    """Tokens per completion the check decodes: 64 on a GPU (one bucket: one graph captured, 62 replays), 12 on CPU."""
    return max(1, min(max_completion_length, 64 if torch.device(device).type == "cuda" else 12))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def trainer_logprobs(lm, prompts, embeds, roll, temperature: float) -> torch.Tensor:
    """The trainer's log-probs [rows, T] (float32, CPU, 0 off the mask) of a rollout's tokens: the training
    forward (``sequence_hidden``) and the torch reference head."""
    seqs = build_sequences(prompts, roll.prompt_rows, roll.completion_ids, roll.completion_mask, lm.pad_token_id).to(lm.device)
    hidden = sequence_hidden(lm, seqs, embeds)
    R, T, H = hidden.shape
    lp = chunked_logprobs_reference(hidden.reshape(R * T, H), lm.lm_head_weight, roll.completion_ids.to(lm.device).reshape(-1),
                                    temperature, chunk_size=LOGPROB_CHUNK).view(R, T)
    return lp.float().cpu() * roll.completion_mask


@torch.no_grad()
def _vocab_logprobs(lm, prompts, embeds, roll, rows: list[int], positions: list[int]) -> torch.Tensor:
    """Full-vocabulary log-probs [len(rows), V] at completion position ``positions[i]`` of row ``rows[i]``."""
    ids, mask = roll.completion_ids[rows], roll.completion_mask[rows]
    seqs = build_sequences(prompts, [roll.prompt_rows[r] for r in rows], ids, mask, lm.pad_token_id).to(lm.device)
    hidden = sequence_hidden(lm, seqs, embeds)
    h = hidden[torch.arange(len(rows), device=hidden.device), torch.tensor(positions, device=hidden.device)]
    return torch.log_softmax(h.float() @ lm.lm_head_weight.float().T, dim=-1).cpu()


def compare_greedy(lm, prompts, embeds, ref, got, tie_tol: float) -> tuple[bool, str, dict]:
    """Row by row, the first token where ``got`` differs from ``ref``; a tie there is agreement."""
    firsts = []
    for r in range(ref.completion_ids.shape[0]):
        a = ref.completion_ids[r, : int(ref.completion_mask[r].sum())]
        b = got.completion_ids[r, : int(got.completion_mask[r].sum())]
        n = min(len(a), len(b))
        diff = (a[:n] != b[:n]).nonzero()
        if len(diff):
            t = int(diff[0])
            firsts.append((r, t, int(a[t]), int(b[t])))
        elif len(a) != len(b):  # one stopped where the other went on, with the same tokens so far: not a tie
            firsts.append((r, min(n, len(a) - 1), int(a[min(n, len(a) - 1)]), -1))
    rows = ref.completion_ids.shape[0]
    if not firsts:
        return True, f"{rows}/{rows} rows identical", {"rows": rows, "differ": 0, "ties": 0}
    lp = _vocab_logprobs(lm, prompts, embeds, ref, [f[0] for f in firsts], [f[1] for f in firsts])
    gaps = [abs(float(lp[i, a]) - float(lp[i, b])) if b >= 0 else float("inf") for i, (_, _, a, b) in enumerate(firsts)]
    worst = max(range(len(firsts)), key=lambda i: gaps[i])
    r, t, a, b = firsts[worst]
    ties = sum(g <= tie_tol for g in gaps)
    figures = {"rows": rows, "differ": len(firsts), "ties": ties, "largest_gap": gaps[worst]}
    if ties == len(firsts):
        return True, f"{rows - len(firsts)}/{rows} rows identical, {ties} differ at a tie (log-prob gap <= {tie_tol:g})", figures
    return False, (f"greedy tokens differ from hf: row {r}, token {t}: {b} instead of {a}, log-prob gap {gaps[worst]:.3g} "
                   f"> {tie_tol:g} (not a tie)"), figures


class _CountingGraphs:
    """Wraps a backend's ``graphs`` (engine.CudaGraphs or the tests' emulation) to count captures and replays."""

    def __init__(self, inner):
        self.inner = inner
        self.captures = 0
        self.replays = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def capture(self, step, generators, pool):
        graph = self.inner.capture(step, generators, pool)
        self.captures += 1
        counter = self

        class Counted:
            def replay(self_inner):
                counter.replays += 1
                graph.replay()

        return Counted()


def _timed_generate(backend, prompts, embeds, params, device):
    _sync(device)
    t0 = time.perf_counter()
    roll = backend.generate(prompts, embeds, params)
    _sync(device)
    return roll, time.perf_counter() - t0


def _logprob_figures(lm, prompts, embeds, roll, temperature) -> tuple[float | None, float | None]:
    if roll.sampling_logprobs is None:
        return None, None
    trainer = trainer_logprobs(lm, prompts, embeds, roll, temperature)
    mask = roll.completion_mask.bool()
    diff = (roll.sampling_logprobs.float().cpu() - trainer).abs()[mask]
    if diff.numel() == 0:
        return 0.0, 0.0
    return float(diff.mean()), float(diff.max())


def check_rollout(lm, prompts, embeds, candidates: list[str], *, num_generations: int, length: int, temperature: float,
                  top_p: float = 1.0, top_k: int = 0, make=None) -> tuple[list[PathResult], dict]:
    """``hf`` (the reference) and each backend in ``candidates``; returns the PathResults (reference first) and
    the backend objects that were built ({name: backend}), so the one chosen is the one that was checked."""
    make = make or make_rollout  # looked up at call time: tests put a faulty backend there
    device = lm.device
    dtype_name = str(lm.lm_head_weight.dtype).replace("torch.", "")
    greedy = SamplingParams(1, length, greedy=True)
    sample = SamplingParams(num_generations, length, temperature, top_p, top_k, seeds=list(SEEDS[: len(prompts)]))
    common = {"prompts": len(prompts), "samples": num_generations, "length": length, "dtype": dtype_name}
    built: dict = {}
    ref = PathResult("rollout", "hf", reference=True, figures=dict(common))
    try:
        built["hf"] = hf = make("hf", lm)
        ref_greedy = hf.generate(prompts, embeds, greedy)
        roll, seconds = _timed_generate(hf, prompts, embeds, sample, device)
        tokens = float(roll.completion_mask.sum())
        mean, largest = _logprob_figures(lm, prompts, embeds, roll, temperature)
        ref.ok, ref.cost = True, seconds / max(tokens, 1.0)
        ref.figures.update(tokens_per_s=tokens / max(seconds, 1e-9), logprob_diff_mean=mean, logprob_diff_max=largest)
    except Exception as exc:  # noqa: BLE001
        ref.ok, ref.reason = False, f"raised {type(exc).__name__}: {_one_line(exc)}"
        return [ref] + [PathResult("rollout", c, ok=None, reason="the hf reference itself failed: " + ref.reason)
                        for c in candidates], built
    try:
        positions = distribution.pick_positions(lm, prompts, embeds, ref_greedy, temperature, top_k, top_p, dtype_name)
        drawn = distribution.check_sampler(hf, lm, prompts, embeds, positions, sample, dtype_name)
    except Exception as exc:  # noqa: BLE001
        ref.ok, ref.reason = False, f"distribution check raised {type(exc).__name__}: {_one_line(exc)}"
        return [ref] + [PathResult("rollout", c, ok=None, reason="the hf reference itself failed: " + ref.reason)
                        for c in candidates], built
    ref.figures.update(distribution=distribution.describe(drawn), distribution_positions=drawn.figures["positions"])
    if not drawn.ok:
        ref.ok, ref.reason = False, "sampling distribution differs from the trainer's: " + "; ".join(drawn.problems)
    bound = max(LOGPROB_BOUND.get(dtype_name, 2e-2), 2 * (ref.figures["logprob_diff_mean"] or 0.0))
    max_bound = max(LOGPROB_MAX_BOUND.get(dtype_name, 0.5), 2 * (ref.figures["logprob_diff_max"] or 0.0))
    results = [ref]
    for name in candidates:
        p = PathResult("rollout", name, figures={**common, "logprob_bound": bound})
        counting = None
        try:
            built[name] = backend = make(name, lm)
            if getattr(backend, "graphs", None) is not None:
                counting = backend.graphs = _CountingGraphs(backend.graphs)
            got_greedy = backend.generate(prompts, embeds, greedy)
            agree, greedy_text, greedy_fig = compare_greedy(lm, prompts, embeds, ref_greedy, got_greedy,
                                                            TIE_TOLERANCE.get(dtype_name, 0.1))
            roll, seconds = _timed_generate(backend, prompts, embeds, sample, device)
            tokens = float(roll.completion_mask.sum())
            mean, largest = _logprob_figures(lm, prompts, embeds, roll, temperature)
        except Exception as exc:  # noqa: BLE001 -- capture failures, kernel errors...: a verdict
            p.ok, p.reason = False, f"raised {type(exc).__name__}: {_one_line(exc)}"
            results.append(p)
            continue
        finally:
            if counting is not None:
                built[name].graphs = counting.inner
        try:  # after the counted calls: its own generate calls capture graphs too
            drawn = distribution.check_sampler(backend, lm, prompts, embeds, positions, sample, dtype_name)
        except Exception as exc:  # noqa: BLE001
            p.ok, p.reason = False, f"distribution check raised {type(exc).__name__}: {_one_line(exc)}"
            results.append(p)
            continue
        p.cost = seconds / max(tokens, 1.0)
        p.figures.update(tokens_per_s=tokens / max(seconds, 1e-9), greedy=greedy_text, greedy_rows=greedy_fig,
                         logprob_diff_mean=mean, logprob_diff_max=largest, logprob_max_bound=max_bound,
                         distribution=distribution.describe(drawn), distribution_positions=drawn.figures["positions"])
        if counting is not None:
            p.figures["graphs"] = f"{counting.captures} graph(s) captured, {counting.replays} replays"
            p.figures["captures"], p.figures["replays"] = counting.captures, counting.replays
        elif name == "engine":
            p.figures["graphs"] = "eager decode (no CUDA graphs on this device)"
        problems = []
        if not agree:
            problems.append(greedy_text)
        if mean is None:
            p.figures["logprob_note"] = "the backend reports no sampling log-probs: not compared"
        elif not mean <= bound:
            problems.append(f"sampling log-probs differ from the trainer's by {mean:.3g} per token on average "
                            f"(max {largest:.3g}) > {bound:.0e}")
        elif not largest <= max_bound:
            problems.append(f"sampling log-probs differ from the trainer's by {largest:.3g} on the worst token > {max_bound:g} "
                            f"(mean {mean:.3g})")
        if not drawn.ok:
            problems.append("sampling distribution differs from the trainer's: " + "; ".join(drawn.problems))
        if counting is not None and length - 1 > 2 and counting.captures == 0:
            problems.append("no CUDA graph was captured")
        p.ok = not problems
        p.reason = "; ".join(problems)
        results.append(p)
    return results, built
