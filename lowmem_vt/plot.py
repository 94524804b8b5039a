"""Training plots from metrics.jsonl: rewards, accuracy, response length, reflection-word rate, KL, GPU memory."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError, what_is_at
from .metrics import read_metrics


class PlotError(UserError, ValueError):
    """An argument that cannot be plotted; the message says which and why."""


PANELS = [
    ("reward", "total reward"),
    ("rewards/", "reward per function"),
    ("accuracy", "accuracy"),
    ("completion_length_mean", "response length (tokens)"),
    ("reflection_rate", "reflection-word rate"),
    ("kl", "KL to reference"),
    ("gpu_memory", "GPU memory (GiB): step peak, held after"),
]
# panels that draw named keys (the others draw their key, or every key under a prefix ending in "/")
PANEL_KEYS = {"gpu_memory": ("peak_gpu_mem_gib", "mem_held_gib")}  # null on CPU: "not logged"


def smooth(values: list[float], alpha: float) -> list[float]:
    """Exponential moving average (alpha = weight of the past, in [0, 1)), skipping missing values."""
    if not 0 <= alpha < 1:
        raise PlotError(f"smoothing must be in [0, 1) (the weight of the past in the moving average, e.g. 0.8), got {alpha}")
    out, acc = [], None
    for v in values:
        if v is None:
            out.append(acc)
            continue
        acc = v if acc is None else alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


def plot_metrics(metrics_path: str | Path, out_dir: str | Path, smoothing: float = 0.8) -> list[Path]:
    """One PNG per panel plus ``overview.png``; returns the files written.

    Each series is drawn twice in one color: the raw values faint, their moving average (``smoothing``) solid.
    """
    metrics_path = resolve_metrics_path(metrics_path)
    smooth([], smoothing)  # a bad smoothing fails before any drawing
    rows = read_metrics(metrics_path)
    if not rows:
        raise PlotError(f"{metrics_path} holds no metrics (empty, or no complete line)")
    if any("completion" in r for r in rows[:5]):
        raise PlotError(f"{metrics_path} is a samples log (completions), not metrics; plot the metrics.jsonl beside it")
    if not all(isinstance(r.get("step"), (int, float)) for r in rows):
        raise PlotError(f"{metrics_path} is not a metrics.jsonl written by lowmem-vt train (a line has no 'step')")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in rows]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []
    fig_all, axes = plt.subplots(2, 4, figsize=(20, 8))
    for ax in axes.flat[len(PANELS):]:
        ax.axis("off")
    fig_all.suptitle(f"{Path(metrics_path).parent.name or 'run'}: {len(rows)} steps (solid: moving average, {smoothing})")
    for ax_all, (key, title) in zip(axes.flat, PANELS):
        if key in PANEL_KEYS:
            keys = list(PANEL_KEYS[key])
        else:
            keys = sorted({k for r in rows for k in r if k.startswith(key)}) if key.endswith("/") else [key]
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = 0
        for k in keys:
            vals = [r.get(k) for r in rows]
            if all(v is None for v in vals):
                continue
            color = colors[drawn % len(colors)]
            drawn += 1
            raw = [float("nan") if v is None else v for v in vals]
            avg = [float("nan") if v is None else v for v in smooth(vals, smoothing)]
            for a in (ax, ax_all):
                a.plot(steps, raw, alpha=0.25, color=color)
                a.plot(steps, avg, color=color, label=k)
        for a in (ax, ax_all):
            a.set_title(title)
            a.set_xlabel("step")
            a.grid(alpha=0.3)
            if drawn > 1:
                a.legend(fontsize=8)
            elif drawn == 0:
                a.text(0.5, 0.5, "not logged", ha="center", va="center", transform=a.transAxes, color="gray")
        path = out / f"{key.strip('/').replace('/', '_')}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    fig_all.tight_layout()
    overview = out / "overview.png"
    fig_all.savefig(overview, dpi=90)
    plt.close(fig_all)
    written.append(overview)
    return written


def plot_files() -> list[str]:
    """The names ``plot_metrics`` writes."""
    return [f"{key.strip('/').replace('/', '_')}.png" for key, _ in PANELS] + ["overview.png"]


def check_plot_folder(out: str | Path, metrics: Path) -> None:
    """The plots go to a new or empty folder, or one holding only earlier plots; never over the metrics' own folder's
    other files (PlotError)."""
    p = Path(out)
    if str(out).strip() == "":
        raise PlotError("--out is empty; give a folder for the plots")
    if p.exists() and not p.is_dir() or p.is_symlink() and not p.exists():
        raise PlotError(f"--out {p} is a file (or a broken link); give a folder for the plots")
    if p.is_dir():
        own = set(plot_files())
        foreign = sorted(x.name for x in p.iterdir() if x.name not in own)
        if foreign:
            raise PlotError(f"--out {p} holds other files ({', '.join(foreign[:4])}); give a new or empty folder for the plots")
    existing = p
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise PlotError(f"--out {p}: {existing} is a file, not a folder; give another folder")


def resolve_metrics_path(path: str | Path) -> Path:
    """The metrics file itself, or ``metrics.jsonl`` inside a run folder; PlotError if there is none."""
    p = Path(path)
    if p.is_dir():
        if (p / "metrics.jsonl").is_file():
            return p / "metrics.jsonl"
        raise PlotError(f"{p} is a folder without metrics.jsonl; give a metrics.jsonl or a run folder (log.output_dir)")
    if not p.is_file():
        what = what_is_at(p)
        raise PlotError(f"{p}: no such file; give a metrics.jsonl or a run folder (log.output_dir)" if what == "does not exist"
                        else f"{p} {what}; give a metrics.jsonl or a run folder (log.output_dir)")
    return p
