"""The self-check: before step 1, every fast path the recipe would use is measured against its reference on
this machine, on the run's own dtype and shapes; the ones that pass and are faster are used, the others fall
back with a reason. ``lowmem-vt doctor`` runs the same checks standalone.

Groups (each a module here):

* ``kernels`` (``head.py``): each Triton loss head against the float64 head on the same inputs (log-probs, loss, KL,
  dh, dW; every error within 3x the torch reference's own error, ``compare.py``; five cases); forward / backward
  timed apart; 3 repeats bit-identical;
  peak extra memory);
* ``rollout`` (``rollout.py``): ``engine`` (or a named ``vllm``) against ``hf`` on 2 prompts of the run's data
  x G samples x a short length: greedy ids, sampling log-probs against the trainer's (mean and worst token), what
  each sampler draws against the trainer's softmax(logits / T) with top-k / top-p (``distribution.py``), CUDA-graph capture and
  replay, tokens/s;
* ``levers`` (``levers.py``): the offload round trips, an NF4 linear against its dequantized weight, finite
  fp16 logits.

Decisions (``report.decide``): ``kernels: auto`` and ``rollout.backend: auto`` take the fastest path that passes;
a path that raises, disagrees or is slower than its reference is not used (one warning each: the measured error
or the exception, and what runs instead). An explicitly named backend that fails stops the run before step 1
(``SelfCheckError``, exit status 2) unless ``selfcheck: warn``; ``selfcheck: off`` checks nothing (a warning;
auto then means the references). Verdicts are cached per machine (``env.py``); ``force`` re-measures. Each run
writes ``selfcheck.json`` into its output folder and prints a short table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..preflight import PreflightError
from . import env, head, levers, rollout
from .report import GROUP_KEYS, REFERENCES, Decision, GroupResult, PathResult, decide, format_table

log = logging.getLogger(__name__)

__all__ = ["GroupResult", "PathResult", "SelfCheck", "SelfCheckError", "decide", "format_table", "run_selfcheck"]


class SelfCheckError(PreflightError):
    """A path the recipe names failed its self-check (or cannot run): one line naming the key, the measured
    error and what to choose instead. The CLI prints it and exits with status 2."""


@dataclass
class SelfCheck:
    """What the self-check decided, and everything it measured (``report`` is selfcheck.json)."""

    kernels: str  # the loss head backend to run
    rollout: str  # the rollout backend to run
    rollout_backend: object | None = None  # the checked backend object when it can be reused
    groups: list[GroupResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def cache_hits(self) -> list[str]:
        return [g.group for g in self.groups if g.cached]

    @property
    def measured(self) -> list[str]:
        return [g.group for g in self.groups if not g.cached and g.seconds > 0]


@contextlib.contextmanager
def preserved_rng():
    """The checks draw random numbers (sampling, inputs); the run's RNG streams must not notice."""
    from ..checkpoint import rng_state, set_rng_state

    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def _encode_prompts(lm, examples, inputs, n: int = 2):
    """The first ``n`` examples of the run's data that encode, and their image features (one vision call)."""
    from ..model import image_embeddings

    prompts = []
    for ex in list(examples)[: 8 * n]:
        try:
            prompts.append(inputs.encode(ex.image, ex.question))
        except Exception:  # noqa: BLE001 -- a record the trainer would skip
            continue
        if len(prompts) == n:
            break
    if not prompts:
        return [], []
    return prompts, image_embeddings(lm, [p.pixel_values for p in prompts], [p.image_grid_thw for p in prompts])


