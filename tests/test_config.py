from pathlib import Path

import pytest

from fedft.config import build_config, describe_fields
from fedft.errors import ConfigError


def test_yaml_then_overrides_in_order(tmp_path: Path):
    file = tmp_path / "run.yaml"
    file.write_text("federation:\n  clients: 7\nmethod:\n  name: adapter\n  r: 4\n")
    cfg = build_config(file, ["federation.clients=50", "method.r=8", "train.lr=0.01"])
    assert cfg.federation.clients == 50
    assert cfg.method.name == "adapter"
    assert cfg.method_options().r == 8
    assert cfg.train.lr == 0.01


def test_defaults_are_the_documented_main_job():
    cfg = build_config()
    assert (
        cfg.model.name,
        cfg.data.source,
        cfg.federation.clients,
        cfg.data.partition,
        cfg.data.alpha,
        cfg.method.name,
    ) == (
        "minilm",
        "demo",
        10,
        "auto",  # dirichlet where the data has classes (the demo data has)
        0.5,
        "lora",
    )


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("federation.clientz=3", "federation.clientz: unknown field"),
        ("federation.clients=0", "federation.clients"),
        ("data.partition=random", "data.partition"),
        ("method.name=nope", "unknown method 'nope'"),
        ("method.rank=4", "method.rank: not an option of method 'lora' (its options: r, alpha"),
        ("oops", "write it as dotted.key=value"),
    ],
)
def test_wrong_field_or_value_names_it(override: str, needle: str):
    with pytest.raises(ConfigError, match=None) as info:
        build_config(overrides=[override])
    assert needle in str(info.value)


def test_every_field_has_help():
    text = describe_fields()
    for line in text.splitlines():
        if ":" in line and not line.rstrip().endswith(":"):
            assert "#" in line, line
    for field in (
        "federation:",
        "clients: 10",
        "alpha: 0.5",
        "[lora] LoRA rank",
        "[adapter] bottleneck width",
    ):
        assert field in text


def test_the_example_configs_are_valid():
    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
    assert len(examples) >= 2
    for path in examples:
        build_config(path)  # every field known, every value accepted
    cfg = build_config(examples[0].parent / "generate-cpu.yaml")
    assert cfg.task.system_prompt == "" and cfg.train.max_steps == 4
