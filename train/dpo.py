"""Direct preference optimisation (DPO): the loss of a pair and its TRL-named statistics.

Rows of a DPO batch come in pairs, the chosen response of a pair in an even row and its
rejected response in the next one, so any run of whole pairs (a micro-batch, a device's
share of it) is again a DPO batch. A row's sequence log-probability is the sum of the
log-probabilities of its response tokens (`train.step.sequence_logps`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Per-pair statistics, named as TRL's DPOTrainer logs them.
STATISTICS = (
  "rewards/chosen",
  "rewards/rejected",
  "rewards/accuracies",
  "rewards/margins",
  "logps/chosen",
  "logps/rejected",
)


def pair_losses(
  policy_logps: jax.Array, reference_logps: jax.Array, beta: float, label_smoothing: float = 0.0
) -> tuple[jax.Array, dict]:
  """DPO loss of each pair and its statistics, from per-row sequence log-probabilities.

  With :math:`h = (\\log\\pi(y_w) - \\log\\pi_{ref}(y_w)) - (\\log\\pi(y_l) - \\log\\pi_{ref}(y_l))`
  and label smoothing :math:`\\epsilon` (conservative DPO, TRL's "sigmoid" loss):

  .. math::
    L = -(1 - \\epsilon) \\log\\sigma(\\beta h) - \\epsilon \\log\\sigma(-\\beta h)

  Args:
    policy_logps: [2P] float, the policy's log-probability of each row (pairs interleaved:
      chosen, rejected, chosen, ...).
    reference_logps: [2P] float, the reference model's, treated as constants.
    beta: inverse temperature of the implicit reward.
    label_smoothing: :math:`\\epsilon` in [0, 0.5).

  Returns:
    (losses [P], {name in STATISTICS: [P] values}), rewards being
    :math:`\\beta(\\log\\pi(y) - \\log\\pi_{ref}(y))`.
  """
  policy = policy_logps.astype(jnp.float32).reshape(-1, 2)
  reference = jax.lax.stop_gradient(reference_logps.astype(jnp.float32)).reshape(-1, 2)
  rewards = beta * (policy - reference)
  margin = rewards[:, 0] - rewards[:, 1]  # beta * h
  losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(margin) - label_smoothing * (
    jax.nn.log_sigmoid(-margin)
  )
  statistics = {
    "rewards/chosen": rewards[:, 0],
    "rewards/rejected": rewards[:, 1],
    "rewards/accuracies": (margin > 0).astype(jnp.float32),
    "rewards/margins": margin,
    "logps/chosen": policy[:, 0],
    "logps/rejected": policy[:, 1],
  }
  return losses, statistics
