"""Each objective is declared once: its dataclass fields are its options, and the config's objective section,
the validation and the objective built by the loop all come from them."""

import dataclasses

import pytest

from diffalign.config import ConfigError, load_config
from diffalign.objectives import OBJECTIVES, Objective, build_objective, options_model


def test_config_sections_are_generated_from_every_registered_objective(tmp_path):
    for name, cls in OBJECTIVES.items():
        fields = {f.name: f.default for f in dataclasses.fields(cls) if f.init}
        model = options_model(cls)
        assert set(model.model_fields) == {"name", *fields}
        assert {k: v.default for k, v in model.model_fields.items() if k != "name"} == fields
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(f"model: {{path: 'tiny:sd15'}}\ndata: {{train: x.jsonl}}\nobjective: {{name: {name}}}\n"
                       "reward: {train: toy_color}\n")
        c = load_config(cfg)
        built = build_objective(c.objective.name, **c.objective.model_dump(exclude={"name"}))
        assert type(built) is cls and isinstance(built, Objective)


def test_options_are_validated_the_same_way_everywhere(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {path: 'tiny:sd15'}\ndata: {train: x.jsonl}\nobjective: {name: inpo}\n")
    with pytest.raises(ConfigError, match=r"objective\.inversion_steps"):
        load_config(cfg, ["--objective.inversion_steps", "0"])
    with pytest.raises(ValueError, match=r"objective\.inversion_steps"):
        build_objective("inpo", inversion_steps=0)
    with pytest.raises(ValueError, match=r"objective\.loss_type"):
        OBJECTIVES["inpo"](loss_type="nope")  # direct construction is checked too
    with pytest.raises(ValueError, match=r"objective\.betta: Extra inputs"):
        build_objective("dpo", betta=1.0)


def test_mapo_temperature_and_inpo_loss_type_reach_the_objective(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {path: 'tiny:sd15'}\ndata: {train: x.jsonl}\nobjective: {name: mapo}\n")
    c = load_config(cfg, ["--objective.temperature", "10"])
    assert build_objective("mapo", **c.objective.model_dump(exclude={"name"})).temperature == 10.0
    inpo = build_objective("inpo", loss_type="hinge")
    assert inpo._dpo.loss_type == "hinge"


def test_hooks_default_to_nothing_and_state_is_only_kept_when_defined():
    dpo, dro = build_objective("dpo"), build_objective("dro")
    assert dpo.data_kind == "pairs" and dro.data_kind == "experts"
    assert not dpo.stateful and dro.stateful
    assert dpo.state_dict() == {} and dpo.setup(None) is None and dpo.collect({}, None) is None
