"""Meta-learning in pure torch: `adapt` (inner loop on fast weights) and the meta-gradient engines."""

from ecgray.meta.maml import (
    AdaptResult,
    MetaStep,
    adapt,
    apply_meta_gradient,
    make_meta_optimizer,
    meta_lr_at,
    meta_step,
    reference_meta_step,
    run_meta_step,
    set_lr,
)

__all__ = [
    "AdaptResult",
    "MetaStep",
    "adapt",
    "apply_meta_gradient",
    "make_meta_optimizer",
    "meta_lr_at",
    "meta_step",
    "reference_meta_step",
    "run_meta_step",
    "set_lr",
]
