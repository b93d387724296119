"""The objective protocol and the registry: each objective is declared once, as a dataclass whose
fields are its options, and registered by name; the config's ``objective:`` section is generated
from those fields (types and pydantic ``Field`` constraints), so a new objective is one file plus
one import line in ``objectives/__init__.py``.

The hooks an objective may define (the training loop calls them; the defaults below do nothing):

    data_kind                     what the loop feeds ``loss``: "pairs" (default), "experts" (single
                                  demonstration images) or "prompts" (online methods)
    needs_reward                  True: the loop builds the config's reward and hands it to ``setup``
    setup(backbone, reward)       once, before the optimizer is built (e.g. a lagged sampler's copy)
    collect(batch, backbone)      before each ``loss`` call, no gradient: gather what the loss draws
                                  from (e.g. roll out a sampler into a replay buffer)
    loss(batch, backbone)         -> (loss, metrics); metrics are detached 0-dim tensors (no host
                                  sync in the step; the loop converts them when it logs)
    on_update(backbone)           after every optimizer update
    state_dict() / load_state_dict(state)   state saved in checkpoints, one file per process, read
                                  back with ``torch.load(weights_only=True)`` (tensors, numbers, lists)
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

OBJECTIVES: dict[str, type[Objective]] = {}


class Objective:
    name: ClassVar[str] = ""
    data_kind: ClassVar[str] = "pairs"
    needs_reward: ClassVar[bool] = False

    def __post_init__(self) -> None:
        """Options are checked as the config checks them, also when the objective is built directly."""
        _validate(type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init})

    def setup(self, backbone: Any, reward: Any = None) -> None:
        """Called once before the optimizer is built."""

    def collect(self, batch: dict, backbone: Any) -> None:
        """Called before every ``loss`` (no gradient)."""

    def loss(self, batch: dict, backbone: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError  # abstract: every objective defines its loss

    def on_update(self, backbone: Any) -> None:
        """Called after every optimizer update."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    @property
    def stateful(self) -> bool:
        """Whether checkpoints hold state of this objective (``state_dict`` is overridden)."""
        return type(self).state_dict is not Objective.state_dict


def register(name: str) -> Any:
    """Class decorator: ``@register("dpo")`` over an objective dataclass."""

    def deco(cls: type[Objective]) -> type[Objective]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"objective {name!r}: {cls.__name__} must be a dataclass (its fields are its options)")
        if name in OBJECTIVES and OBJECTIVES[name] is not cls:
            raise ValueError(f"objective {name!r} is registered twice ({OBJECTIVES[name].__name__}, {cls.__name__})")
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return deco


def options(cls: type[Objective]) -> dict[str, tuple[Any, Any]]:
    """``{field: (annotated type, default)}`` of an objective's options (its init fields)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: (hints[f.name], f.default) for f in dataclasses.fields(cls) if f.init}


@functools.cache
def options_model(cls: type[Objective]) -> type[BaseModel]:
    """The pydantic model of an objective's options: ``name`` (its tag) plus one field per option,
    unknown keys forbidden. The config's ``objective:`` section is the union of these."""
    fields: dict[str, Any] = {"name": (Literal[cls.name], cls.name)}  # type: ignore[valid-type]
    fields.update(options(cls))
    return create_model(f"{cls.__name__}Options", __config__=ConfigDict(extra="forbid", validate_assignment=True),
                        **fields)


def build_objective(name: str, **kwargs: Any) -> Objective:
    """The objective ``name`` with options ``kwargs``, validated as the config validates them."""
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; available: {', '.join(sorted(OBJECTIVES))}")
    cls = OBJECTIVES[name]
    return cls(**_validate(cls, kwargs))


def _validate(cls: type[Objective], values: dict[str, Any]) -> dict[str, Any]:
    try:
        opts = options_model(cls).model_validate({"name": cls.name, **values})
    except ValidationError as e:
        bad = "; ".join(f"objective.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(f"objective {cls.name!r}: {bad}") from None
    return opts.model_dump(exclude={"name"})
