import pytest
import torch

from diffalign.backbones import load_backbone
from diffalign.backbones.lora import add_lora
from diffalign.backbones.tiny import build_tiny_pipeline
from rewards.base import Reward

FAMILIES = ["sd15", "sd2v", "sdxl", "sd3", "flux"]
PROMPTS = ["a red circle", "a blue square at the top"]


def tiny(family: str, lora: bool = False, std: float = 0.2):
    """A tiny backbone (32 px); with ``lora`` a rank-4 LoRA with random B, so tuned != base."""
    bb = load_backbone(build_tiny_pipeline(family))
    bb.resolution = 32
    if lora:
        add_lora(bb, rank=4)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in bb.denoiser.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
    return bb


@pytest.fixture
def make_backbone():
    return tiny


class Brightness(Reward):
    """Mean pixel value: differentiable, prompt-independent."""

    name = "brightness"
    differentiable = True

    def __init__(self, sign: float = 1.0) -> None:
        super().__init__()
        self.sign = sign

    def score(self, images, prompts, context=None):
        return self.sign * images.flatten(1).mean(1)


class ZeroReward(Reward):
    """Always 0, with a (zero) gradient."""

    name = "zero"
    differentiable = True

    def score(self, images, prompts, context=None):
        return images.flatten(1).sum(1) * 0.0
