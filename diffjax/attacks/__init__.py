"""Attacks under controlled randomness (the paper's Section 4).

- Protocols (`diffjax.protocols`, re-exported): `Fixed()`, `Transfer(eval_draws=M)`,
  `Independent(eot=K, eval_draws=M)`: who draws which purifier randomness, during the
  attack and the test; they own every key derivation.
- `Gradient`: the gradient estimator through the purifier (`full`, `bpda`; EOT is the
  protocol's).
- Attacks (frozen configs run by `diffjax.attacks.engine`, one `jit` each):
  `PGDConfig` / `pgd_attack` (l_inf and l_2 PGD), `APGDConfig` / `apgd_attack` (APGD-CE,
  APGD-DLR, APGD-T; Croce & Hein 2020), `SquareConfig` / `square_attack` (the
  gradient-free Square Attack, Andriushchenko et al. 2020: the masking check).
- `evaluate`: adversarial examples classified under one or several protocols (and the
  purified images under the realization); `attack_and_evaluate`: an attack and its
  evaluation in one program.
- `gradient_correlation`: cosine between the EOT gradient and the fixed-randomness one.
- `cascade.run_cascade`: attacks over a whole set of examples (AutoAttack-style cascades,
  early exit, repacking into full batches, resumable); `diffjax.study` runs it per part.
"""

from diffjax.attacks.apgd import APGDConfig, apgd_attack, checkpoint_schedule
from diffjax.attacks.cascade import Cascade, run_cascade
from diffjax.attacks.engine import AttackResult
from diffjax.attacks.evaluation import (
    attack_and_evaluate,
    evaluate,
    gradient_correlation,
    resolve_example_keys,
)
from diffjax.attacks.gradients import (
    Gradient,
    attack_loss,
    loss_and_grad,
    per_draw_loss_and_grad,
    straight_through,
)
from diffjax.attacks.pgd import PGDConfig, PGDResult, pgd_attack, project
from diffjax.attacks.square import SquareConfig, square_attack
from diffjax.protocols import PROTOCOLS, Fixed, Independent, Protocol, Transfer, as_protocol

__all__ = [
    "APGDConfig",
    "AttackResult",
    "Cascade",
    "Fixed",
    "Gradient",
    "Independent",
    "PGDConfig",
    "PGDResult",
    "PROTOCOLS",
    "Protocol",
    "SquareConfig",
    "Transfer",
    "apgd_attack",
    "as_protocol",
    "attack_and_evaluate",
    "attack_loss",
    "checkpoint_schedule",
    "evaluate",
    "gradient_correlation",
    "loss_and_grad",
    "per_draw_loss_and_grad",
    "pgd_attack",
    "project",
    "resolve_example_keys",
    "run_cascade",
    "square_attack",
    "straight_through",
]
