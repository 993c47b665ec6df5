"""One source per default: every value a yaml in conf/ writes equals its schema's default (the
dataclass in bench/config.py, or the backend's constructor), so the two can never drift apart."""

from __future__ import annotations

import enum

import pytest
from conftest import ROOT
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

SCHEMA_GROUPS = ("attention", "bench", "task")


def plain(value):
    return value.value if isinstance(value, enum.Enum) else value


def schema_default(path: str, key: str):
    node = ConfigStore.instance().load(path).node
    return plain(getattr(OmegaConf.to_object(node), key, "<not in the schema>"))


def written_values(yaml_path) -> dict:
    values = OmegaConf.to_container(OmegaConf.load(yaml_path))
    values.pop("defaults", None)
    return values


def schema_of(yaml_path) -> str:
    """'schema/attention/linformer.yaml' from the yaml's defaults entry '/schema/attention/linformer@_here_'."""
    (entry,) = [d for d in OmegaConf.load(yaml_path).defaults if str(d).startswith("/schema/")]
    return str(entry).removeprefix("/").split("@")[0] + ".yaml"


@pytest.mark.parametrize(
    "yaml_path",
    [p for g in SCHEMA_GROUPS for p in sorted((ROOT / "conf" / g).glob("*.yaml"))],
    ids=lambda p: f"{p.parent.name}/{p.stem}",
)
def test_group_yaml_defaults_equal_the_schema(yaml_path):
    """A group's default yaml (named like its schema) repeats the schema's defaults exactly; a
    preset (e.g. attention/linformer_lra) may differ, but only in keys the schema has."""
    group, name = yaml_path.parent.name, yaml_path.stem
    schema = schema_of(yaml_path)
    preset = schema != f"schema/{group}/{name}.yaml"
    for key, value in written_values(yaml_path).items():
        default = schema_default(schema, key)
        assert default != "<not in the schema>", f"{group}/{name}.yaml: {key} is not in {schema}"
        assert preset or value == default, f"{group}/{name}.yaml: {key}={value!r} but the schema says {default!r}"


def test_the_default_model_and_top_level_keys_equal_the_schema():
    from bench.config import Config, ModelConfig

    model = written_values(ROOT / "conf" / "model" / "small.yaml")
    assert model == {k: plain(v) for k, v in vars(ModelConfig()).items()}
    top = written_values(ROOT / "conf" / "config.yaml")
    top.pop("hydra")
    defaults = OmegaConf.to_container(OmegaConf.structured(Config), enum_to_str=True)
    for key, value in top.items():
        assert value == defaults[key], key
