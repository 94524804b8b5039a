"""Memory of one recipe step on the real Qwen2-VL-2B architecture, simulated.

``--simulate`` (CPU, no GPU, no weights; what runs without a GPU): ``lowmem_vt.simulate`` runs the step's
phases on fake tensors for the grid LoRA / QLoRA x micro-batch 1, 2, 4, 8 x completion 256, 700, 1024 and
puts each phase's simulated peak beside the planner's; then the memory levers, added one at a time, at each
recipe's own settings. ``--smoke``: the tiny model at two points (seconds; a CPU test runs it).

    python bench/memory.py --out DIR --simulate [--smoke]

On a GPU, the measured peak and time of each phase beside the planner, over several steps at a recipe's
settings, is ``bench/step.py`` (what ``make gpu-check`` runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

GRID = [(recipe, mb, T) for recipe in ("recipes/sat_lora.yaml", "recipes/sat_qlora.yaml")
        for mb in (1, 2, 4, 8) for T in (256, 700, 1024)]


def write(out: Path, payload: dict, md: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(payload, indent=1))
    (out / "memory.md").write_text(md)


def simulated(out: Path, smoke: bool) -> int:
    from lowmem_vt.config import load_config
    from lowmem_vt.planner import config_for, plan
    from lowmem_vt.simulate import LEVERS, simulate

    if smoke:
        from lowmem_vt.tiny import build_tiny_model

        tiny = build_tiny_model(Path(tempfile.gettempdir()) / "lowmem-vt-bench-tiny")
        base = ["recipes/demo_tiny.yaml", [f"model.name_or_path={tiny}"]]
        grid = [(base, mb, T) for mb, T in ((2, 64), (8, 256))]
        recipes = [base]
    else:
        grid = [([r, []], mb, T) for r, mb, T in GRID]
        recipes = [["recipes/sat_lora.yaml", []], ["recipes/sat_qlora.yaml", []]]
    rows, worst = [], 0.0
    unit, scale = ("MiB", 1024) if smoke else ("GiB", 1)
    md = [f"## Simulated: planner vs simulation per phase ({unit} allocated)", "",
          "| recipe | micro | completion | " + " | ".join(f"{p} sim / plan" for p in PHASES) + " | worst plan/sim |",
          "|---|---:|---:|" + "---:|" * (len(PHASES) + 1)]
    for (recipe, over), mb, T in grid:
        cfg = load_config(recipe, over + [f"train.micro_batch_size={mb}", f"grpo.max_completion_length={T}"])
        config = config_for(cfg)
        t0 = time.perf_counter()
        sim = simulate(cfg, config)
        p = plan(cfg, config)
        ratios = {k: p.peaks[k] / v for k, v in sim.peaks.items()}
        dev = max(ratios.values(), key=lambda r: abs(r - 1))
        worst = max(worst, abs(dev - 1))
        rows.append({"recipe": recipe, "micro_batch": mb, "completion": T, "simulated": sim.peaks, "planned": p.peaks,
                     "seconds": time.perf_counter() - t0})
        md.append(f"| {Path(recipe).stem} | {mb} | {T} | "
                  + " | ".join(f"{scale * sim.peaks[k]:.2f} / {scale * p.peaks[k]:.2f}" for k in PHASES) + f" | {dev:.3f} |")
        write(out, {"grid": rows}, "\n".join(md) + "\n")
    md += ["", f"Largest planner deviation from the simulation over the grid: {100 * worst:.1f} %.", ""]

    # the levers, added one at a time, at each recipe's own settings
    levers_rows = []
    md += [f"## Simulated: memory levers at each recipe's settings (whole-step peak, {unit} allocated)", "",
           "| levers on | " + " | ".join(Path(r).stem for r, _ in recipes) + " |", "|---|" + "---:|" * len(recipes)]
    for k in range(len(LEVERS) + 1):
        on = LEVERS[:k]
        cells = []
        for recipe, over in recipes:
            cfg = load_config(recipe, over)
            sim = simulate(cfg, config_for(cfg), without=LEVERS[k:])
            levers_rows.append({"recipe": recipe, "levers": list(on), "simulated": sim.peaks})
            worst_phase = max(sim.peaks, key=sim.peaks.get)
            cells.append(f"{scale * sim.peak:.2f} ({worst_phase})")
        md.append(f"| {' + '.join(on) if on else 'none (peft fp32 adapter, tower and layer inputs on the GPU)'} | "
                  + " | ".join(cells) + " |")
        write(out, {"grid": rows, "levers": levers_rows}, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


PHASES = ("vision", "rollout", "reference pass", "policy update", "optimizer step")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out", help="folder for memory.json and memory.md")
    ap.add_argument("--smoke", action="store_true", help="the tiny model at two points (seconds)")
    ap.add_argument("--simulate", action="store_true", help="fake tensors on the CPU (the only mode; kept for scripts)")
    args = ap.parse_args()
    return simulated(Path(args.out), args.smoke)


if __name__ == "__main__":
    sys.exit(main())
