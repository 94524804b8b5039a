"""``lowmem-vt`` command line: train, plot, build-tiny (and the subcommands other modules register)."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, load_config


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train(args) -> int:
    from .trainer import Trainer, TrainingStopped

    cfg = load_config(args.recipe, args.overrides)
    try:
        trainer = Trainer(cfg, resume=args.resume)
        last = trainer.train()
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    if last:
        print(f"done: step {last['step']}, reward {last['reward']:.3f}, outputs in {cfg.log.output_dir}")
    return 0


def cmd_plot(args) -> int:
    from .plot import plot_metrics

    out = args.out or str(__import__("pathlib").Path(args.metrics).parent / "plots")
    for p in plot_metrics(args.metrics, out, smoothing=args.smoothing):
        print(p)
    return 0


def cmd_build_tiny(args) -> int:
    from .tiny import build_tiny_model

    print(build_tiny_model(args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowmem-vt", description="Memory-efficient R1-Zero GRPO for Qwen2-VL")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train with a recipe: lowmem-vt train recipes/sat_lora.yaml [key.sub=value ...]")
    add_train_args(t)
    t.set_defaults(func=cmd_train)

    pl = sub.add_parser("plot", help="PNG plots from a metrics.jsonl")
    pl.add_argument("metrics")
    pl.add_argument("--out", default=None, help="folder (default: plots/ beside the metrics)")
    pl.add_argument("--smoothing", type=float, default=0.8)
    pl.set_defaults(func=cmd_plot)

    b = sub.add_parser("build-tiny", help="write the tiny offline Qwen2-VL (model, tokenizer, processor config)")
    b.add_argument("out")
    b.set_defaults(func=cmd_build_tiny)

    for register in _extra_commands():
        register(sub)
    return p


def add_train_args(t: argparse.ArgumentParser) -> None:
    t.add_argument("recipe", help="a recipes/*.yaml file")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.learning_rate=1e-5")
    t.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")


def _extra_commands():
    """Subcommands living beside their module (eval, merge, plan) register themselves here when present."""
    import importlib

    out = []
    for name in ("eval", "merge", "simulate"):  # simulate registers `plan` (it sits above the trainer)
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
    _setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
