"""Bytes per rank of one training step, term by term, and the peak over the step's phases.

Sizes in elements come from the meta shard (``shapes``); P is this tensor rank's parameters, P_t its
trainable ones, D the data degree, e_p the model's element size (4), e_c the compute element size
(2 under ``train.precision=bf16``, else e_p), e_a = 4 the fp32 (or wider) pre-noise element size.

- weights: P e_p, over D under fsdp;
- copies: native under ``bf16``, P e_c, the autocast casts each layer saves for its backward; fsdp, the
  unsharded parameters it gathers in e_c: the root's (everything outside the blocks, gathered for the
  whole step) and two blocks' (the one computing and the one prefetched), (P - n_layers P_block) e_c
  + 2 P_block e_c;
- gradients: P_t e_a for the clipped sums (non-private: the gradients); under fsdp P_t e_a / D plus one
  layer's whole sum, which is reduce-scattered as it is formed;
  ZeRO-1/2 add DeepSpeed's own gradient buffers (P_t e_a, over D for ZeRO-2) to the DP step's sums;
- optimizer: AdamW 2 P_t e_p, SGD with momentum P_t e_p, over D under fsdp and ZeRO-1/2 (which also
  keep an fp32 master partition, P_t 4 / D);
- activations of one micro-batch of b sequences of s tokens, per token and block (t the tensor degree,
  d the width, h the MLP width): 2 d e_r + 2 d e_c + (5 d + 2 h) e_c / t for gpt, (5 d + 4 h) e_c / t
  for llama.  The 2 d e_r are the inputs of the block's two norms (the residual stream, e_r = e_p), the
  2 d e_c their outputs as the next linear layers keep them, the 5 d the attention's q, k, v (llama's
  rotated and repeated to every query head), its output and that output with the heads merged
  (attention is fused: no s x s scores), the 2 h (4 h) the MLP's activations (GELU's input and output;
  SwiGLU's gate, its SiLU, up and their product); plus the head: d e_r + d e_c for the final norm and
  fp32 values of the vocabulary per token: at t = 1, 3 V (the log-softmax kept for the backward, its
  gradient and the logits' gradient, alive together at the start of the backward), at t > 1, 4 V / t
  (the vocabulary-parallel loss holds the logits, the shifted logits, their exponentials and the
  softmax at the end of the forward).  With ``train.activation_checkpointing=blocks``
  each block keeps only its input (d e_r per token) and one block at a time is recomputed in full, once
  the head's backward has freed its vocabulary terms (the larger of the head and that block counts);
- per-example norm buffers: the kept bytes of the engine's strategy plan (``plan_strategies`` with the
  config's memory budget; per-layer clipping keeps only the largest layer's);
- noise: this rank's share of the largest released tensor, fp32 (the draw before it is added);
- runtime: what a process holds beyond its tensors (``Hardware.runtime_bytes``: on the CPU, measured;
  on a GPU the CUDA context is outside the device's tensors and in its reserve instead).

Phases: the backward (weights, copies, optimizer, the sums store, and the larger of the activations
and, under book-keeping, the activations left once the head's backward has run plus the norm buffers,
where under checkpointing the tap still holds the recomputed blocks' linear inputs; under per-layer
clipping the activations plus the buffers) and the release (weights, optimizer, the
sums, the noise draw and, except under ZeRO, which noises its own gradient partition in place, native's
flat all-reduce buffer when D > 1 and the new gradients).  The peak is
the larger.  The non-private step's peak (gradients instead of sums, no norm buffers, no release) is
reported beside it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import RunConfig
from ..model import TRANSFORMER_BLOCKS
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear
from .shapes import Shard

ACCUMULATION_BYTES = 4  # fp32 pre-noise sums (float64 models: 8, see ``element_bytes``)


@dataclass
class Memory:
    weights: float
    copies: float
    gradients: float
    optimizer: float
    activations: float
    norm_buffers: float
    noise: float
    runtime: float
    backward_peak: float
    release_peak: float
    nonprivate_peak: float

    @property
    def peak(self) -> float:
        return max(self.backward_peak, self.release_peak)

    def terms(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if not k.endswith("peak")}

    def largest_term(self) -> str:
        terms = self.terms()
        return max(terms, key=terms.get)


def zero_stage(cfg: RunConfig) -> int:
    """The ZeRO stage DeepSpeed runs (from the deepspeed section or its config file); 0 for other backends."""
    if cfg.train.backend != "deepspeed":
        return 0
    from ..deepspeed_config import resolve_deepspeed_config

    return resolve_deepspeed_config(cfg)["zero_optimization"]["stage"]


def element_bytes(cfg: RunConfig) -> tuple[int, int, int]:
    """(e_p, e_c, e_a): the parameters', the compute's and the pre-noise sums' element sizes."""
    e_p = {"float32": 4, "float64": 8, "bfloat16": 2}[cfg.model.dtype]
    e_c = 2 if cfg.train.precision == "bf16" else e_p
    return e_p, e_c, max(e_p, ACCUMULATION_BYTES)


