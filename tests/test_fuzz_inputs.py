"""Property-based fuzzing of what a careless user types (issue #23): recipes, overrides and the arguments of every
subcommand. The invariant, for any input: status 0 with a consistent run folder (or results), or status 2 with one
``error:`` line and nothing written; never a traceback, never a changed input. The CLI runs in-process; examples
are few and derandomized (the same ones every run: a failure reproduces), so the whole module stays within ~1 min
on 2 cores. To search harder: LOWMEM_FUZZ_RANDOM=1 LOWMEM_FUZZ_EXAMPLES=150 LOWMEM_FUZZ_RUNS=40 (LOWMEM_FUZZ_TIMES=1
prints each example with its time and status)."""

import contextlib
import dataclasses
import io
import json
import os
import shutil
import typing
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lowmem_vt import checkpoint as ckpt  # noqa: E402
from lowmem_vt.cli import main  # noqa: E402
from lowmem_vt.config import RecipeConfig  # noqa: E402

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))


def tree_digest(*paths) -> dict:
    """Every file under ``paths`` (links not followed) with its SHA-256."""
    import hashlib

    out = {}
    for root in map(Path, paths):
        if root.is_symlink():
            out[str(root)] = "link:" + os.readlink(root)
            continue
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath, name)
                if p.is_symlink():
                    out[str(p)] = "link:" + os.readlink(p)
                elif p.is_file():
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
                else:
                    out[str(p)] = "dir"
    return out

ROOT = Path(__file__).resolve().parents[1]
DEMO = (ROOT / "recipes" / "demo_tiny.yaml").read_text()
FUZZ = settings(max_examples=int(os.environ.get("LOWMEM_FUZZ_EXAMPLES", "40")), deadline=None, derandomize=os.environ.get("LOWMEM_FUZZ_RANDOM") is None,
                database=None, suppress_health_check=list(HealthCheck))


