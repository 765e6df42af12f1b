"""Schedules, the forward process and diffusion purifiers (API.md: `diffjax.diffusion`)."""

from diffjax.diffusion.samplers import METHODS, purify, respaced_timesteps
from diffjax.diffusion.schedules import (
    VPSDE,
    Schedule,
    cosine_schedule,
    from_model_space,
    linear_schedule,
    q_sample,
    to_model_space,
)

__all__ = [
    "METHODS",
    "Schedule",
    "VPSDE",
    "cosine_schedule",
    "from_model_space",
    "linear_schedule",
    "purify",
    "q_sample",
    "respaced_timesteps",
    "to_model_space",
]
