"""Schedules, the forward process and diffusion purifiers (API.md: `diffjax.diffusion`)."""

from diffjax.diffusion.likelihood import Likelihood, log_likelihood, score_norm
from diffjax.diffusion.purifier import ChainPurifier, make_purifier
from diffjax.diffusion.samplers import (
    CLIP_GRADIENTS,
    METHODS,
    REMAT_MODES,
    Chain,
    make_chain,
    purify,
    respaced_timesteps,
    run_chain,
)
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
    "CLIP_GRADIENTS",
    "METHODS",
    "REMAT_MODES",
    "Chain",
    "Likelihood",
    "ChainPurifier",
    "Schedule",
    "VPSDE",
    "cosine_schedule",
    "from_model_space",
    "linear_schedule",
    "log_likelihood",
    "make_chain",
    "make_purifier",
    "purify",
    "q_sample",
    "respaced_timesteps",
    "run_chain",
    "score_norm",
    "to_model_space",
]
