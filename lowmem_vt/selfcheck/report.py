"""What a self-check found: one ``PathResult`` per path measured, grouped by what they stand for
(``kernels``: the loss heads, ``rollout``: the rollout backends, ``levers``: the memory levers and dtype
checks), and the decision each group's setting takes from them (``decide``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# the recipe key each group decides, and its reference (always available, never rejected)
GROUP_KEYS = {"kernels": "kernels", "rollout": "rollout.backend"}
REFERENCES = {"kernels": "torch", "rollout": "hf"}


@dataclass
class PathResult:
    """One path's verdict. ``ok``: True passed, False failed, None not run (``reason`` says why).
    ``cost``: seconds per unit of work (lower is faster): fwd + bwd + reference pass for a head, seconds per
    generated token for a rollout backend; None when not timed. ``figures``: the measured numbers."""

    group: str
    name: str
    reference: bool = False
    ok: bool | None = None
    reason: str = ""
    cost: float | None = None
    figures: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PathResult":
        return cls(**d)


@dataclass
class GroupResult:
    """A group's paths as measured (or read from the cache) and what was decided."""

    group: str
    requested: str  # the recipe's value ("auto", "engine", ...); "" for levers
    paths: list[PathResult] = field(default_factory=list)
    chosen: str = ""  # what runs; "" when the named path failed and the run stops (``stops``)
    stops: str = ""  # the named path that failed its check and stops the run (selfcheck: on)
    cached: bool = False
    seconds: float = 0.0  # spent measuring (0 when read from the cache)
    key: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was not checked, and why
    busy: str = ""  # why the speeds measured this time are not kept ("" on a quiet machine)
    machine: dict = field(default_factory=dict)  # the machine's load before and after measuring

    def path(self, name: str) -> PathResult | None:
        return next((p for p in self.paths if p.name == name), None)

    def to_dict(self) -> dict:
        return {"group": self.group, "requested": self.requested, "chosen": self.chosen, "stops": self.stops,
                "cached": self.cached, "seconds": self.seconds, "notes": self.notes, "busy": self.busy,
                "machine": self.machine, "key": self.key, "paths": [p.to_dict() for p in self.paths]}


@dataclass
class Decision:
    chosen: str
    warnings: list[str] = field(default_factory=list)
    infos: list[str] = field(default_factory=list)
    error: str | None = None  # an explicitly named path failed: the run stops (selfcheck: on)


def _ms(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds * 1e3:.3g} ms"


def describe_cost(p: PathResult) -> str:
    if p.cost is None:
        return "not timed"
    if p.group == "rollout":
        return f"{1.0 / p.cost:.4g} tokens/s" if p.cost > 0 else "? tokens/s"
    return _ms(p.cost)


def decide(group: GroupResult, mode: str = "on") -> Decision:
    """The path ``group.requested`` resolves to, given the measured paths.

    ``auto``: the fastest path that passed (the reference included, which always "passes": it is what the others
    are measured against); every path that failed or was slower than the reference gets one warning naming the
    measured error or the exception and what runs instead. An explicitly named path runs if it passed; if it
    failed, ``Decision.error`` says why (the trainer stops with it) unless ``mode`` is "warn" (a warning, and
    it runs anyway). A named path that passed but is slower than the reference runs, with a warning.
    """
    ref_name = REFERENCES[group.group]
    key = GROUP_KEYS[group.group]
    ref = group.path(ref_name)
    requested = group.requested
    if requested == ref_name:
        return Decision(ref_name)
    if requested != "auto":
        p = group.path(requested)
        if p is None or p.ok is None:
            why = p.reason if p is not None else "not measured"
            return Decision(requested, warnings=[f"{key}: {requested} runs unchecked: {why}"])
        if p.ok:
            d = Decision(requested)
            if ref is not None and ref.cost is not None and p.cost is not None and p.cost > ref.cost:
                d.warnings.append(f"{key}: {requested} passed its self-check but is slower than {ref_name} here "
                                  f"({describe_cost(p)} vs {describe_cost(ref)}); it runs as named")
            return d
        message = f"{requested} failed its self-check: {p.reason}"
        if mode == "warn":
            return Decision(requested, warnings=[f"{key}: {message}; it runs anyway (selfcheck: warn)"])
        return Decision(requested, error=message)

    # auto; a head run by Triton's interpreter (TRITON_INTERPRET=1, CPU tests) is checked but never picked
    candidates = [p for p in group.paths if p.ok and p.cost is not None and not p.figures.get("interpreted")]
    reference_ok = ref is not None and ref.ok is not False
    if reference_ok and ref is not None and ref not in candidates:
        candidates.append(ref)  # untimed reference: still the fallback
    if not candidates:
        return Decision(ref_name, warnings=[f"{key}: auto: no path could be measured; {ref_name} (the reference) runs"])
    timed = [p for p in candidates if p.cost is not None]
    best = min(timed, key=lambda p: p.cost) if timed else candidates[0]
    d = Decision(best.name)
    if ref is not None and ref.ok is False:  # the reference is the fallback: say what is wrong with it
        d.warnings.append(f"{key}: {ref_name} (the reference) failed its self-check: {ref.reason}")
    for p in group.paths:
        if p.reference or p.name == best.name:
            continue
        if p.ok is False:
            d.warnings.append(f"{key}: auto: {p.name} is not used: {p.reason}; {best.name} runs instead")
        elif p.ok is None:
            d.infos.append(f"{key}: auto: {p.name} not checked here ({p.reason}); {best.name} runs")
        elif p.figures.get("interpreted"):
            d.infos.append(f"{key}: auto: {p.name} passed in Triton's interpreter (a test tool, not a fast path: "
                           f"{describe_cost(p)}); {best.name} runs")
        elif ref is not None and ref.cost is not None and p.cost is not None and p.cost >= ref.cost:
            d.warnings.append(f"{key}: auto: {p.name} passed but is slower than {ref_name} here ({describe_cost(p)} vs "
                              f"{describe_cost(ref)}); {best.name} runs instead")
        else:
            d.infos.append(f"{key}: auto: {p.name} passed but {best.name} is faster ({describe_cost(p)} vs "
                           f"{describe_cost(best)})")
    return d


