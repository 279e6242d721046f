"""LSG: each block weight is trained through low-rank carriers, noised only on a sparse support.

For a weight W (p x d) with carriers L (p x r, orthonormal columns) and R (r x d, orthonormal rows),
the per-example carrier gradients of example i are (algorithms.md 8.1)

    dL_i = sum_t g_t (R x_t)^T      (p x r)        dR_i = sum_t (L^T g_t) x_t^T      (r x d)

They replace W's per-example gradient in the joint per-example norm (the dense parameters, biases,
norms and embeddings, keep theirs), so clipping bounds the sensitivity of everything released by C.
The clipped sums get N(0, sigma^2 C^2) only on the support Omega (density rho of each carrier), and
the update of W is reconstructed as dW = dL R + L dR - L L^T dL R (the projection removes the part both
carriers carry).  The noise dimension per matrix is rho r (p + d) instead of p d.

What may depend on what (the privacy argument, tested in tests/test_lsg.py):
- the carriers come from released weights only: one power iteration on the history
  Delta = W_t/||W_t|| - W_0/||W_0|| (the first time, W itself) from a public random start, refreshed every
  ``refresh_every`` steps after a release;
- the support (rho of each carrier's coordinates) is half the top coordinates of the previous step's
  *noisy* carrier gradient and half a public random draw, or after a refresh (when the old
  coordinates mean nothing) all public random: never the current batch.
Per-example carrier gradients are materialised (B r (p + d) numbers, small for small r), so any mask
applies before the norm.  This construction is a reconstruction (algorithms.md 8.2 is marked [R]).

Tensor parallelism: a column-parallel weight (rows sharded) has L sharded like its rows and R
replicated; a row-parallel one (columns sharded) has R sharded like its columns and L replicated.
Orthonormalisation is Cholesky-QR whose r x r Gram matrix is summed over the tensor group when the
factor is sharded, and the projections that mix shards (L^T g for column-parallel, R x for
row-parallel) are summed over it too: B x T x r numbers per layer and micro-batch, besides the one
all-reduce of norm contributions.
"""
from __future__ import annotations

import torch
from torch import nn

from ..parallel.layers import ColumnParallelLinear, RowParallelLinear
from ..parallel.mappings import group_sum
from ..parallel.state import Sharded, gather_full, load_into
from .noise import keyed_normal
from .precision import accumulation_dtype
from .rules import Cost, NormRule
from .rules.linear import example_sq_norms, weighted_example_sum
from .step import Released

PUBLIC = 0  # the key of public randomness (random starts, random masks): nothing secret in it


def _carrier(shape: tuple[int, ...], full_shape: tuple[int, ...], dim: int | None, offset: int,
             dtype: torch.dtype) -> nn.Parameter:
    """A carrier tensor marked like a parameter shard (it is what the noise and the norms address)."""
    carrier = nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
    carrier.tensor_model_parallel = dim is not None
    carrier.partition_dim, carrier.partition_offset, carrier.full_shape = dim, offset, tuple(full_shape)
    return carrier


def orthonormal_columns(m: torch.Tensor, group=None) -> torch.Tensor:
    """Cholesky-QR: M (rows possibly sharded over ``group``) times the inverse Cholesky factor of
    its Gram matrix, so the full matrix has orthonormal columns (a ridge keeps it defined)."""
    gram = group_sum(m.T @ m, group)
    ridge = 1e-12 * float(gram.diagonal().sum()) / gram.shape[0] + 1e-300
    chol = torch.linalg.cholesky(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype))
    return torch.linalg.solve_triangular(chol, m.T, upper=False).T


