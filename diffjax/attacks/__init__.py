"""Attacks under controlled randomness (the paper's Section 4).

- `Gradient`: the gradient estimator through the purifier (`full`, `bpda`, `eot=K`).
- `PGDConfig` / `pgd_attack`: l_inf and l_2 PGD as one `lax.scan` in one `jit`.
- `APGDConfig` / `apgd_attack`: APGD-CE / APGD-DLR (Croce & Hein 2020).
- `attack_and_evaluate`: an attack plus its evaluation under a randomness protocol
  (`fixed`, `independent`, `transfer`; multi-draw accuracy).
- `gradient_correlation`: cosine between the EOT gradient and the fixed-randomness one.
- `evaluate_dataset`: sharded, resumable robust-accuracy evaluation over batches.

The key flow of every protocol is in `diffjax.attacks.streams` and
`diffjax.attacks.protocols`.
"""

from diffjax.attacks.apgd import APGDConfig, apgd_attack, checkpoint_schedule
from diffjax.attacks.evaluate import evaluate_dataset, read_results, summarize
from diffjax.attacks.gradients import (
    Gradient,
    attack_loss,
    loss_and_grad,
    per_draw_loss_and_grad,
    straight_through,
)
from diffjax.attacks.pgd import PGDConfig, PGDResult, pgd_attack, project
from diffjax.attacks.protocols import (
    attack_and_evaluate,
    gradient_correlation,
    resolve_example_keys,
)
from diffjax.attacks.streams import PROTOCOLS

__all__ = [
    "APGDConfig",
    "Gradient",
    "PGDConfig",
    "PGDResult",
    "PROTOCOLS",
    "apgd_attack",
    "attack_and_evaluate",
    "attack_loss",
    "checkpoint_schedule",
    "evaluate_dataset",
    "gradient_correlation",
    "loss_and_grad",
    "per_draw_loss_and_grad",
    "pgd_attack",
    "project",
    "read_results",
    "resolve_example_keys",
    "straight_through",
    "summarize",
]
