"""Parameter comparisons of the layout tests: float64 runs that take different reduction orders agree
to a tolerance relative to each parameter's own scale."""
import torch


def assert_close_at_scale(got: dict, want: dict, rel: float = 1e-10, what: str = "") -> None:
    """Every tensor of ``want`` is matched in ``got`` to ``rel`` times its largest entry."""
    for name, value in want.items():
        scale = float(value.abs().max().clamp(min=1e-12))
        assert torch.allclose(got[name], value, rtol=0, atol=rel * scale), f"{what}{name}"
