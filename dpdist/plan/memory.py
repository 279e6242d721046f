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
  each block keeps only its input (d e_r per token) and one block at a time is recomputed in full;
- per-example norm buffers: the kept bytes of the engine's strategy plan (``plan_strategies`` with the
  config's memory budget; per-layer clipping keeps only the largest layer's);
- noise: this rank's share of the largest released tensor, fp32 (the draw before it is added);
- runtime: what a process holds beyond its tensors (``Hardware.runtime_bytes``: on the CPU, measured;
  on a GPU the CUDA context is outside the device's tensors and in its reserve instead).

Phases: the backward (weights, copies, optimizer, the sums store, and the larger of the activations
and, under book-keeping, the activations less the head's freed log-softmax terms plus the norm buffers;
under per-layer clipping the activations plus the buffers) and the release (weights, optimizer, the
sums, the noise draw and, except under ZeRO, which noises its own gradient partition in place, native's
flat all-reduce buffer when D > 1 and the new gradients).  The peak is
the larger.  The non-private step's peak (gradients instead of sums, no norm buffers, no release) is
reported beside it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import RunConfig
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
    what the head holds at the start of the backward (``head``) and what of it is freed once the head's
    backward has run (``head_freed``: all but the logits' gradient, which the tap may keep), in bytes."""
    m = cfg.model
    e_r, e_c, _ = element_bytes(cfg)
    d, h = m.d_model, m.hidden
    sharded = 5 * d + (4 if m.arch == "llama" else 2) * h
    local_vocab = -(-vocab // tensor)
    copies = 3 if tensor == 1 else 4  # of the local logits, fp32
    return {"block": 2 * d * e_r + 2 * d * e_c + sharded * e_c / tensor, "checkpointed": d * e_r,
            "head": d * e_r + d * e_c + copies * local_vocab * 4, "head_freed": (copies - 1) * local_vocab * 4}


def activations(cfg: RunConfig, shard: Shard, vocab: int) -> float:
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    per = activation_bytes(cfg, shard.tensor, vocab)
    layers = cfg.model.n_layers
    if cfg.train.activation_checkpointing == "blocks":
        blocks = layers * per["checkpointed"] + per["block"]
    else:
        blocks = layers * per["block"]
    return tokens * (blocks + per["head"])


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
    # norm buffers pile up on top of them, after the head's backward has freed its log-softmax terms;
    # per-layer clipping clips each layer as its backward ends and frees as a non-private backward does.
    tokens = t.micro_batch_size * cfg.data.seq_len
    after_head = acts - tokens * activation_bytes(cfg, shard.tensor, vocab)["head_freed"]
    held = acts + buffers if p.clipping == "per_layer" else max(acts, after_head + buffers)
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
