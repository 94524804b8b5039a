"""The GPU check: one command that runs every GPU claim of the project, most valuable first, and keeps what
each stage found on disk as soon as it has it.

    make gpu-check                      # on the GPU machine: install (no torch touched), then every stage
    python bench/gpu_check.py [--out DIR] [--install] [--smoke] [--only STAGE ...] [--budget 480]

Stages, in order of value (budget in seconds on an H100; each runs as its own process, killed at its budget):

| stage | what | budget |
|---|---|---:|
| environment | `bench/environment.py`: C compiler, Python.h, libcuda (what Triton builds its launcher with) and one trivial Triton launch; when it fails, nothing else runs and one line says what is missing | 60 |
| doctor | `bench/doctor.py`: `lowmem-vt doctor`, the environment and both Triton loss heads at Qwen2-VL-2B's head shape against the torch reference on this GPU (the self-check every run does before step 1) | 60 |
| cuda_tests | `pytest -m gpu tests`: the tests that need CUDA (kernels in bf16, NF4, planner refusal, engine) | 90 |
| processor | `bench/processor.py`: our input builder against transformers' processor, every family | 45 |
| loss_head | `bench/loss_head.py`: our loss head vs plain torch vs Liger | 45 |
| rollout | `bench/rollout.py`: the trainer's call, engine at batch 8 and 64, adapter on/off; HF generate 1 x 8 x 128, scaled | 120 |
| step_lora | `bench/step.py --recipe recipes/sat_lora.yaml --steps 3 --backend engine`: whole step, time and peak per phase beside the planner | 80 |
| step_qlora | the same for `recipes/sat_qlora.yaml` (NF4 + paged 8-bit AdamW) | 80 |
| vs_trl | `bench/vs_trl.py --completion 128`: our Trainer.step() and TRL's GRPOTrainer at the same shapes | 150 |

The arguments each stage passes live in ``STAGES`` below: one place to change when a bench script changes.

The whole run stays within ``--budget`` (480 s = 8 min, install included): a stage gets the smaller of its own
budget and what is left, and is not started with less than 15 s left. The budgets add up to more than that on
purpose: stages that finish early leave their time to the later ones, and when none does, the last are cut.

Output folder (``--out``; default ``$OUT`` where set, as on the device machine, else ``out/gpu_check``):
``gpu_check.json`` (environment, then every stage: status, reason, seconds, the stage's own JSON),
``gpu_check.md`` (the same for people) and ``gpu_check.log`` (every line printed). Three files, because the
device machine returns at most eight; both are rewritten every few seconds while a stage runs, so a run
cut off from outside still returns what was measured. A stage is ``ok`` (its script ran and wrote its
result), ``skipped`` (its script recorded why it cannot run here, bench/report.py's ``skip``), ``failed``
(non-zero exit, or no result), ``timeout`` (killed at its budget; what it had written is kept) or
``not_run`` (no budget left, or not chosen by ``--only``). Without ``--smoke`` (the GPU machine: a GPU, torchvision,
the carried wheels) a skip is a failure, of a stage, of a method in its table or of a gpu test; with ``--smoke``
the skips are expected on CPU and stated so.

``--install``: the carried wheels (``wheels/*.whl``, made by ``make gpu-wheels``) go to a target folder put
first on PYTHONPATH, and the project is installed with ``pip install --no-deps --no-build-isolation -e .``;
nothing is fetched and the machine's torch is never replaced.

``--smoke``: every stage at tiny sizes on CPU (CUDA hidden, Triton in its interpreter), in seconds;
``tests/test_gpu_check.py`` runs it in ``make test`` so this script and the bench scripts cannot rot.

Every stage can fail: on a crash, and on a disagreement beyond its stated tolerance (loss head: log-probs, loss and
dh against the fp32 reference; rollout: the engine's log-probs against the trainer's; whole step: finite loss and
gradient, sampler log-probs against the trainer's). ``--fault STAGE ...`` (for tests) hands those stages a deliberately
wrong method (``LOWMEM_BENCH_FAULT=1`` in its process, bench/report.py's ``fault``; each Stage names its ``fault``); the stage must
then fail. Every stage has one; the doctor's and the CUDA tests' (wrong Triton heads) run only on a GPU, so
``--smoke`` refuses them rather than report a fault test that did nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import report

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MIN_STAGE_S = 15.0  # a stage is not started with less time than this left
SMOKE_SLOWER = 3.0  # --smoke: stage budgets (set for an H100) times this; on 2 busy CPU cores a smoke stage can take
                    # longer than the real one on the GPU (the interpreter, models built afresh)
POLL_S = 2.0
PACKAGES = ["torch", "torchvision", "triton", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "liger-kernel",
            "numpy", "pytest", "lowmem-vt"]
CARRY_LIMIT_MIB = 60  # the device tool moves at most 64 MiB (working tree + carried paths)


@dataclass
class Stage:
    name: str
    title: str
    budget_s: float
    script: str | None  # bench script; None for the pytest stage
    args: list[str] = field(default_factory=list)
    fault: str = ""  # the deliberately wrong method --fault hands it (LOWMEM_BENCH_FAULT=1), which must fail the stage
    fault_needs_cuda: bool = False  # the wrong method runs only on a GPU: --fault refused with --smoke

    def command(self, out: Path, smoke: bool) -> list[str]:
        if self.script is None:  # pytest -m gpu; bench/pytest_results.py logs each test, tests_report() sums up
            return [PY, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider", "-p", "pytest_results", "tests"]
        return [PY, str(ROOT / self.script), "--out", str(out), *self.args, *(["--smoke"] if smoke else [])]

    @property
    def result_name(self) -> str:
        """The script writes DIR/<this>.json and .md (bench/report.py): its own name, or cuda_tests."""
        return Path(self.script).stem if self.script else self.name


WRONG_HEAD = "the Triton heads' loss and log-probs x1.01 (bench/report.py break_triton_heads)"
STAGES = [
    Stage("environment", "What Triton needs: C compiler, Python.h, libcuda; one trivial launch", 60, "bench/environment.py",
          fault="the trivial launch adds 1.01 instead of 1"),
    Stage("doctor", "lowmem-vt doctor: environment, Triton heads vs torch at the 2B head shape", 60, "bench/doctor.py",
          fault=WRONG_HEAD, fault_needs_cuda=True),  # without a GPU the doctor checks no head
    Stage("cuda_tests", "CUDA tests (pytest -m gpu)", 90, None, fault=WRONG_HEAD, fault_needs_cuda=True),
    Stage("processor", "Our input builder vs transformers' processor, every family", 45, "bench/processor.py",
          fault="our pixel values x1.01"),
    Stage("loss_head", "Loss head: ours vs torch vs Liger", 45, "bench/loss_head.py", fault="the fused-linear head's loss x1.01"),
    # HF generate runs 1 x 8 x 128 tokens there (8 x 1024 would take ~85 s), its time scaled to the full length
    Stage("rollout", "Rollout: the trainer's call, engine at batch 8 and 64, HF generate shorter", 120, "bench/rollout.py", [],
          fault="the engine's log-probs off by 0.5"),
    # the anchors' shapes (1 prompt x 8 x 1024, micro-batch 8); the engine: HF would take ~85 s a rollout
    Stage("step_lora", "Whole step, sat_lora (bf16 LoRA), 3 steps", 80, "bench/step.py",
          ["--recipe", "recipes/sat_lora.yaml", "--steps", "3", "--backend", "engine"], fault="a NaN loss"),
    Stage("step_qlora", "Whole step, sat_qlora (NF4 QLoRA), 3 steps", 80, "bench/step.py",
          ["--recipe", "recipes/sat_qlora.yaml", "--steps", "3", "--backend", "engine"], fault="a NaN loss"),
    # TRL's first step at 1024 tokens took 134 s on the H100 (the second 70.5 s): 128 tokens, both sides
    Stage("vs_trl", "TRL GRPOTrainer at the same shapes (128 tokens)", 150, "bench/vs_trl.py",
          ["--completion", "128", "--steps", "2"], fault="our step raises"),
]

ENV_PROBE = r"""
import json, platform, sys
from importlib import metadata
out = {"python": platform.python_version(), "executable": sys.executable, "packages": {}}
for name in sys.argv[1:]:
    try:
        out["packages"][name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        out["packages"][name] = None
import torch
out["torch_cuda"] = torch.version.cuda
out["cuda_available"] = torch.cuda.is_available()
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 2),
               multiprocessors=p.multi_processor_count, bf16=torch.cuda.is_bf16_supported())
