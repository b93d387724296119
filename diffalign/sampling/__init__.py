"""Samplers and guidance: CFG sampling (solvers), RL guidance and reward-gradient guidance (guidance),
best-of-N and rejection sampling (best_of)."""

from .best_of import Selection, best_of_n
from .guidance import RewardGuidance, RLGuidance, lora_scaled, rlg_combine
from .solvers import generate, guided_output, noise_for_seeds, resolve_scheduler, sample_latents

__all__ = [
    "RLGuidance", "RewardGuidance", "Selection", "best_of_n", "generate", "guided_output", "lora_scaled",
    "noise_for_seeds", "resolve_scheduler", "rlg_combine", "sample_latents",
]
