"""FLOPs, collective bytes and predicted time of one training step, per rank.

FLOPs: the non-private step is ``dpdist bench``'s analytic matmul count (``nonprivate_step_flops``) of a
micro-batch, over the tensor degree; the DP step adds the strategy plan's ``extra_flops`` (the rules'
``Cost.flops``) for this rank's shard, so at tensor degree 1 the ratio is the bench's FLOP floor.
Checkpointing adds one more forward of the blocks (a third of their non-private FLOPs).  A step is
``ceil(train.batch_size / (D x micro_batch_size))`` micro-batches per rank (the expected batch; one when
only ``privacy.sample_rate`` is given, since the dataset size is not read).

Collective bytes: what a rank hands to each collective per step, as ``dpdist.bench.collectives``
counts them.  Tensor group (T > 1), per token of each micro-batch, read off the meta shard's layers
(``tensor_bytes_per_token``): every row-parallel linear all-reduces its output in the forward (in the
compute dtype: autocast's output), again when checkpointing recomputes its block (all but the block's
last: recomputation stops at the last tensor the backward saved); every column-parallel
linear (and the tied output projection) all-reduces its input's gradient in the backward, in the dtype
of that input (a norm's output in the model's dtype; a LoRA ``lora_B``'s input, ``lora_A``'s output, in
the compute dtype), when that input requires a gradient: some trainable parameter lies upstream (under
LoRA, the first block's frozen base layers get none); the embedding all-reduces its output (model
dtype) and the vocabulary-parallel loss three values in the logits' dtype (the model's, at
least fp32).  Per micro-batch, the DP step adds the
B-vector of squared norms (e_a each), and under per-layer clipping one more per layer holding a
sharded parameter.
Data group (D > 1): native, an all-reduce of the (noisy) sums, P_t e_a, per step; fsdp, per micro-batch
an all-gather of the shard in the forward and again in the backward (P/D e_c each) and a reduce-scatter
of the sums (P_t e_a); ZeRO-1/2, a reduction of the sums (P_t e_a) and an all-gather of the updated
shard (P_t e_p / D) per step.

Time: compute FLOPs at the hardware's peak for the precision, memory-bound work (the optimizer's
reads and writes, the plan's extra memory traffic) at its bandwidth, the noise (this rank's share of
the coordinates at the hardware's keyed-normal rate, ``Hardware.noise_normals_per_s``, and its add), and the
collectives on the wire (all-reduce 2(n-1)/n of the payload, reduce-scatter (n-1)/n of it, all-gather
(n-1) shards) at the link rate (NVLink when the whole mesh fits a node, else the network for the data
group), all scaled by one efficiency factor and added: no overlap is assumed, so it is an upper estimate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..bench.config import BenchConfig, nonprivate_step_flops
from ..config import ConfigError, RunConfig
from ..model import TRANSFORMER_BLOCKS
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from ..privacy.step import dp_layers
from .hardware import Hardware
from .memory import element_bytes, zero_stage
from .shapes import Shard

ADAMW_BYTES_PER_PARAM = 28  # reads weight, gradient and two moments, writes weight and moments (fp32)
LOSS_VALUES_PER_TOKEN = 3  # the vocabulary-parallel loss reduces the max, the target logit and the sum of exponentials
NOISE_ADD_BYTES_PER_COORDINATE = 12  # reads the draw and the sum, writes the sum


def bench_config(cfg: RunConfig, vocab: int, batch: int) -> BenchConfig:
    """``dpdist bench``'s description of the same model and micro-batch (for its FLOP count)."""
    m = cfg.model
    if m.arch == "gpt" and m.hidden % m.d_model:
        raise ConfigError(f"dpdist plan counts the gpt MLP as model.mlp_ratio x d_model; model.mlp_hidden "
                          f"{m.mlp_hidden} is not a multiple of model.d_model {m.d_model}")
    llama = m.arch == "llama"
    return BenchConfig(layers=m.n_layers, d_model=m.d_model, heads=m.n_heads, vocab=vocab, seq_len=cfg.data.seq_len,
                       batch=batch, arch=m.arch, mlp_ratio=m.hidden // m.d_model if not llama else m.mlp_ratio,
                       kv_heads=m.kv_heads if llama else None, mlp_hidden=m.hidden if llama else None,
                       lora_rank=cfg.lora.rank if cfg.lora.enabled else 0)


