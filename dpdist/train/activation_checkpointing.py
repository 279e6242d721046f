"""``train.activation_checkpointing``: keep only each transformer block's input in the forward and
recompute the block in the backward (``blocks``), trading one more forward of the blocks for their
activation memory.

The models run each block through ``torch.utils.checkpoint`` (non-reentrant) when their
``checkpoint_blocks`` is set and they are training; this switches it on from outside, as the tap is
attached from outside.  The module tree and the parameter names (the keys of the noise and of
checkpoints) stay as they are, which a wrapper module around each block would prefix.

The tap is unaffected: a layer's weight-gradient records are made in its backward, which runs once per
backward; recomputation only re-runs the forwards that refill the tensors that backward reads, under
the autocast and random state of the original forward.  Two-pass clipping's second backward
recomputes the blocks again.  Validation (``model.eval()``) runs the blocks plainly, and
Re-Attention's variance-carrying blocks run through their own method and are not checkpointed.
"""
from __future__ import annotations

from torch import nn

MODES = ("none", "blocks")


def apply_activation_checkpointing(mode: str, model: nn.Module) -> None:
    """Make ``model`` recompute its blocks in the backward for ``mode`` ``blocks``; ``none`` changes nothing."""
    if mode not in MODES:
        raise ValueError(f"train.activation_checkpointing must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "none":
        return
    if not hasattr(model, "checkpoint_blocks"):
        raise ValueError(f"train.activation_checkpointing=blocks needs a model that can checkpoint its blocks "
                         f"(dpdist.model's); a {type(model).__name__} cannot")
    model.checkpoint_blocks = True