def activation_bytes(cfg: RunConfig, tensor: int, vocab: int) -> dict[str, float]:
    """Per token: what one block keeps (``block``), what it keeps under checkpointing (``checkpointed``),
    what the head holds at the start of the backward (``head``) and what of it is left once the head's
    backward has run (``head_kept``: the final norm's input and output; the logits' gradient, where the
    tap keeps it, is in the norm buffers), in bytes."""
    m = cfg.model
    e_r, e_c, _ = element_bytes(cfg)
    d, h = m.d_model, m.hidden
    sharded = 5 * d + (4 if m.arch == "llama" else 2) * h
    local_vocab = -(-vocab // tensor)
    copies = 3 if tensor == 1 else 4  # of the local logits, fp32
    return {"block": 2 * d * e_r + 2 * d * e_c + sharded * e_c / tensor, "checkpointed": d * e_r,
            "head": d * e_r + d * e_c + copies * local_vocab * 4, "head_kept": d * e_r + d * e_c}


def activations(cfg: RunConfig, shard: Shard, vocab: int) -> float:
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    per = activation_bytes(cfg, shard.tensor, vocab)
    layers = cfg.model.n_layers
    if cfg.train.activation_checkpointing == "blocks":
        # The backward recomputes the last block only after the head's backward has freed its vocabulary
        # terms, so the recomputed block and the head's log-softmax are never alive together.
        return tokens * (layers * per["checkpointed"] + max(per["head"], per["block"] + per["head_kept"]))
    return tokens * (layers * per["block"] + per["head"])


def recorded_input_bytes(cfg: RunConfig, shard: Shard, strategies: dict) -> float:
    """Per token: the inputs of one block's linear layers that the tap keeps under book-keeping until the
    clip factors are known (every strategy but ``materialise`` keeps its layer's input), widened to fp32
    or wider as the tap records them.  Column-parallel layers of one sub-module (q, k, v; gate, up; a LoRA
    pair's ``lora_A``) read one shared input, counted once."""
    _, e_c, _ = element_bytes(cfg)
    block = next((m for m in shard.model.modules() if isinstance(m, TRANSFORMER_BLOCKS)), None)
    if block is None:
        return 0.0
    inputs = {}
    for part in block.children():
        for layer in part.modules():
            linear = isinstance(layer, (ColumnParallelLinear, RowParallelLinear))
            if linear and strategies.get(layer, "materialise") != "materialise":
                inputs[(part, type(layer), layer.weight.shape[-1])] = layer.weight.shape[-1]
    return sum(inputs.values()) * max(e_c, ACCUMULATION_BYTES)


def after_head(cfg: RunConfig, shard: Shard, vocab: int, plan) -> float:
    """The activations alive under book-keeping once the head's backward has run, beside the norm buffers:
    every block's (their inputs are the tap's records), or, under checkpointing, the blocks' inputs, the
    block being recomputed and the recorded inputs of those recomputed before it, which the tap keeps
    although the recomputation's other tensors are freed."""
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    per = activation_bytes(cfg, shard.tensor, vocab)
    layers = cfg.model.n_layers
    if cfg.train.activation_checkpointing == "blocks":
        recorded = recorded_input_bytes(cfg, shard, plan.strategies)
        blocks = layers * per["checkpointed"] + per["block"] + (layers - 1) * recorded
    else:
        blocks = layers * per["block"]
    return tokens * (blocks + per["head_kept"])


def memory(cfg: RunConfig, shard: Shard, vocab: int, runtime: float = 0.0) -> Memory:
    """The byte model of the module docstring for ``cfg``'s backend, layout and knobs."""
    t, p = cfg.train, cfg.privacy
    backend, data = t.backend, cfg.parallel.data
    stage = zero_stage(cfg)
    e_p, e_c, e_a = element_bytes(cfg)
    P, P_t = shard.params, shard.trainable
    fsdp = backend == "fsdp"

    weights = P * e_p / (data if fsdp else 1)
    if fsdp:
        root = P - cfg.model.n_layers * shard.block_params
        copies = (root + 2 * shard.block_params) * e_c
    else:
        copies = P * e_c if t.precision == "bf16" else 0.0
    # fsdp: this rank's shard of the sums, and one layer's whole sum before it is reduce-scattered
    sums = P_t * e_a / data + shard.largest_trainable * e_a if fsdp else P_t * e_a
    zero_buffers = P_t * e_a / (data if stage == 2 else 1) if stage else 0.0  # DeepSpeed's own gradients
    sums += zero_buffers
    slots = 2 if t.optimizer == "adamw" else (1 if t.momentum > 0 else 0)
    sharded_state = fsdp or stage > 0
    optimizer = slots * P_t * e_p / (data if sharded_state else 1)
    if stage:
        optimizer += P_t * 4 / data  # fp32 master partition
    acts = activations(cfg, shard, vocab)
    if p.enabled:
        budget = p.memory_budget_mb * 2**20 if p.memory_budget_mb is not None else None
        plan = shard.plan(t.micro_batch_size, cfg.data.seq_len, budget_bytes=budget, per_layer=p.clipping == "per_layer")
        buffers = plan.kept_bytes(p.clipping == "per_layer")
        noise = shard.largest_trainable * 4 / data
    else:
        buffers = noise = 0.0
    base = runtime + weights + optimizer
    # Book-keeping keeps every layer's inputs (the activations) until the clip factors are known, so the
    # norm buffers pile up on top of them, after the head's backward has freed its vocabulary terms;
    # per-layer clipping clips each layer as its backward ends and frees as a non-private backward does.
    bookkeeping = p.enabled and p.clipping != "per_layer"
    held = max(acts, after_head(cfg, shard, vocab, plan) + buffers) if bookkeeping else acts + buffers
    backward = base + copies + sums + held
    gradients = P_t * e_a / data if fsdp else P_t * e_a
    gathered = P_t * e_a if backend == "native" and data > 1 else 0.0  # the flat buffer of the all-reduce
    # DeepSpeed noises its own gradient partition in place: no new gradients beside the sums
    release = base + sums + noise + (0.0 if stage else gathered + gradients)
    nonprivate = base + copies + acts + (zero_buffers if stage else gradients)
    if not p.enabled:  # the run is the non-private step: its gradients, then the optimizer's update
        sums, backward, release = zero_buffers or gradients, nonprivate, base + (zero_buffers or gradients)
    return Memory(weights=weights, copies=copies, gradients=sums, optimizer=optimizer, activations=acts,
                  norm_buffers=buffers, noise=noise, runtime=runtime, backward_peak=backward, release_peak=release,
                  nonprivate_peak=nonprivate)
