"""Losses as pure functions of tensors, registered by name.

Every loss takes tensors and explicit hyperparameters (never a config object) and returns a
`(loss, metrics)` pair where `metrics` is a dict of detached tensors for logging.
"""

from posttrain.registry import Registry

LOSSES: Registry = Registry("loss")
register_loss = LOSSES.register
get_loss = LOSSES.get

# Importing the modules registers their losses.
from posttrain.losses import (  # noqa: E402,F401
    dpo,
    policy,
    preference,
    sft,  # noqa: E402,F401
)
