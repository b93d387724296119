"""`diffalign config`: the key list is generated from the config models and stays complete."""

from __future__ import annotations

from diffalign.config import RunConfig
from diffalign.configdoc import DESCRIPTIONS, config_keys, format_keys


def test_every_key_is_listed_with_type_default_and_description():
    rows = config_keys()
    keys = {r["key"] for r in rows}
    for section in ("model", "data", "train"):
        model = RunConfig.model_fields[section].annotation
        for name in model.model_fields:
            assert f"{section}.{name}" in keys
    for r in rows:
        if not r["key"].startswith("objective."):
            assert r["type"] and r["default"] and r["description"], r
    assert set(DESCRIPTIONS) <= keys | {k for k in DESCRIPTIONS if k.split(".")[0] not in RunConfig.model_fields}
    text = format_keys(rows)
    assert "train.mixed_precision" in text and "no | fp16 | bf16 = 'no'" in text
    assert "objective (name: dpo" in text and "objective.beta" in text


def test_config_command_prints_the_keys(capsys):
    from diffalign.cli import main

    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "data.prompt_dropout" in out and "float (>= 0, <= 1) = 0.2" in out
