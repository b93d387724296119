"""Tiny backbones and tiny differentiable rewards for the online (reward feedback) tests."""

import pytest

from tests.sampling.conftest import FAMILIES, Brightness, ZeroReward, tiny  # noqa: F401

PROMPTS = ["a red circle", "a blue square left of a green triangle"]


@pytest.fixture
def make_backbone():
    return tiny
