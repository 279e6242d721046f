"""Evaluation of a trained model: utility (held-out loss, next-item ranking) and memorisation (canary
exposure), each measured the same way for every run so that runs at different epsilons compare."""