def _leaf_keys(cls=RecipeConfig, prefix="") -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_leaf_keys(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


KEYS = _leaf_keys()
# raw override values: wrong types, non-finite and out-of-range numbers, broken YAML, paths that lead nowhere or
# somewhere they must not, text that is not UTF-8; and a few valid small values (a run must then work)
HOSTILE = ["", " ", "0", "-1", "1", "2", "1e400", ".nan", ".inf", "-.inf", "1e300", "100000000000000000000", "2.5", "-0.0",
           "true", "null", "~", "[]", "{}", "[1]", "[q_proj]", "{a: 1}", "[", "{", "'", "&a [*a]", "!!python/object/apply:os.system [ls]",
           "é", "\udcff", "x" * 3000, ".", "..", "/", "/dev/null", "/proc/self", "../..", "no/such/dir", "owner/name", "a:b",
           "tiny:", "0x10", "1_000", "/dev/zero", "fifo", "/proc/lowmem_vt_fuzz", "out\tx", "http://127.0.0.1:9/x.png"]


def _literal_values(tp) -> list[str]:
    if typing.get_origin(tp) is typing.Literal:
        return [str(a) for a in typing.get_args(tp)]
    if typing.get_origin(tp) is list and typing.get_origin(typing.get_args(tp)[0]) is typing.Literal:
        return ["[" + a + "]" for a in _literal_values(typing.get_args(tp)[0])]
    return []


def _value_for(key: str):
    return st.sampled_from(HOSTILE + _literal_values(KEYS[key]))


KEY_MUTATION = st.sampled_from(sorted(KEYS)).flatmap(lambda k: st.tuples(st.just(k), _value_for(k)))
# a section given as a mapping (``train={max_steps: 1}``: it changes only the keys it names), or as something else
SECTION_MUTATION = st.one_of(
    st.sampled_from(sorted(k for k in KEYS if "." in k)).flatmap(
        lambda k: st.tuples(st.just(k.split(".")[0]), _value_for(k).map(lambda v, leaf=k.split(".", 1)[1]: f"{{{leaf}: {v}}}"))),
    st.tuples(st.sampled_from(sorted({k.split(".")[0] for k in KEYS if "." in k})), st.sampled_from(["null", "3", "{}", "[]", "{nope: 1}"])),
)
MUTATION = st.one_of(KEY_MUTATION, SECTION_MUTATION)


# ------------------------------------------------------------------- overrides change only what they name


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _candidates(key: str) -> list:
    """Values a key accepts by type: its default, and each choice of a Literal (or a list of them)."""
    default = _flat(dataclasses.asdict(RecipeConfig()))[key]
    tp = KEYS[key]
    choices = list(typing.get_args(tp)) if typing.get_origin(tp) is typing.Literal else []
    if typing.get_origin(tp) is list and typing.get_origin(typing.get_args(tp)[0]) is typing.Literal:
        choices = [[a] for a in typing.get_args(typing.get_args(tp)[0])]
    return [default, *choices, *([not default] if isinstance(default, bool) else [])]


@st.composite
def _overrides(draw) -> tuple[list[str], dict]:
    """1-3 overrides, each ``key.sub=value`` or ``section={key: value, ...}`` (JSON is a YAML flow value), and the
    value each named key ends with (the last one given wins)."""
    sections = sorted({k.split(".")[0] for k in KEYS if "." in k})
    args, named = [], {}
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            section = draw(st.sampled_from(sections))
            keys = draw(st.lists(st.sampled_from(sorted(k for k in KEYS if k.startswith(section + "."))), max_size=3, unique=True))
            values = {k: draw(st.sampled_from(_candidates(k))) for k in keys}
            args.append(f"{section}={json.dumps({k.split('.', 1)[1]: v for k, v in values.items()})}")
        else:
            key = draw(st.sampled_from(sorted(KEYS)))
            values = {key: draw(st.sampled_from(_candidates(key)))}
            args.append(f"{key}={json.dumps(values[key])}")
        named.update(values)
    return args, named


@FUZZ
@given(overrides=_overrides())
def test_an_override_changes_only_the_keys_it_names(overrides):
    """For any override of the recipe schema, every key not named keeps the recipe's value: in the merged mapping,
    and in the validated recipe whenever it validates."""
    from lowmem_vt.config import ConfigError, apply_overrides, load_config, to_dict, yaml_load

    args, named = overrides
    recipe = yaml_load(DEMO)
    merged = _flat(apply_overrides(recipe, args))
    before = _flat(recipe)
    assert recipe == yaml_load(DEMO)  # the recipe's own mapping is not changed
    for key in before.keys() | merged.keys():
        if key in named:
            assert merged[key] == named[key], (args, key)
        else:
            assert merged.get(key, "<absent>") == before.get(key, "<absent>"), (args, key)
    demo = str(ROOT / "recipes" / "demo_tiny.yaml")
    try:
        cfg = load_config(demo, args)
    except ConfigError:  # a combination validation refuses (e.g. data.source=sat with the default hub data)
        return
    ran, recipe_cfg = _flat(to_dict(cfg)), _flat(to_dict(load_config(demo)))
    assert {k: v for k, v in ran.items() if k not in named} == {k: v for k, v in recipe_cfg.items() if k not in named}, args


def _recipe_text(kind: str) -> bytes:
    """The demo recipe, as written or damaged the ways a recipe file gets damaged."""
    text = DEMO
    return {
        "demo": text.encode(),
        "duplicate section": (text + "train:\n  max_steps: 3\n").encode(),
        "latin-1": (text + "# café\n").encode("latin-1"),
        "utf-16": text.encode("utf-16"),
        "list": b"- model\n- train\n",
        "alias bomb": (text + BOMB.replace("a:", "zz:", 1)).encode(),
        "truncated": text[: len(text) // 2].encode(),
        "empty": b"",
        "tabs": text.replace("  ", "\t").encode(),
        "nul": text.replace("model:", "mo\x00del:").encode(),
    }[kind]


# "fifo" and "/dev/zero" are special files in place of the recipe: never opened (reading them would never end)
RECIPES = st.sampled_from(["demo", "demo", "demo", "duplicate section", "latin-1", "utf-16", "list", "alias bomb", "truncated",
                           "empty", "tabs", "nul", "fifo", "/dev/zero"])


def _base(tiny_dir) -> list[str]:
    return [f"model.name_or_path={tiny_dir}", "log.output_dir=out", "train.prompts_per_step=2", "grpo.num_generations=2",
            "train.micro_batch_size=4", "grpo.max_completion_length=2", "data.generated_samples=8", "train.max_steps=2",
            "log.save_steps=1", "log.progress_bar=false", "log.plot=false", "log.sample_every=1"]


@pytest.fixture(scope="module")
def one_step_run(tiny_dir, tmp_path_factory):
    """A run folder of one finished step (copied into the examples that start from an existing run)."""
    work = tmp_path_factory.mktemp("fuzz-run")
    with contextlib.chdir(work):
        assert main(["train", str(ROOT / "recipes" / "demo_tiny.yaml"), *_base(tiny_dir), "train.max_steps=1"]) == 0
    return work / "out"


def _run(argv: list[str]) -> tuple[int, str, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _assert_one_line(err: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err[-3000:]
    _assert_true_words(lines[0])


SPECIAL = ("/dev/zero", "fifo")  # files that exist, but are not regular files


def _assert_true_words(line: str) -> None:
    """A line about a special file does not call it missing."""
    if any(s in line for s in SPECIAL):
        assert "not found" not in line and "no such file" not in line and "does not exist" not in line, line


def _assert_recipe_is_what_ran(folder: Path, cfg) -> None:
    """The run folder's recipe.yaml holds every setting of the recipe with its overrides (the section overrides
    merged, not replacing their sections)."""
    import yaml

    from lowmem_vt.config import to_dict

    assert yaml.safe_load((folder / "recipe.yaml").read_text()) == to_dict(cfg)


def _assert_consistent_run(folder: Path) -> None:
    steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)), steps
    cps = ckpt.list_checkpoints(folder)
    assert cps and int(cps[-1].name.split("-")[1]) == steps[-1]
    for p in cps:
        ckpt.verify_checkpoint(p)
    assert not list(folder.glob(".tmp-checkpoint-*")) and not (folder / ckpt.LOCK_FILE).exists()
    assert isinstance(json.loads(json.dumps(str((folder / "recipe.yaml").read_text()))), str)


def _existing_run(work: Path, one_step_run: Path, kind: str | None) -> None:
    """out/ as the example finds it: absent, a finished run, or a run holding a link into a sibling run (other/),
    a checkpoint-7 (which --resume latest would pick) or its metrics.jsonl (which a resume would truncate)."""
    if kind is None:
        return
    shutil.copytree(one_step_run, work / "out")
    if kind == "run":
        return
    shutil.copytree(one_step_run, work / "other")
    if kind == "linked checkpoint":
        (work / "out" / "checkpoint-7").symlink_to(work / "other" / "checkpoint-1")
    else:
        (work / "out" / "metrics.jsonl").unlink()
        (work / "out" / "metrics.jsonl").symlink_to(work / "other" / "metrics.jsonl")


@FUZZ
@given(recipe=RECIPES, mutations=st.lists(MUTATION, min_size=0, max_size=3),
       flags=st.sampled_from([[], [], ["--overwrite"], ["--resume", "latest"], ["--resume", "out/checkpoint-1"]]),
       existing=st.sampled_from([None, "run", "run", "linked checkpoint", "linked log"]))
# the shapes of issue #29, always tried: a section override that trains, links into a sibling run, special files
@example(recipe="demo", mutations=[("train", "{max_steps: 1, warmup_steps: 1}")], flags=[], existing=None)
@example(recipe="demo", mutations=[], flags=["--resume", "latest"], existing="linked checkpoint")
@example(recipe="demo", mutations=[], flags=["--resume", "latest"], existing="linked log")
@example(recipe="demo", mutations=[], flags=["--overwrite"], existing="linked checkpoint")
@example(recipe="demo", mutations=[("data", "{source: sat, path: fifo}")], flags=[], existing=None)
@example(recipe="demo", mutations=[("data.source", "sat"), ("data.path", "/dev/zero")], flags=[], existing=None)
@example(recipe="fifo", mutations=[], flags=[], existing=None)
@example(recipe="demo", mutations=[("log.output_dir", "/proc/lowmem_vt_fuzz")], flags=[], existing=None)
def test_train_never_crashes_never_mixes_never_overwrites(tiny_dir, tmp_path_factory, one_step_run, recipe, mutations, flags, existing):
    work = tmp_path_factory.mktemp("fuzz")
    recipe_file = work / "recipe.yaml"  # the name a run writes into its folder: log.output_dir=. must not take it
    os.mkfifo(work / "fifo")
    if recipe == "fifo":
        os.mkfifo(recipe_file)
    elif recipe == "/dev/zero":
        recipe_file = Path("/dev/zero")
    else:
        recipe_file.write_bytes(_recipe_text(recipe))
    _existing_run(work, one_step_run, existing)
    other = tree_digest(work / "other")
    overrides = _base(tiny_dir) + [f"{k}={v}" for k, v in mutations]
    inputs = tree_digest(recipe_file, tiny_dir)
    before = tree_digest(work)
    import time
    t0 = time.perf_counter()
    with contextlib.chdir(work):
        rc, out, err = _run(["train", str(recipe_file), *overrides, *flags])
        if os.environ.get("LOWMEM_FUZZ_TIMES"):
            print(f"\n{time.perf_counter() - t0:6.1f}s rc={rc} {recipe} {mutations} {flags} {existing} "
                  f"{err.strip().splitlines()[-1][:150] if err.strip() else ''}")
        assert rc in (0, 2), (rc, err[-3000:])
        if rc == 2:
            _assert_one_line(err)
            assert tree_digest(work) == before  # refused: nothing written, nothing moved
        else:
            assert "Traceback" not in err
            from lowmem_vt.config import load_config

            cfg = load_config(str(recipe_file), overrides)
            folder = Path(cfg.log.output_dir)
            if (folder / "metrics.jsonl").is_file() and (folder / "metrics.jsonl").stat().st_size:
                _assert_consistent_run(folder)
                _assert_recipe_is_what_ran(folder, cfg)
    assert tree_digest(recipe_file, tiny_dir) == inputs  # never a changed input
    assert tree_digest(work / "other") == other  # never a sibling run, through a link
    shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------- the other subcommands

PATHS = ["", ".", "/", "/dev/null", "no/such/thing", "\udcff", "{empty}", "{file}", "{junk}", "{loop}", "{dangling}", "{tiny}",
         "{checkpoint}", "{adapter}", "{data}", "{metrics}", "{new}", "/dev/zero", "{fifo}", "{linked checkpoint}",
         "{checkpoint with a link out}", "{other base}", "/proc/lowmem_vt_fuzz"]
NUMBERS = ["0", "-1", "1", "nan", "inf", "1e400", "abc", "2", "0.5", "100000000000"]


def _arg(kind: str, w: Path, tiny_dir: Path, run: Path) -> str:
    return {"{empty}": str(w / "empty"), "{file}": str(w / "file.txt"), "{junk}": str(w / "junk"), "{loop}": str(w / "loop"),
            "{dangling}": str(w / "dangling"), "{tiny}": str(tiny_dir), "{checkpoint}": str(run / "checkpoint-1"),
            "{adapter}": str(run / "checkpoint-1" / "adapter"), "{data}": str(w / "cv"), "{metrics}": str(run / "metrics.jsonl"),
            "{new}": str(w / "new" / "folder"), "{recipe}": str(ROOT / "recipes" / "demo_tiny.yaml"), "{fifo}": str(w / "fifo"),
            "{linked checkpoint}": str(w / "linked-checkpoint"), "{checkpoint with a link out}": str(w / "cp-link-out"),
            "{other base}": str(w / "other-base")}.get(kind, kind.replace("{tiny}", str(tiny_dir)))


# per subcommand: an argument list that works, and the hostile values each option may take instead
COMMANDS = {
    "merge": ([("--checkpoint", "{checkpoint}"), ("--out", "{new}")],
              {"--checkpoint": PATHS, "--out": PATHS, "--model": PATHS, "--dtype": ["float32", "int8"], "--device": ["cpu", "cuda", "tpu"],
               "--allow-other-base": [None]}),
    "eval": ([("--model", "{tiny}"), ("--data", "{data}"), ("--out", "{new}"), ("--limit", "2"), ("--max-new-tokens", "2"),
              ("--device", "cpu"), ("--no-progress", None)],
             {"--checkpoint": PATHS, "--model": PATHS, "--data": PATHS, "--out": PATHS, "--limit": NUMBERS, "--batch-size": NUMBERS,
              "--max-new-tokens": NUMBERS, "--backend": ["hf", "engine", "vllm", "x"], "--device": ["cpu", "cuda"],
              "--min-pixels": NUMBERS, "--max-pixels": NUMBERS, "--allow-other-base": [None]}),
    "plot": ([("", "{metrics}"), ("--out", "{new}")], {"": PATHS, "--out": PATHS, "--smoothing": NUMBERS}),
    "plan": ([("", "{recipe}"), ("", "model.name_or_path={tiny}"), ("--gpu-gib", "24")],
             {"": PATHS + ["train.max_steps=[", "grpo.temperature=.inf", "model.name_or_path=/nowhere", "lora.r=100000"],
              "--gpu-gib": NUMBERS}),
    "build-tiny": ([("", "{new}")], {"": PATHS}),
}


def _command(name: str):
    """The working argument list with one or two of its options replaced, dropped or added with hostile values."""
    base, hostile = COMMANDS[name]
    change = st.tuples(st.sampled_from(sorted(hostile)), st.one_of(st.none(), st.integers(0, 63)))

    def apply(changes):
        args = list(base)
        for opt, pick in changes:
            values = hostile[opt]
            at = [i for i, (o, _) in enumerate(args) if o == opt]
            if pick is None and at:
                del args[at[0]]  # dropped
                continue
            value = values[pick % len(values)] if pick is not None else values[0]
            if at:
                args[at[0]] = (opt, value)
            else:
                args.append((opt, value))
        return name, args

    return st.lists(change, min_size=0, max_size=2).map(apply)


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory, one_step_run):
    from lowmem_vt.cvbench import generate_cvbench_records
    from lowmem_vt.data import write_parquet

    w = tmp_path_factory.mktemp("fuzz-cli")
    write_parquet(generate_cvbench_records(2, size=56), w / "cv" / "test.parquet")
    return w


@FUZZ
@given(command=st.sampled_from(sorted(COMMANDS)).flatmap(_command))
@example(command=("merge", [("--checkpoint", "{checkpoint}"), ("--out", "{new}"), ("--model", "{other base}")]))
@example(command=("eval", [("--checkpoint", "{linked checkpoint}"), ("--model", "{other base}"), ("--data", "{data}"),
                           ("--out", "{new}"), ("--device", "cpu"), ("--no-progress", None)]))
@example(command=("merge", [("--checkpoint", "{checkpoint with a link out}"), ("--out", "{new}")]))
@example(command=("eval", [("--model", "{tiny}"), ("--data", "/dev/zero"), ("--out", "{new}"), ("--device", "cpu")]))
@example(command=("plot", [("", "{fifo}")]))
def test_subcommands_never_crash_never_overwrite(tiny_dir, tmp_path_factory, one_step_run, cli_inputs, command):
    name, options = command
    w = tmp_path_factory.mktemp("fuzz-cmd")
    shutil.copytree(cli_inputs / "cv", w / "cv")
    (w / "empty").mkdir()
    (w / "file.txt").write_text("mine")
    (w / "junk").mkdir()
    (w / "junk" / "notes.txt").write_text("mine")
    (w / "loop").symlink_to(w / "loop")
    (w / "dangling").symlink_to(w / "nowhere")
    os.mkfifo(w / "fifo")  # opening it for reading would wait for ever
    run = w / "run"
    shutil.copytree(one_step_run, run)
    (w / "linked-checkpoint").symlink_to(run / "checkpoint-1")  # a link the user names is followed
    shutil.copytree(run / "checkpoint-1", w / "cp-link-out")  # one whose file leads out of it is refused
    (w / "cp-link-out" / ckpt.STATE_FILE).unlink()
    (w / "cp-link-out" / ckpt.STATE_FILE).symlink_to(run / "checkpoint-1" / ckpt.STATE_FILE)
    shutil.copytree(tiny_dir, w / "other-base")  # the checkpoint's base with other weights: refused by eval and merge
    weights = w / "other-base" / "model.safetensors"
    with open(weights, "r+b") as f:  # bytes inside a block the base's fingerprint samples (base_identity)
        f.seek(weights.stat().st_size // 2)
        f.write(bytes(16))
    argv = [name]
    for opt, kind in options:
        value = None if kind is None else _arg(kind, w, tiny_dir, run)
        argv += [value] if opt == "" else [opt] if value is None else [opt, value]
    inputs = tree_digest(tiny_dir, run, w / "cv", w / "file.txt", w / "junk")
    before = tree_digest(w)
    import time
    t0 = time.perf_counter()
    with contextlib.chdir(w):
        rc, out, err = _run(argv)
    if os.environ.get("LOWMEM_FUZZ_TIMES"):
        print(f"\n{time.perf_counter() - t0:6.1f}s rc={rc} {argv} {err.strip().splitlines()[-1][:150] if err.strip() else ''}")
    assert rc in (0, 1, 2), (argv, rc, err[-3000:])
    if rc == 2:
        _assert_one_line(err)
        assert tree_digest(w) == before, argv  # refused: nothing written
    given = dict(options)
    if rc == 0 and given.get("--checkpoint") in ("{checkpoint}", "{linked checkpoint}") and given.get("--model") == "{other base}":
        assert "--allow-other-base" in given, argv  # an adapter on another base only for someone who says so
    assert "Traceback" not in err
    after = tree_digest(tiny_dir, run, w / "cv", w / "file.txt", w / "junk")
    changed = {k for k in inputs if inputs[k] != after.get(k)}
    assert not changed, (argv, changed)  # never a changed input (eval's results may be added to a checkpoint's cvbench/)
    shutil.rmtree(w, ignore_errors=True)


# values at the edges of what a recipe accepts (and paths a run may use): a run must then train and leave a
# consistent folder, whatever the combination
EDGE = {
    "log.output_dir": ["out", ".", "a b/é ü", "deep/er/than/this", "./out/../out2"],
    "train.learning_rate": ["1", "1e-12"], "grpo.temperature": ["0.01", "100"], "grpo.beta": ["0", "100"],
    "train.max_grad_norm": ["0", "1e300"], "lora.r": ["1"], "lora.alpha": ["65536", "1"], "rollout.top_k": ["1", "1000000000000000"],
    "rollout.top_p": ["1e-9", "1"], "train.seed": ["0", "4294967295"], "data.seed": ["4294967295"], "train.warmup_steps": ["1000000000000000"],
    "log.sample_every": ["0", "1000000000000000"], "log.keep_checkpoints": ["1"], "log.save_steps": ["1000000000000000"],
    "train.max_bad_steps": ["1"], "grpo.num_iterations": ["2"], "grpo.epsilon_high": ["10", "0"], "grpo.epsilon": ["0", "0.999"],
    "grpo.loss_type": ["dr_grpo", "bnpo"], "grpo.scale_rewards": ["false"], "train.lr_scheduler": ["cosine", "linear"],
    "train.weight_decay": ["1"], "train.adam_beta1": ["0"], "train.adam_beta2": ["0.999999"], "data.max_samples": ["8", "1000000000000"],
    "data.max_pixels": ["268435456", "3136"], "data.min_pixels": ["1"], "data.generated_image_size": ["28", "2048"],
    "data.shuffle_options": ["false"], "rewards.funcs": ["[format]", "[accuracy, accuracy]"], "rewards.reflection_words": ["[]", "['(', '*']"],
    "grpo.max_prompt_length": ["130"], "model.gradient_checkpointing": ["false"], "lora.dropout": ["0.5"],
    "lora.target_modules": ["[down_proj]", "[q_proj, q_proj]"], "kernels": ["torch"], "rollout.backend": ["engine"],
}
EDGE_MUTATION = st.sampled_from(sorted(EDGE)).flatmap(lambda k: st.tuples(st.just(k), st.sampled_from(EDGE[k])))


@settings(FUZZ, max_examples=int(os.environ.get("LOWMEM_FUZZ_RUNS", "10")))
@given(mutations=st.lists(EDGE_MUTATION, min_size=1, max_size=4, unique_by=lambda m: m[0]))
def test_accepted_edge_values_train_a_consistent_run(tiny_dir, tmp_path_factory, mutations):
    work = tmp_path_factory.mktemp("edge")
    recipe_file = work / "r.yaml"
    recipe_file.write_text(DEMO)
    overrides = _base(tiny_dir) + [f"{k}={v}" for k, v in mutations]
    inputs = tree_digest(recipe_file, tiny_dir)
    with contextlib.chdir(work):
        rc, out, err = _run(["train", str(recipe_file), *overrides])
        if rc == 2:  # a combination pre-flight refuses is fine: one line, nothing written
            _assert_one_line(err)
            assert sorted(p.name for p in work.iterdir()) == ["r.yaml"]
        else:
            assert rc in (0, 3), (mutations, rc, err[-3000:])  # 3: stopped (non-finite steps), the last checkpoint intact
            from lowmem_vt.config import load_config

            folder = Path(load_config(str(recipe_file), overrides).log.output_dir)
            if rc == 0:
                _assert_consistent_run(folder)
            else:
                _assert_one_line(err)
    assert tree_digest(recipe_file, tiny_dir) == inputs
    shutil.rmtree(work, ignore_errors=True)
