import pytest

from lowmem_vt.config import ConfigError, load_config


def test_real_recipes_load():
    cfg = load_config("recipes/sat_lora.yaml")
    assert cfg.model.name_or_path == "Qwen/Qwen2-VL-2B"
    assert cfg.grpo.num_generations == 8 and cfg.grpo.beta == 0.04 and cfg.grpo.max_completion_length == 700
    assert cfg.completions_per_step == 64
    assert load_config("recipes/demo_tiny.yaml").data.source == "generated"


def test_overrides_are_typed():
    cfg = load_config("recipes/sat_lora.yaml", ["train.learning_rate=3e-5", "grpo.beta=0", "lora.target_modules=[q_proj]"])
    assert cfg.train.learning_rate == 3e-5 and cfg.grpo.beta == 0.0 and cfg.lora.target_modules == ["q_proj"]


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text,needle",
    [
        ("train:\n  learning_rat: 1e-5\n", "unknown key 'train.learning_rat'"),
        ("trainn:\n  x: 1\n", "unknown key 'trainn'"),
        ("grpo:\n  num_generations: eight\n", "key 'grpo.num_generations'"),
        ("grpo:\n  num_generations: 1\n", "key 'grpo.num_generations': must be >= 2"),
        ("train:\n  learning_rate: -1.0\n", "key 'train.learning_rate': must be in (0, 1]"),
        ("train:\n  micro_batch_size: 7\n", "key 'train.micro_batch_size': must divide"),
        ("grpo:\n  loss_type: ppo\n", "key 'grpo.loss_type'"),
        ("model:\n  gradient_checkpointing: 3\n", "key 'model.gradient_checkpointing'"),
        ("data:\n  path: ./no/such/file.parquet\n", "key 'data.path': local dataset path"),
        ("rewards:\n  funcs: [format, length]\n", "key 'rewards.funcs[1]'"),
    ],
)
def test_bad_recipes_name_file_and_key(tmp_path, text, needle):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert needle in str(err.value)
    assert str(p) in str(err.value)


def test_bad_override_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="grpo.temperature"):
        load_config("recipes/sat_lora.yaml", ["grpo.temperature=0"])


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config("recipes/nope.yaml")