def tensor_bytes_per_token(shard: Shard, cfg: RunConfig) -> float:
    """The activation bytes per token one micro-batch hands to the tensor group (module docstring)."""
    e_p, e_c, _ = element_bytes(cfg)
    model = shard.model
    order = {id(param): index for index, param in enumerate(model.parameters())}
    first_trainable = min((order[id(p)] for p in model.parameters() if p.requires_grad), default=len(order))
    blocks = {name for name, module in model.named_modules() if isinstance(module, TRANSFORMER_BLOCKS)}

    def block_of(name: str) -> str | None:
        parts = name.split(".")
        return next((prefix for k in range(1, len(parts)) if (prefix := ".".join(parts[:k])) in blocks), None)

    # One pass over the modules: a large model has thousands, and each layer's block is looked up once.
    layers = [(name, module, block_of(name)) for name, module in model.named_modules()
              if getattr(module, "tp_group", None) is not None]  # not replicated, not a LoRA adapter half
    recompute = 2 if cfg.train.activation_checkpointing == "blocks" else 1
    total = LOSS_VALUES_PER_TOKEN * max(e_p, 4)  # in the logits' dtype: the model's, fp32 under bf16 compute
    # torch's non-reentrant checkpoint stops recomputing a block once every tensor its backward saved is
    # back, so the all-reduce of the block's last row-parallel output (the MLP's projection; not a LoRA
    # ``lora_A``, whose output ``lora_B`` saves) is not repeated.
    last_row = {block: name for name, module, block in layers
                if block is not None and isinstance(module, RowParallelLinear)}
    unrepeated = {name for name in last_row.values() if not name.endswith(".lora_A")}
    for name, module, block in layers:
        if isinstance(module, VocabParallelEmbedding):
            total += module.embedding_dim * e_p * (2 if module.tied_output else 1)  # forward; the projection's input
        if isinstance(module, RowParallelLinear):
            total += module.out_features * e_c * (recompute if block is not None and name not in unrepeated else 1)
        elif isinstance(module, ColumnParallelLinear):
            if name.endswith(".lora_B"):
                total += module.in_features * e_c
                continue
            # What feeds it: the block child holding it (its norm, a sibling child, comes earlier; q, k and v
            # share one input), or the layer itself outside the blocks.
            feeder = model.get_submodule(name[:name.index(".", len(block) + 1)]) if block is not None else module
            if first_trainable < min(order[id(p)] for p in feeder.parameters()):
                total += module.in_features * e_p
    return total


def sharded_dp_layers(shard: Shard) -> list[nn.Module]:
    """The DP layers holding a tensor-sharded trainable parameter: each all-reduces its per-example
    norms under per-layer clipping."""
    return [layer for layer in dp_layers(shard.model)
            if any(p.requires_grad and getattr(p, "tensor_model_parallel", False) for p in layer.parameters())]


def micro_batches(cfg: RunConfig) -> int:
    if cfg.train.batch_size is None:
        return 1
    return max(1, math.ceil(cfg.train.batch_size / (cfg.parallel.data * cfg.train.micro_batch_size)))


@dataclass
class Cost:
    micro_batches: int
    nonprivate_flops: float  # per rank and step
    dp_flops: float
    flop_floor_ratio: float  # DP over non-private FLOPs: the bench's floor at tensor degree 1
    tensor_bytes: float  # per rank and step, payload handed to tensor-group collectives
    data_bytes: float
    data_collectives: str
    compute_s: float
    memory_s: float
    noise_s: float  # drawing this rank's share of the keyed noise and adding it
    communication_s: float
    nonprivate_step_s: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.memory_s + self.noise_s + self.communication_s