print("ENV " + json.dumps(out))
"""


class Log:
    """Prints and appends to gpu_check.log, one lock for the stage reader thread and the main thread."""

    def __init__(self, path: Path):
        self.file = path.open("a", buffering=1)
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            print(line, flush=True)
            self.file.write(line + "\n")


class Check:
    def __init__(self, out: Path, smoke: bool, budget: float, log: Log, fault: tuple[str, ...] = ()):
        self.out, self.smoke, self.budget, self.log = out, smoke, budget, log
        self.t0 = time.monotonic()
        self.data: dict = {"smoke": smoke, "budget_s": budget, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                           "install": None, "env": None, "stages": []}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        # TRITON_INTERPRET set either way: tests/test_kernels.py sets it to 1 at import unless set, and pytest imports
        # every test module, so on a GPU it would turn later @triton.jit kernels into interpreted ones
        self.env["TRITON_INTERPRET"] = "1" if smoke else "0"
        if smoke:
            self.env["CUDA_VISIBLE_DEVICES"] = ""
        self.fault = tuple(fault)  # (tests) stages handed a deliberately wrong method: LOWMEM_BENCH_FAULT=1 in their process
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))  # stage folders: only the merged files go to --out
        # bench/ on the path of every stage: the pytest stage loads bench/pytest_results.py as a plugin
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "bench"), self.env.get("PYTHONPATH")]))

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    # ------------------------------------------------------------------------------------ output

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        report.write(self.out, "gpu_check", self.data, self.markdown())

    def markdown(self) -> str:
        d = self.data
        lines = [f"# GPU check{' (smoke: CPU, tiny sizes)' if d['smoke'] else ''}", "",
                 f"started {d['started']}, {d.get('elapsed_s', 0):.0f} s of a {d['budget_s']:.0f} s budget", ""]
        env = d["env"] or {}
        if env:
            pk = env.get("packages", {})
            rows = [["GPU", env.get("gpu", "none (CUDA not available)")], ["capability", env.get("capability")],
                    ["GPU memory GiB", env.get("gpu_memory_gib")], ["driver", env.get("driver")],
                    ["python", env.get("python")], ["torch CUDA", env.get("torch_cuda")], ["git", env.get("git")]]
            rows += [[k, v if v else "not installed"] for k, v in pk.items()]
            lines += [report.table(["environment", ""], rows), ""]
        if d["install"]:
            lines += [report.table(["install step", "status", "s"],
                                   [[s["what"], s["status"], s["seconds"]] for s in d["install"]]), ""]
        lines += [report.table(["stage", "status", "s", "budget s", "reason"],
                               [[s["name"], s["status"], s["seconds"], s["budget_s"], s.get("reason", "")] for s in d["stages"]]), ""]
        for i, s in enumerate(d["stages"], 1):
            lines += [f"## {i}. {s['title']}: {s['status']}", ""]
            if s.get("markdown"):
                lines += [s["markdown"], ""]
            if s.get("tail"):
                lines += ["```", s["tail"], "```", ""]
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------ steps

    def run_logged(self, cmd: list[str], timeout: float, on_poll=None) -> tuple[int | None, str]:
        """Run ``cmd`` in its own process group; every line goes to the log. (rc or None on timeout, tail)."""
        self.log(f"$ {' '.join(a if len(a) < 120 else a[:40] + '...' for a in cmd)}   (budget {timeout:.0f} s)")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
        tail: list[str] = []

        def pump() -> None:
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                del tail[:-40]
                self.log(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        start, rc = time.monotonic(), None
        while True:
            try:
                rc = proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                if on_poll:
                    on_poll()
                if time.monotonic() - start > timeout:
                    self.log(f"!! over budget ({timeout:.0f} s): stopping process group {proc.pid}")
                    _stop(proc)
                    rc = None
                    break
        reader.join(timeout=5)
        return rc, "\n".join(tail[-15:])

    def install(self, wheels: Path) -> bool:
        """The carried wheels into a folder first on PYTHONPATH, then the project (editable); nothing fetched."""
        steps: list[dict] = []
        self.data["install"] = steps
        whls = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
        site = Path(tempfile.gettempdir()) / "lowmem_vt_site"

        def step(what: str, cmd: list[str]) -> bool:
            t = time.monotonic()
            rc, tail = self.run_logged(cmd, max(self.left(), 1.0))
            steps.append({"what": what, "status": "ok" if rc == 0 else "failed", "seconds": round(time.monotonic() - t, 1),
                          **({} if rc == 0 else {"tail": tail})})
            self.save()
            return rc == 0

        ok = True
        if whls:
            ok = step(f"{len(whls)} carried wheels -> {site}", [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                      "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, whls)])
            if ok:
                self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), self.env.get("PYTHONPATH")]))
        else:
            self.log(f"no wheels in {wheels}: stages that need bitsandbytes, trl or liger-kernel will skip")
        return step("the project, editable, no dependencies", [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                                               "--no-build-isolation", "-e", str(ROOT)]) and ok

    def probe_env(self) -> None:
        rc, tail = self.run_logged([PY, "-c", ENV_PROBE, *PACKAGES], 60)
        env = {}
        for line in tail.splitlines():
            if line.startswith("ENV "):
                env = json.loads(line[4:])
        if not env:
            env = {"error": f"environment probe failed (rc {rc})"}
        if shutil.which("nvidia-smi") and not self.smoke:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True)
            env["driver"] = q.stdout.strip() or None
        if shutil.which("git"):  # the device machine gets a copy of the tree, perhaps without .git
            git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
            env["git"] = git.stdout.strip() or None
        self.data["env"] = env
        self.save()

    def run_stage(self, stage: Stage) -> None:
        rec = {"name": stage.name, "title": stage.title, "budget_s": stage.budget_s, "seconds": 0.0}
        self.data["stages"].append(rec)
        left = self.left()
        if left < MIN_STAGE_S:
            rec.update(status="not_run", reason=f"budget spent ({left:.0f} s left)")
            self.save()
            return
        d = self.work / stage.name
        d.mkdir(parents=True, exist_ok=True)
        budget = min(stage.budget_s * (SMOKE_SLOWER if self.smoke else 1.0), left)
        self.log(f"\n=== {stage.name}: {stage.title} ({budget:.0f} s)")
        rec.update(status="running")
        t = time.monotonic()
        self.env["GPU_CHECK_TESTS_JSONL"] = str(d / "tests.jsonl")
        self.env.pop("LOWMEM_BENCH_FAULT", None)
        if stage.name in self.fault:
            self.env["LOWMEM_BENCH_FAULT"] = "1"

        def collect() -> None:
            rec["seconds"] = round(time.monotonic() - t, 1)
            if stage.script is None:
                tests_report(d)
            res, md = d / f"{stage.result_name}.json", d / f"{stage.result_name}.md"
            if res.is_file():
                try:
                    rec["result"] = json.loads(res.read_text())
                except json.JSONDecodeError:  # written without report.write (not atomic): next poll
                    pass
            if md.is_file():
                rec["markdown"] = md.read_text().strip()
            self.save()

        rc, tail = self.run_logged(stage.command(d, self.smoke), budget, on_poll=collect)
        collect()
        result = rec.get("result")
        skips = skipped_parts(result)
        if rc is None:
            rec.update(status="timeout", reason=f"stopped at its {budget:.0f} s budget", tail=tail)
        elif stage.script is None and rc == 5:
            rec.update(status="failed", reason="no test is marked gpu: pytest collected nothing")
        elif rc != 0:
            rec.update(status="failed", reason=f"exit code {rc}", tail=tail)
        elif result is None:
            rec.update(status="failed", reason=f"no {stage.result_name}.json written", tail=tail)
        elif skips and not self.smoke:
            # the GPU machine has a GPU, torchvision, and the carried wheels: nothing there has a reason to skip
            rec.update(status="failed", reason="skipped on the GPU machine, which should not need to: " + "; ".join(skips))
        elif result.get("skipped") or (stage.script is None and not result["counts"]["passed"]):
            rec.update(status="skipped", reason="expected off the GPU machine: " + "; ".join(skips))
        else:
            rec.update(status="ok", **({"reason": "expected off the GPU machine: " + "; ".join(skips)} if skips else {}))
        self.save()
        self.log(f"=== {stage.name}: {rec['status']} in {rec['seconds']:.0f} s {rec.get('reason', '')}")


def skipped_parts(result: dict | None) -> list[str]:
    """What a stage's result says it skipped: the whole stage (bench/report.py's ``skip``), methods of its table
    (loss_head's rows: ``skipped: why``), or tests (cuda_tests' counts)."""
    if not result:
        return []
    out = [result["skipped"]] if result.get("skipped") else []
    out += [f"{r.get('method')}: {r['note'].removeprefix('skipped: ')}" for r in result.get("rows", [])
            if isinstance(r, dict) and str(r.get("note", "")).startswith("skipped: ")]
    why: dict[str, int] = {}
    for t in result.get("tests", []):
        if t.get("outcome") == "skipped":
            why[t["message"]] = why.get(t["message"], 0) + 1
    out += [f"{n} test{'s' if n > 1 else ''}: {message}" for message, n in why.items()]
    return out


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the stage's process group, SIGKILL what is left after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tests_report(d: Path) -> None:
    """bench/pytest_results.py's lines -> cuda_tests.json / .md: each test's outcome, seconds and message; a
    test that started and has no outcome was running when the stage stopped."""
    log = d / "tests.jsonl"
    if not log.is_file():
        return
    tests: dict[str, dict] = {}
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if rec["outcome"] == "started":
            tests.setdefault(rec["test"], {"test": rec["test"], "outcome": "running", "seconds": None, "message": ""})
        else:
            tests[rec["test"]] = rec
    counts = {k: 0 for k in ("passed", "failed", "error", "skipped", "running")}
    for rec in tests.values():
        counts[rec["outcome"]] += 1
    rows = [[r["test"], r["outcome"], r["seconds"], r["message"]] for r in tests.values()]
    summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    report.write(d, "cuda_tests", {"counts": counts, "tests": list(tests.values())},
                 f"{summary}\n\n{report.table(['test', 'outcome', 's', 'message'], rows)}")


def carry_size_mib(wheels: Path) -> float:
    """What the device tool moves: tracked and untracked-not-ignored files, plus the wheels folder."""
    ls = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "-c", "-o", "--exclude-standard"], capture_output=True,
                        text=True, check=True)
    files = [ROOT / f for f in ls.stdout.split("\0") if f]
    files += list(wheels.rglob("*")) if wheels.is_dir() else []
    return sum(f.stat().st_size for f in files if f.is_file()) / 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "out" / "gpu_check"))
    p.add_argument("--smoke", action="store_true", help="every stage at tiny sizes on CPU")
    p.add_argument("--install", action="store_true", help="install the carried wheels and the project first")
    p.add_argument("--wheels", default=str(ROOT / "wheels"), help="folder of carried wheels (make gpu-wheels)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run, install included "
                                                                "(480; with --smoke 3 x that)")
    p.add_argument("--only", nargs="+", choices=[s.name for s in STAGES], help="run these stages only")
    p.add_argument("--fault", nargs="+", default=[], choices=[s.name for s in STAGES],
                   help="(tests) hand these stages a deliberately wrong method: they must fail. "
                        + "; ".join(f"{s.name}: {s.fault}" for s in STAGES))
    p.add_argument("--carry-size", action="store_true", help="print what the device tool would move (MiB) and exit; "
                                                             f"non-zero above {CARRY_LIMIT_MIB} MiB")
    args = p.parse_args(argv)
    cpu_only = [s.name for s in STAGES if s.name in args.fault and s.fault_needs_cuda and args.smoke]
    if cpu_only:  # accepted only where the stage can fail: on CPU these run no head, their wrong method shows nowhere
        p.error(f"--fault {' '.join(cpu_only)}: the wrong head runs only on a CUDA GPU (on CPU the doctor checks no head "
                "and every gpu test skips); give it without --smoke on the GPU machine")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.carry_size:
        mib = carry_size_mib(Path(args.wheels))
        print(f"working tree + {args.wheels}: {mib:.1f} MiB (limit {CARRY_LIMIT_MIB} MiB)")
        return 0 if mib <= CARRY_LIMIT_MIB else 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("gpu_check.json", "gpu_check.md", "gpu_check.log"):
        (out / name).unlink(missing_ok=True)
    log = Log(out / "gpu_check.log")
    budget = args.budget if args.budget is not None else 480.0 * (SMOKE_SLOWER if args.smoke else 1.0)
    check = Check(out, args.smoke, budget, log, fault=args.fault)
    installed = not args.install or check.install(Path(args.wheels))
    if not installed:
        log("!! install failed: the stages run anyway and will say what is missing; the check fails")
    check.probe_env()
    env = check.data["env"]
    log(f"GPU: {env.get('gpu', 'none')} (capability {env.get('capability')}, {env.get('gpu_memory_gib')} GiB, "
        f"driver {env.get('driver')}); python {env.get('python')}; torch CUDA {env.get('torch_cuda')}")
    log("packages: " + ", ".join(f"{k} {v or '-'}" for k, v in env.get("packages", {}).items()))
    blocked = None
    for stage in STAGES:
        if args.only and stage.name not in args.only and stage.name != "environment":
            continue
        if blocked:
            check.data["stages"].append({"name": stage.name, "title": stage.title, "budget_s": stage.budget_s,
                                         "seconds": 0.0, "status": "not_run", "reason": blocked})
            continue
        check.run_stage(stage)
        rec = check.data["stages"][-1]
        if stage.name == "environment" and rec["status"] != "ok":
            missing = [f"{f['what']}: {f['detail']}" for f in (rec.get("result") or {}).get("findings", []) if not f["ok"]]
            blocked = "environment: " + ("; ".join(missing) or rec.get("reason", "failed"))
            log(f"!! {blocked}")
    check.save()
    shutil.rmtree(check.work, ignore_errors=True)
    check.save()
    log("\n" + report.table(["stage", "status", "s", "reason"],
                            [[s["name"], s["status"], s["seconds"], s.get("reason", "")] for s in check.data["stages"]]))
    log(f"results: {out / 'gpu_check.md'}, {out / 'gpu_check.json'}; {check.data['elapsed_s']:.0f} s")
    bad = [s["name"] for s in check.data["stages"] if s["status"] in ("failed", "timeout")]
    return 1 if bad or not installed else 0


if __name__ == "__main__":
    sys.exit(main())
