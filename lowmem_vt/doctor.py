"""``lowmem-vt doctor [RECIPE]``: the environment and the self-check, standalone, as a markdown block to paste
into a bug report (the work is in ``lowmem_vt.selfcheck.doctor``; this module only registers the command, so
that building the CLI's parser imports nothing heavy)."""

from __future__ import annotations

import sys


def cmd_doctor(args) -> int:
    from .selfcheck.doctor import run_doctor

    text, rc = run_doctor(args.recipe, args.overrides, out_dir=args.out, show_progress=True)
    print(text)
    sys.stdout.flush()
    return rc


def register_cli(sub) -> None:
    d = sub.add_parser(
        "doctor", help="the environment (GPU, versions, Triton's toolchain) and every fast path measured against its "
                       "reference here, as markdown for a bug report: lowmem-vt doctor [RECIPE] [key.sub=value ...]")
    d.add_argument("recipe", nargs="?", default=None,
                   help="a recipes/*.yaml file: its model, data, dtype and backends are checked (loads the model); "
                        "without one, the environment and the loss heads at Qwen2-VL-2B's head shape (GPU only)")
    d.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. model.dtype=float16")
    d.add_argument("--out", default=None, help="also write doctor.md and selfcheck.json into this folder")
    d.set_defaults(func=cmd_doctor)