class _Runner:
    """Runs (or reads from the cache) each group for one recipe on one loaded model."""

    def __init__(self, cfg, lm, examples, inputs, force: bool):
        self.cfg, self.lm, self.examples, self.inputs, self.force = cfg, lm, examples, inputs, force
        self.device = lm.device
        # every group's verdicts depend on the machine, our code and the model's weights (the heads are checked on
        # its own head, the rollout on its layers)
        self.env = {**env.environment(self.device), "model": env.model_identity(cfg.model.name_or_path)}
        self._prompts = None
        self.built: dict = {}

    def prompts(self):
        if self._prompts is None:
            self._prompts = _encode_prompts(self.lm, self.examples, self.inputs) if self.inputs is not None else ([], [])
        return self._prompts

    def cached_or_measure(self, group: GroupResult, key: dict, measure) -> GroupResult:
        """The group's verdicts from the cache under ``key`` (plus the environment), or measured now and stored.

        Correctness verdicts are always kept. Speeds are kept only when measured on a quiet machine
        (``env.busy_reason``); an entry without speeds is reused where no speed decides (a named path, or ``auto``
        with no fast path passing) and measured again where ``auto`` must rank passing paths by speed."""
        group.key = {**self.env, **key}
        stored = None if self.force else env.cache_load(group.group, group.key)
        if stored is not None:
            paths = [PathResult.from_dict(p) for p in stored["paths"]]
            if stored["speeds_kept"] or not _speed_decides(group.requested, paths):
                group.paths, group.notes, group.cached = paths, list(stored.get("notes", [])), True
                return group
        before = env.machine_load(self.device)
        t0 = time.perf_counter()
        group.paths = measure()
        group.seconds = time.perf_counter() - t0
        after = env.machine_load(self.device)
        group.machine, group.busy = {"before": before, "after": after}, env.busy_reason(before, after)
        if all(p.ok is not None or p.reference for p in group.paths):  # a verdict worth keeping
            kept = [p.to_dict() if not group.busy else {**p.to_dict(), "cost": None} for p in group.paths]
            env.cache_store(group.group, group.key, {"paths": kept, "notes": group.notes, "seconds": group.seconds,
                                                     "speeds_kept": not group.busy, "machine": group.machine})
        return group

    # ---------------------------------------------------------------------------------------- groups

    def kernels(self) -> GroupResult | None:
        from ..kernels.head import TRITON_HEAD

        requested = TRITON_HEAD if self.cfg.kernels == "triton" else self.cfg.kernels
        if requested == "torch":
            return None
        weight = self.lm.lm_head_weight
        group = GroupResult("kernels", requested)
        heads, why = head.available_heads(self.device, weight.dtype)
        if heads and requested == "auto" and not head.fast_path_device(self.device):  # auto never picks an interpreted head
            heads, why = [], ("the Triton heads need a CUDA GPU (in Triton's interpreter, TRITON_INTERPRET=1, they are "
                              "checked when named, never picked by auto)")
        if not heads:
            group.notes.append(why)
            group.paths = [PathResult("kernels", "torch", reference=True, ok=True)]
            if requested != "auto":
                group.paths.append(PathResult("kernels", requested, ok=None, reason=why))
            return group
        settings = head.HeadSettings.from_recipe(self.cfg)
        rows = head.check_rows(weight.shape[0], self.device)
        key = {"dtype": str(weight.dtype), "vocab": int(weight.shape[0]), "hidden": int(weight.shape[1]), "rows": rows,
               "heads": heads, "settings": asdict(settings)}
        return self.cached_or_measure(group, key, lambda: head.check_heads(weight, heads, settings, rows=rows))

    def rollout(self) -> GroupResult | None:
        requested = self.cfg.rollout.backend
        if requested == "hf":
            return None
        c, g = self.cfg, self.cfg.grpo
        candidates = ["engine"] if requested == "auto" else [requested]
        length = rollout.check_length(g.max_completion_length, self.device)
        key = {"model": c.model.name_or_path, "dtype": str(self.lm.lm_head_weight.dtype), "quantization": c.model.quantization,
               "attn": c.model.attn_implementation, "lora": [c.lora.r, c.lora.alpha, sorted(c.lora.target_modules)],
               "samples": g.num_generations, "length": length, "temperature": g.temperature, "top_p": c.rollout.top_p,
               "top_k": c.rollout.top_k, "candidates": candidates}
        group = GroupResult("rollout", requested)

        def measure():
            prompts, embeds = self.prompts()
            if not prompts:
                return [PathResult("rollout", "hf", reference=True, ok=True)] + [
                    PathResult("rollout", n, ok=None, reason="no prompt of the run's data could be encoded") for n in candidates]
            results, built = rollout.check_rollout(self.lm, prompts, embeds, candidates, num_generations=g.num_generations,
                                                   length=length, temperature=g.temperature, top_p=c.rollout.top_p,
                                                   top_k=c.rollout.top_k)
            self.built.update(built)
            return results

        return self.cached_or_measure(group, key, measure)

    def levers(self) -> GroupResult | None:
        names = levers.applicable(self.lm)
        if not names:
            return None
        c = self.cfg
        key = {"model": c.model.name_or_path, "dtype": str(self.lm.lm_head_weight.dtype), "quantization": c.model.quantization,
               "levers": names}
        group = GroupResult("levers", "")

        def measure():
            prompts, embeds = self.prompts() if levers.FP16 in names else ([], [])
            return levers.check_levers(self.lm, names, prompts, embeds)

        return self.cached_or_measure(group, key, measure)


