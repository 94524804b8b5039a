"""``lowmem-vt`` command line: train, plot, build-tiny (and the subcommands other modules register: eval, merge,
plan, doctor).

A user error (``errors.UserError``: a recipe key, a data file, a model folder, a checkpoint, the run folder) is
printed as one ``error:`` line with exit status 2; ``--debug``, anywhere on the line, shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from .errors import UserError


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # huggingface_hub and datasets give their loggers a stderr handler of their own and let records propagate too:
    # beside the root handler above, each of their warnings (the hub's retries when it is unreachable) printed twice
    for own_handler in ("huggingface_hub", "datasets"):
        logging.getLogger(own_handler).propagate = False
    # bitsandbytes (0.50, CPUs with AVX512-BF16) warns at import that the optional `kernels` package for its
    # CPU NF4 *inference* path is missing; training never uses that path (model.keep_nf4_trainable)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def cmd_train(args) -> int:
    import signal

    from .config import load_config
    from .trainer import Trainer, TrainingStopped

    if args.resume and args.overwrite:
        print("error: --resume continues the run in log.output_dir and --overwrite moves it aside: give one of them", file=sys.stderr)
        return 2
    cfg = load_config(args.recipe, args.overrides)
    trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite, selfcheck_force=args.selfcheck == "force")
    resume_cmd = shlex.join(["lowmem-vt", "train", args.recipe, *args.overrides, "--resume", "latest"])
    try:
        last = trainer.train()
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # a second signal: stopped at once, without saving
        sig = trainer.stopped_at_once_by or signal.SIGINT
        what = "a second Ctrl-C" if sig == signal.SIGINT else f"a second {sig.name}"
        print(f"stopped at once ({what}), without saving; {_what_is_left(cfg.log.output_dir, args, resume_cmd)}", file=sys.stderr)
        return 128 + int(sig)
    sig = trainer.interrupted_by
    if sig is not None and trainer.step_count < trainer.total_steps:  # a signal during the last step: it finished
        print(f"interrupted by {sig.name} at step {trainer.step_count} of {trainer.total_steps}; checkpoint saved in "
              f"{cfg.log.output_dir}. Continue with: {resume_cmd}", file=sys.stderr)
        return 128 + int(sig)
    if last:
        print(f"done: step {last['step']}, reward {last['reward']:.3f}, outputs in {cfg.log.output_dir}")
    return 0


def _what_is_left(output_dir: str, args, resume_cmd: str) -> str:
    """After a run stopped without saving: the checkpoint a resume would use, or how to start again."""
    from . import checkpoint as ckpt

    for p in reversed(ckpt.list_checkpoints(output_dir)):
        try:
            ckpt.verify_checkpoint(p)
        except ckpt.CheckpointError:
            continue
        return f"the last checkpoint ({p.name}) in {output_dir} is intact. Continue with: {resume_cmd}"
    again = shlex.join(["lowmem-vt", "train", args.recipe, *args.overrides, "--overwrite"])
    return f"no checkpoint of this run was saved in {output_dir}. Start again with: {again}"


def cmd_plot(args) -> int:
    from .plot import check_plot_folder, plot_metrics, resolve_metrics_path

    metrics = resolve_metrics_path(args.metrics)
    out = args.out if args.out is not None else str(metrics.parent / "plots")
    check_plot_folder(out, metrics)
    for p in plot_metrics(metrics, out, smoothing=args.smoothing):
        print(p)
    return 0


def cmd_build_tiny(args) -> int:
    from pathlib import Path

    from .families import family_named
    from .preflight import PreflightError, check_output_folder
    from .tiny import build_tiny_model

    family = family_named(args.family)
    check_output_folder(args.out, "build-tiny", {})  # a new or empty folder: nothing is overwritten
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a folder that refuses new entries though writable to access(2): /proc, /sys
        raise PreflightError(f"build-tiny {args.out} cannot be created ({exc.strerror or exc}); give another folder") from None
    print(build_tiny_model(args.out, family=family))
    return 0


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error:`` line (status 2), like every other error of the CLI."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="lowmem-vt", description="Memory-efficient R1-Zero GRPO for vision-language models")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors (may be given anywhere)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train with a recipe: lowmem-vt train recipes/sat_lora.yaml [key.sub=value ...]")
    add_train_args(t)
    t.set_defaults(func=cmd_train)

    pl = sub.add_parser("plot", help="PNG plots from a metrics.jsonl (or a run folder holding one)")
    pl.add_argument("metrics")
    pl.add_argument("--out", default=None, help="folder (default: plots/ beside the metrics)")
    pl.add_argument("--smoothing", type=float, default=0.8, help="weight of the past in the moving average, in [0, 1)")
    pl.set_defaults(func=cmd_plot)

    b = sub.add_parser("build-tiny", help="write a tiny offline model (model, tokenizer, processor config)")
    b.add_argument("out")
    b.add_argument("--family", default="qwen2_vl", help="model_type of the family (qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_5)")
    b.set_defaults(func=cmd_build_tiny)

    for register in _extra_commands():
        register(sub)
    return p


def add_train_args(t: argparse.ArgumentParser) -> None:
    t.add_argument("recipe", help="a recipes/*.yaml file")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.learning_rate=1e-5")
    t.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    t.add_argument("--overwrite", action="store_true",
                   help="log.output_dir holds a finished or abandoned run: move it aside to <dir>.old-<time> (never deleted) and start afresh")
    t.add_argument("--selfcheck", choices=["force"], default=None,
                   help="force: measure every fast path again instead of using this machine's cached verdicts "
                        "(the recipe key selfcheck: on | warn | off says what a failure does)")


def _extra_commands():
    """Subcommands living beside their module (eval, merge, plan) register themselves here when present."""
    import importlib

    out = []
    for name in ("eval", "merge", "simulate", "doctor"):  # simulate registers `plan` (it sits above the trainer)
        try:
            mod = importlib.import_module(f"lowmem_vt.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"lowmem_vt.{name}":
                raise
            continue
        if hasattr(mod, "register_cli"):
            out.append(mod.register_cli)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    _setup_logging()
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # overrides after an option (``--resume latest train.learning_rate=5e-5``) are overrides too
            if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
                args.overrides = [*args.overrides, *extra]
            else:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # a usage error (one line, printed) or --help: its status, also when called in-process
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug or not isinstance(exc, UserError):
            raise
        print(f"error: {str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