def cost(cfg: RunConfig, shard: Shard, vocab: int, hw: Hardware, efficiency: float) -> Cost:
    t, p = cfg.train, cfg.privacy
    D, T, b, s, d = cfg.parallel.data, shard.tensor, t.micro_batch_size, cfg.data.seq_len, cfg.model.d_model
    e_p, e_c, e_a = element_bytes(cfg)
    m = micro_batches(cfg)
    bench = bench_config(cfg, vocab, b)
    flops = nonprivate_step_flops(bench)
    if t.activation_checkpointing == "blocks":
        head = 2.0 * s * d * vocab * (2 if bench.lora_rank else 3) * b
        flops += (flops - head) / 3
    nonprivate = m * flops / T
    extra = 0.0
    touched = 0.0
    if p.enabled:
        budget = p.memory_budget_mb * 2**20 if p.memory_budget_mb is not None else None
        plan = shard.plan(b, s, budget_bytes=budget, per_layer=p.clipping == "per_layer")
        extra = m * plan.extra_flops
        touched = m * sum(c.touched_bytes + c.cached_bytes for c in plan.costs.values())
    dp = nonprivate + extra

    P, P_t = shard.params, shard.trainable
    tensor_bytes = 0.0
    if T > 1:
        tensor_bytes = m * b * s * tensor_bytes_per_token(shard, cfg)
        if p.enabled:
            tensor_bytes += m * b * e_a * (1 + (len(sharded_dp_layers(shard)) if p.clipping == "per_layer" else 0))
    backend, stage = t.backend, zero_stage(cfg)
    wire = 0.0
    if D == 1:
        data_bytes, kinds = 0.0, "none"
    elif backend == "fsdp":
        gathered, scattered = 2 * m * P / D * e_c, m * P_t * e_a
        data_bytes, kinds = gathered + scattered, "all-gather x2 + reduce-scatter per micro-batch"
        wire = gathered * (D - 1) + scattered * (D - 1) / D
    elif stage:
        reduced, gathered = P_t * e_a, P_t * e_p / D
        data_bytes, kinds = reduced + gathered, "reduce-scatter + all-gather per step"
        wire = reduced * (D - 1) / D + gathered * (D - 1)
    else:
        data_bytes, kinds = P_t * e_a, "all-reduce per step"
        wire = data_bytes * 2 * (D - 1) / D
    one_node = D * T <= hw.devices_per_node
    comm = (tensor_bytes * 2 * (T - 1) / T / hw.intra_node_bandwidth
            + wire / (hw.intra_node_bandwidth if one_node else hw.inter_node_bandwidth)) / efficiency
    state = P_t / (D if backend == "fsdp" or stage else 1)
    memory_np = state * ADAMW_BYTES_PER_PARAM / hw.memory_bandwidth / efficiency
    normals = P_t / D  # each data rank draws its 1/D share of its tensor shard's coordinates
    noise_s = (normals / hw.noise_normals_per_s + normals * NOISE_ADD_BYTES_PER_COORDINATE / hw.memory_bandwidth) \
        / efficiency if p.enabled else 0.0
    memory_dp = memory_np + touched / hw.memory_bandwidth / efficiency
    rate = hw.peak_flops(t.precision) * efficiency
    return Cost(micro_batches=m, nonprivate_flops=nonprivate, dp_flops=dp, flop_floor_ratio=dp / nonprivate,
                tensor_bytes=tensor_bytes, data_bytes=data_bytes, data_collectives=kinds,
                compute_s=(dp if p.enabled else nonprivate) / rate, memory_s=memory_dp if p.enabled else memory_np,
                noise_s=noise_s, communication_s=comm, nonprivate_step_s=nonprivate / rate + memory_np + comm)  # same collectives, gradients for sums