def _speed_decides(requested: str, paths: list[PathResult]) -> bool:
    """Whether ``auto`` has to rank paths by speed: at least one fast path (not the reference, not interpreted)
    passed its check."""
    return requested == "auto" and any(p.ok and not p.reference and not p.figures.get("interpreted") for p in paths)


def _combine_ranks(groups: list[GroupResult], dist) -> None:
    """Under data parallelism every rank checks its own GPU; a path passes only if it passed on every rank, and
    its cost is the mean over ranks, so that all ranks take the same decisions."""
    if dist is None or not dist.enabled:
        return
    for g in groups:
        for p in g.paths:
            failed_anywhere = dist.any(p.ok is False)
            if failed_anywhere and p.ok is not False:
                p.ok, p.reason = False, "failed its self-check on another rank (see that rank's selfcheck warnings)"
            p.cost = dist.sum([p.cost or 0.0])[0] / dist.world_size if p.cost is not None else None


def _lever_decisions(group: GroupResult, lm, mode: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Warnings (an offload undone) and errors ((key, message) for NF4 / fp16) of the levers group."""
    warnings, errors = [], []
    for p in group.paths:
        if p.ok is not False:
            continue
        if p.name in levers.LEVER_UNDO:
            instead = levers.LEVER_UNDO[p.name](lm)
            warnings.append(f"levers: {p.name} is not used: {p.reason}; {instead}")
        else:
            key, advice = levers.LEVER_KEYS[p.name]
            if mode == "warn":
                warnings.append(f"{key}: {p.name} failed its self-check: {p.reason}; it runs anyway (selfcheck: warn)")
            else:
                errors.append((key, f"{p.reason}; {advice}"))
    return warnings, errors


def _off(cfg, device) -> SelfCheck:
    from ..kernels.head import resolve_backend

    kernels = "torch" if cfg.kernels == "auto" else resolve_backend(cfg.kernels, device)
    backend = "hf" if cfg.rollout.backend == "auto" else cfg.rollout.backend
    message = (f"selfcheck: off: no fast path is checked on this machine; kernels: {cfg.kernels} runs {kernels}, "
               f"rollout.backend: {cfg.rollout.backend} runs {backend}" +
               (" (auto means the references when nothing is checked)" if "auto" in (cfg.kernels, cfg.rollout.backend) else ""))
    return SelfCheck(kernels, backend, warnings=[message])


def run_selfcheck(cfg, lm, *, examples=(), inputs=None, out_dir: str | Path | None = None, dist=None, force: bool = False,
                  show: bool = True, raise_errors: bool = True) -> SelfCheck:
    """Check every fast path ``cfg`` would use on ``lm`` (a loaded model.LoadedModel), decide, report.

    ``examples`` / ``inputs``: the run's data and its InputBuilder (the rollout and fp16 checks encode 2 prompts);
    ``out_dir``: where selfcheck.json goes (rank 0); ``dist``: the trainer's distributed.Dist; ``force``:
    re-measure instead of reading cached verdicts; ``show``: print the table and log the warnings (rank 0).
    Raises SelfCheckError when a named path failed and ``cfg.selfcheck`` is "on" (``raise_errors``: the doctor
    reads ``SelfCheck.errors`` instead).
    """
    t0 = time.perf_counter()
    main = dist is None or dist.is_main
    device = lm.device
    errors: list[tuple[str, str]] = []
    infos: list[str] = []
    if cfg.selfcheck == "off":
        result = _off(cfg, device)
    else:
        runner = _Runner(cfg, lm, examples, inputs, force)
        with preserved_rng():
            groups = [g for g in (runner.kernels(), runner.rollout(), runner.levers()) if g is not None]
        _combine_ranks([g for g in groups if g.paths], dist)
        warnings = []
        chosen = {"kernels": "torch" if cfg.kernels in ("auto", "torch") else None, "rollout": cfg.rollout.backend}
        if chosen["kernels"] is None:
            from ..kernels.head import TRITON_HEAD

            chosen["kernels"] = TRITON_HEAD if cfg.kernels == "triton" else cfg.kernels
        if chosen["rollout"] == "auto":
            chosen["rollout"] = "hf"
        for g in groups:
            if g.group in GROUP_KEYS:
                d: Decision = decide(g, cfg.selfcheck)
                chosen[g.group] = d.chosen
                g.chosen, g.stops = ("", d.chosen) if d.error else (d.chosen, "")
                warnings += d.warnings
                infos += d.infos
                if d.error:
                    errors.append((GROUP_KEYS[g.group], d.error))
                elif g.busy and _speed_decides(g.requested, g.paths):
                    warnings.append(f"{GROUP_KEYS[g.group]}: auto: the speeds that chose {d.chosen} were measured on a busy "
                                    f"machine ({g.busy}); they decide this run only (the cache keeps the verdicts, and "
                                    "the next run measures the speeds again)")
            else:
                w, e = _lever_decisions(g, lm, cfg.selfcheck)
                warnings += w
                errors += e
        built = runner.built.get(chosen["rollout"])
        result = SelfCheck(chosen["kernels"], chosen["rollout"], built, groups, warnings)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the checks' blocks go back before the memory plan's phases run
    result.seconds = time.perf_counter() - t0
    out = Path(out_dir) if out_dir is not None else None
    result.errors = [f"{cfg.source_file}: key '{key}': {msg}" for key, msg in errors]
    result.report = _report(cfg, result, infos, force)
    if main:
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "selfcheck.json").write_text(json.dumps(result.report, indent=1, default=str) + "\n")
        if show:
            print(summary(result), flush=True)
            for w in result.warnings:
                log.warning("self-check: %s", w)
            for i in infos:
                log.info("self-check: %s", i)
    if result.errors and cfg.selfcheck == "on" and raise_errors:
        first_key, message = errors[0]
        ref = REFERENCES.get({v: k for k, v in GROUP_KEYS.items()}.get(first_key, ""), None)
        where = f" (figures: {out / 'selfcheck.json'})" if out is not None else ""
        instead = (f"; use {first_key}: auto (it takes what passes) or {ref}, or selfcheck: warn to run it anyway" if ref
                   else "; or selfcheck: warn to run anyway")
        raise SelfCheckError(f"{cfg.source_file}: key '{first_key}': {message}{instead}{where}")
    return result


def _report(cfg, result: SelfCheck, infos: list[str], force: bool) -> dict:
    """selfcheck.json: what was decided, every verdict with its figures, the machine and the versions."""
    return {
        "mode": cfg.selfcheck, "forced": force, "seconds": round(result.seconds, 3),
        "chosen": {"kernels": result.kernels, "rollout": result.rollout},
        "requested": {"kernels": cfg.kernels, "rollout": cfg.rollout.backend},
        "cache": {"dir": str(env.cache_dir() / "selfcheck"), "hits": result.cache_hits, "measured": result.measured},
        "warnings": result.warnings, "infos": infos, "errors": result.errors,
        "groups": [g.to_dict() for g in result.groups],
        "environment": {**env.gpu_info(), **env.python_info(), "packages": env.package_versions(env.REPORT_PACKAGES),
                        "code": env.code_fingerprint(), "model": env.model_identity(cfg.model.name_or_path)},
    }


def summary(result: SelfCheck) -> str:
    """The short printed form: one line of what was decided and how long it took, then the table."""
    measured, hits = result.measured, result.cache_hits
    how = []
    if measured:
        how.append("measured: " + ", ".join(measured))
    if hits:
        how.append("cached: " + ", ".join(hits))
    head_line = (f"self-check ({result.seconds:.1f} s{'; ' + '; '.join(how) if how else ''}): " +
                 ("a path the recipe names failed: the run stops before step 1" if result.errors and result.report.get("mode") == "on"
                  else f"kernels {result.kernels}, rollout {result.rollout}"))
    if not result.groups:
        return head_line + (" (nothing to check)" if not result.warnings else "")
    return head_line + "\n" + format_table(result.groups)