class LayerCarriers:
    """The carriers, support masks and weight history of one linear layer."""

    def __init__(self, layer: nn.Module, name: str, rank: int):
        weight = layer.weight
        p, d = weight.full_shape
        if rank > min(p, d):
            raise ValueError(f"lsg.rank {rank} exceeds min(p, d) = {min(p, d)} of {name} ({p} x {d})")
        self.layer, self.name, self.rank = layer, name, rank
        self.group = layer.tp_group if weight.tensor_model_parallel else None
        self.column = isinstance(layer, ColumnParallelLinear)
        sharded = weight.tensor_model_parallel
        dtype = accumulation_dtype(weight.dtype)
        if self.column:  # rows of W sharded: L sharded the same way, R replicated
            self.left = _carrier((weight.shape[0], rank), (p, rank), 0 if sharded else None, weight.partition_offset,
                                 dtype)
            self.right = _carrier((rank, d), (rank, d), None, 0, dtype)
        else:  # columns of W sharded: R sharded the same way, L replicated
            self.left = _carrier((p, rank), (p, rank), None, 0, dtype)
            self.right = _carrier((rank, weight.shape[1]), (rank, d), 1 if sharded else None, weight.partition_offset,
                                  dtype)
        self.carrier_names = {self.left: f"{name}.lsg_left", self.right: f"{name}.lsg_right"}  # their noise keys
        self.masks = {self.left: torch.ones(self.left.shape, dtype=torch.bool),
                      self.right: torch.ones(self.right.shape, dtype=torch.bool)}
        self.start = weight.detach().to(dtype).clone()  # W_0, public (the initial weights)
        self.refreshes = torch.zeros(1, dtype=torch.int64)  # a tensor, so a checkpoint restores it in place

    def refresh(self) -> None:
        """New carriers from the released weights: L = orth(Delta R0), R = orth(Delta^T L)^T."""
        w = self.layer.weight.detach().to(torch.float64)
        start = self.start.to(torch.float64)
        delta = w if int(self.refreshes) == 0 else w / _frobenius(w, self.group) - start / _frobenius(start, self.group)
        if float(_frobenius(delta, self.group)) == 0.0:
            delta = w
        d_full = self.layer.weight.full_shape[1]
        box = None if self.column or not self.layer.weight.tensor_model_parallel else (
            slice(self.right.partition_offset, self.right.partition_offset + self.right.shape[1]), slice(None))
        probe = keyed_normal(PUBLIC, int(self.refreshes), f"lsg/start/{self.name}", (d_full, self.rank), box,
                             dtype=torch.float64)
        if self.column:  # delta rows sharded, columns full
            left = orthonormal_columns(delta @ probe, self.group)
            right = orthonormal_columns(group_sum(delta.T @ left, self.group)).T
        else:  # delta columns sharded
            left = orthonormal_columns(group_sum(delta @ probe, self.group))
            right = orthonormal_columns(delta.T @ left, self.group).T
        self.left.data.copy_(left)
        self.right.data.copy_(right)
        self.refreshes += 1

    def state_dict(self) -> dict:
        return {f"lsg/{self.name}/left": Sharded(self.left.data, self.left),
                f"lsg/{self.name}/right": Sharded(self.right.data, self.right),
                f"lsg/{self.name}/left_mask": Sharded(self.masks[self.left], self.left),
                f"lsg/{self.name}/right_mask": Sharded(self.masks[self.right], self.right),
                f"lsg/{self.name}/start": Sharded(self.start, self.layer.weight),
                f"lsg/{self.name}/refreshes": self.refreshes}

    def carrier_gradients(self, inputs: torch.Tensor, grad_outputs: torch.Tensor):
        """Per-example dL_i (B, p, r) and dR_i (B, r, d) of this layer, masked to the support."""
        x, g = inputs.to(self.left.dtype), grad_outputs.to(self.left.dtype)
        projected_in = x @ self.right.T  # (B, T, r): R x_t
        projected_out = g @ self.left  # (B, T, r): L^T g_t
        if self.column:
            projected_out = group_sum(projected_out, self.group)  # g sharded by rows, like L
        else:
            projected_in = group_sum(projected_in, self.group)  # x sharded by columns, like R
        left = torch.einsum("btp,btr->bpr", g, projected_in) * self.masks[self.left]
        right = torch.einsum("btr,btd->brd", projected_out, x) * self.masks[self.right]
        return left, right

    def reconstruct(self, left_sum: torch.Tensor, right_sum: torch.Tensor) -> torch.Tensor:
        """dW = dL R + L dR - L (L^T dL) R, this rank's shard of it."""
        overlap = self.left.T @ left_sum  # (r, r) = L^T dL, summed over shards of L's rows
        if self.column:
            overlap = group_sum(overlap, self.group)
        return left_sum @ self.right + self.left @ right_sum - self.left @ overlap @ self.right

    def choose_support(self, step: int, density: float, noisy: dict | None, random: bool) -> None:
        """The support of the next step, from released values and public randomness only.

        The previous noisy carrier gradient is zero off its own support, so "its top coordinates"
        alone would never move the support.  Half of the support is therefore the top coordinates
        of |previous noisy carrier gradient| (exploitation) and the rest a public random draw among
        the others (exploration); after a refresh, or with ``lsg.mask=random``, all of it is random.
        """
        for carrier, mask in self.masks.items():
            full = carrier.full_shape
            keep = max(1, round(density * full[0] * full[1]))  # of the whole carrier: the layout changes nothing
            if keep >= full[0] * full[1]:
                mask.fill_(True)
                continue
            score = keyed_normal(PUBLIC, step, f"lsg/mask/{self.carrier_names[carrier]}", full, dtype=torch.float64).abs()
            score = score.reshape(-1)
            if not random and noisy is not None:
                previous = gather_full(carrier, self.group, noisy[carrier]).abs().reshape(-1)
                score[torch.topk(previous, (keep + 1) // 2).indices] = float("inf")
            chosen = torch.zeros(full[0] * full[1], dtype=torch.bool)
            chosen[torch.topk(score, keep).indices] = True
            mask.copy_(self._local(chosen.view(full), carrier))

    @staticmethod
    def _local(whole: torch.Tensor, carrier: nn.Parameter) -> torch.Tensor:
        if not carrier.tensor_model_parallel:
            return whole
        dim = carrier.partition_dim
        return whole.narrow(dim, carrier.partition_offset, carrier.shape[dim])


def _frobenius(t: torch.Tensor, group) -> torch.Tensor:
    return group_sum((t * t).sum(), group).sqrt()


class LsgRule(NormRule):
    """The norm rule of a linear layer trained through its carriers (given to the tap by
    ``LowRankGradients.rules``): norms and clipped sums of the carriers and the bias, never of W."""

    completing_site = "linear"

    def __init__(self, carriers: LayerCarriers):
        self.carriers = carriers

    def choices(self, layer, batch, seq_len, elem_bytes, per_layer=False):
        p, d = layer.weight.shape
        r = self.carriers.rank
        return {"materialise": Cost(flops=4.0 * batch * seq_len * r * (p + d), kept_bytes=batch * r * (p + d) * 8)}

    def prepare(self, layer, recorded, strategy):
        inputs, grad_outputs = recorded["linear"]["inputs"], recorded["linear"]["grad_outputs"]
        inputs = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
        grad_outputs = grad_outputs.reshape(grad_outputs.shape[0], -1, grad_outputs.shape[-1])
        left, right = self.carriers.carrier_gradients(inputs, grad_outputs)
        return {"left": left, "right": right, "bias": grad_outputs.sum(1) if layer.bias is not None else None}

    def sq_norms(self, layer, state):
        carriers = self.carriers
        norms = {carriers.left: example_sq_norms(state["left"]), carriers.right: example_sq_norms(state["right"])}
        if state["bias"] is not None:
            norms[layer.bias] = example_sq_norms(state["bias"]).to(norms[carriers.left].dtype)
        return norms

    def clipped_sums(self, layer, state, clip_factors):
        carriers = self.carriers
        sums = {carriers.left: weighted_example_sum(state["left"], clip_factors),
                carriers.right: weighted_example_sum(state["right"], clip_factors)}
        if state["bias"] is not None:
            sums[layer.bias] = weighted_example_sum(state["bias"], clip_factors)
        return sums


class LowRankGradients:
    """LSG as the DP step's parametrization seam: carriers on every block linear layer, released in
    place of its weight, and their refresh and support schedule (``rank``, ``density``,
    ``refresh_every`` and ``mask`` are the ``lsg`` config section's)."""

    def __init__(self, model: nn.Module, *, rank: int, density: float = 1.0, refresh_every: int = 10,
                 mask: str = "previous"):
        self.density, self.refresh_every, self.random_mask = density, refresh_every, mask == "random"
        self.layers: dict[nn.Parameter, LayerCarriers] = {}
        self.rules: dict[nn.Module, LsgRule] = {}
        for name, module in model.named_modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                carriers = LayerCarriers(module, f"{name}.weight", rank)
                carriers.refresh()
                carriers.choose_support(0, density, None, random=True)
                self.layers[module.weight] = carriers
                self.rules[module] = LsgRule(carriers)
        if not self.layers:
            raise ValueError("lsg.enabled but the model has no linear layer to carry")

    def carriers(self) -> list[nn.Parameter]:
        return [c for layer in self.layers.values() for c in (layer.left, layer.right)]

    def released(self, names: dict[nn.Parameter, str]) -> list[Released]:
        """The dense parameters as themselves, and the carriers of every carried weight on their support."""
        dense = [Released(name, p) for p, name in names.items() if p not in self.layers]
        return dense + [Released(layer.carrier_names[c], c, layer.masks[c])
                        for layer in self.layers.values() for c in (layer.left, layer.right)]

    def updates(self, noisy: dict[torch.Tensor, torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        """Each carried weight's update reconstructed from its noisy carriers; the rest as released."""
        updates = {p: g for p, g in noisy.items() if p not in self.layers}
        for weight, layer in self.layers.items():
            updates[weight] = layer.reconstruct(noisy[layer.left], noisy[layer.right])
        return updates

    def noise_dimension(self) -> dict[str, int]:
        """Coordinates noised per matrix at the next release (this rank's share)."""
        return {layer.name: sum(int(m.sum()) for m in layer.masks.values()) for layer in self.layers.values()}

    def observe(self, step: int, noisy: dict[torch.Tensor, torch.Tensor]) -> None:
        """Choose what step ``step + 1`` uses, from what step ``step`` released (and nothing else)."""
        refresh = (step + 1) % self.refresh_every == 0
        for layer in self.layers.values():
            if refresh:
                layer.refresh()
            layer.choose_support(step + 1, self.density, noisy, random=refresh or self.random_mask)

    def state_dict(self) -> dict:
        """Carriers, supports, W_0 and refresh counts: what an exact resume needs."""
        return {key: value for layer in self.layers.values() for key, value in layer.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        load_into(self.state_dict(), state)

