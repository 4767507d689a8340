"""The sample serving config is current, valid, complete and explained: every field appears with its meaning."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel

from k2serve.config import FaultSpec, ServingConfig
from k2serve.config_example import example_yaml

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "serving-config.yaml"


def fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for name, field in model.model_fields.items():
        out.append((prefix + name, field.description))
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += fields(field.annotation, f"{prefix}{name}.")
    return out


def test_sample_is_current_and_loads_as_the_defaults() -> None:
    assert SAMPLE.read_text() == example_yaml(), "examples/serving-config.yaml is stale: run k2serve config > it"
    assert ServingConfig.load(SAMPLE) == ServingConfig()


def test_every_field_is_described_and_present() -> None:
    undescribed = [name for name, desc in fields(ServingConfig) + fields(FaultSpec, "faults[].") if not desc]
    assert undescribed == []
    data = yaml.safe_load(SAMPLE.read_text())
    for name, _ in fields(ServingConfig):
        node = data
        for part in name.split("."):
            assert part in node, name
            node = node[part]
    text = SAMPLE.read_text()
    assert all(f"{name}: " in text for name in FaultSpec.model_fields)  # the commented list entry
