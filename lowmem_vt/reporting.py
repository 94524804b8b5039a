"""Per-step metrics and sample completions to TensorBoard and Weights & Biases (``log.report_to``).

``metrics.jsonl`` stays the record of a run; these are views for people who watch runs in those tools.
Both are optional dependencies, imported only when a recipe asks for them; a missing one is reported before
the model loads. TensorBoard event files go to ``<output_dir>/tensorboard``; a resumed run drops the events
of the steps it replays (``purge_step``). W&B follows its own settings (``WANDB_MODE=offline``,
``WANDB_PROJECT``, ``WANDB_DIR``...) and resumes the same W&B run, whose id is kept in ``<output_dir>/wandb_run_id``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import uuid
from pathlib import Path

from .config import ConfigError

REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # name in report_to -> module it needs


class ReporterUnavailable(ConfigError):
    """A ``log.report_to`` entry whose package is not installed."""


def check_reporters(report_to: list[str], where: str = "log.report_to") -> None:
    """Raise ReporterUnavailable, one line starting with ``where`` and giving the install command, for a
    requested tool that is not installed (pre-flight passes the recipe file and key as ``where``)."""
    for name in report_to:
        package = REPORTERS[name]
        if importlib.util.find_spec(package) is None:
            raise ReporterUnavailable(
                f"{where}: needs the {package} package, which is not installed; pip install {package}, "
                f"or remove {name!r} from log.report_to"
            )
    if "wandb" in report_to and not _wandb_can_log():
        raise ReporterUnavailable(
            f"{where}: wandb has no API key here (it would stop the run after the model loaded); run `wandb login`, "
            "set WANDB_API_KEY, or set WANDB_MODE=offline to log locally"
        )


def _wandb_can_log() -> bool:
    """W&B logs offline/disabled without a key; online it needs WANDB_API_KEY or a login (~/.netrc entry)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_DISABLED"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _scalars(metrics: dict) -> dict[str, float]:
    """The numeric, finite entries of a step's metrics (bools as 0/1)."""
    out = {}
    for k, v in metrics.items():
        if k == "step" or v is None or isinstance(v, str):
            continue
        v = float(v)
        if math.isfinite(v):
            out[k] = v
    return out


class Reporters:
    """Opened once per run on the main rank; ``log`` every step, ``sample`` for logged completions."""

    def __init__(self, report_to: list[str], output_dir: str | Path, *, resume_step: int | None, config: dict,
                 project: str = "lowmem-vt"):
        check_reporters(report_to)
        self.out = Path(output_dir)
        self._tb = None
        self._wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events at or after it, left by the interrupted run, are dropped (they are replayed)
            self._tb = SummaryWriter(str(self.out / "tensorboard"),
                                     purge_step=None if resume_step is None else resume_step + 1)
        if "wandb" in report_to:
            import wandb

            id_file = self.out / "wandb_run_id"
            run_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else uuid.uuid4().hex[:8]
            self.out.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id)
            try:
                self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", project), id=run_id, resume="allow", config=config,
                                         dir=str(self.out), name=self.out.name)
            except Exception as exc:  # noqa: BLE001 -- login, network and settings errors come in many types
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ReporterUnavailable(f"log.report_to: wandb could not start a run ({type(exc).__name__}: {first[:160]}); "
                                          "set WANDB_MODE=offline, or remove 'wandb' from log.report_to") from None
            self._samples = []

    def log(self, metrics: dict) -> None:
        step = int(metrics["step"])
        values = _scalars(metrics)
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def sample(self, record: dict) -> None:
        """One completion: ``{"step", "answer", "reward", "completion"}``."""
        step = int(record["step"])
        if self._tb is not None:
            text = (f"**step {step}**, answer `{record['answer']}`, reward {record['reward']:.2f}\n\n"
                    f"    <think>{record['completion']}")
            self._tb.add_text("samples", text, step)
            self._tb.flush()
        if self._wandb is not None:
            import wandb

            self._samples.append([step, record["answer"], float(record["reward"]), record["completion"]])
            # a new table each time: W&B tables are immutable once logged
            table = wandb.Table(columns=["step", "answer", "reward", "completion"], data=list(self._samples))
            self._wandb.log({"samples": table}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