def format_table(groups: list[GroupResult]) -> str:
    """A short markdown table: one row per path, its verdict and its main figures."""
    lines = ["| path | verdict | figures |", "|---|---|---|"]
    for g in groups:
        for p in g.paths:
            if p.reference:
                verdict = "reference"
            else:
                verdict = {True: "pass", False: "FAIL", None: "not checked"}[p.ok]
            if g.stops and p.name == g.stops:
                verdict += ", **stops the run** (named in the recipe)"
            elif g.chosen and p.name == g.chosen:
                # a failed path runs only when named under selfcheck: warn
                verdict += ", **runs anyway** (selfcheck: warn)" if p.ok is False else ", **chosen**"
            if g.cached:
                verdict += " (cached)"
            figures = _figures_text(p)
            if p.ok is False or (p.ok is None and p.reason):
                figures = f"{p.reason}; {figures}" if figures else p.reason
            lines.append(f"| {g.group}: {p.name} | {verdict} | {figures.replace('|', '/')} |")
        for note in g.notes:
            lines.append(f"| {g.group} | not checked | {note.replace('|', '/')} |")
        if g.busy:
            lines.append(f"| {g.group} | speeds not kept | measured on a busy machine ({g.busy.replace('|', '/')}): "
                         "they decide this run only; the cache keeps the verdicts |")
    return "\n".join(lines)


def _figures_text(p: PathResult) -> str:
    f = p.figures
    parts = []
    if p.group == "kernels":
        if f.get("interpreted"):
            parts.append("in Triton's interpreter (a test tool: auto never picks it)")
        if "fwd_ms" in f:
            parts.append(f"fwd {f['fwd_ms']:.3g} ms, bwd {f['bwd_ms']:.3g} ms, ref pass {f['logprobs_ms']:.3g} ms")
        if f.get("peak_extra_mib") is not None:
            parts.append(f"+{f['peak_extra_mib']:.0f} MiB")
        if f.get("errors") and not p.reference:
            recipe = f["errors"].get("recipe", {})
            errs = ", ".join(f"{k} {recipe[k]['error']:.1e}" for k in ("logp", "loss", "kl", "dh", "dw") if k in recipe)
            parts.append(f"err vs float64 {errs}; worst bound/error {f.get('worst_margin', float('nan')):.2g} over "
                         f"{len(f['errors'])} cases")
        if "bit_identical" in f and f["bit_identical"] is not None:
            parts.append("3 repeats bit-identical" if f["bit_identical"] else f"repeats: {f.get('repeat_note', 'differ')}")
    elif p.group == "rollout":
        if f.get("tokens_per_s") is not None:
            parts.append(f"{f['tokens_per_s']:.4g} tokens/s")
        if f.get("greedy") is not None:
            parts.append(f"greedy: {f['greedy']}")
        if f.get("logprob_diff_mean") is not None:
            parts.append(f"log-prob diff vs trainer mean {f['logprob_diff_mean']:.1e}, max {f['logprob_diff_max']:.1e}")
        if f.get("graphs"):
            parts.append(f["graphs"])
        if f.get("distribution"):
            parts.append(f["distribution"])
    else:
        parts += [f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in f.items()]
    if not parts and p.reference:
        parts.append("nothing to compare it with here")
    return ", ".join(parts)
