"""What a benchmark run is: the model and batch, the memory budgets, and the FLOP count of the
non-private step that the DP/non-private ratio's floor is measured against."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ARCHS = ("gpt", "llama")
LORA_ALPHA = 16.0  # peft's common default; the scale alpha / rank changes no FLOP or norm count


@dataclass
class BenchConfig:
    layers: int = 4
    d_model: int = 256
    heads: int = 4
    vocab: int = 8000
    seq_len: int = 128
    batch: int = 32
    steps: int = 6
    mlp_ratio: int = 4
    seed: int = 0
    arch: str = "gpt"  # gpt: tied, learned positions, GELU MLP; llama: untied, RoPE, grouped-query, SwiGLU
    kv_heads: int | None = None  # llama: key/value heads; None: heads / 2 (heads when that is odd)
    mlp_hidden: int | None = None  # llama: SwiGLU width; None: see ``hidden``
    lora_rank: int = 0  # > 0: LoRA adapters of this rank on every block linear, all else frozen
    tie_embeddings: bool | None = None  # None: the arch's own (gpt tied, llama untied); llama True: as Llama-3.2-1B

    @property
    def key_value_heads(self) -> int:
        if self.kv_heads is not None:
            return self.kv_heads
        return self.heads // 2 if self.arch == "llama" and self.heads % 2 == 0 else self.heads

    @property
    def tied(self) -> bool:
        return self.arch == "gpt" if self.tie_embeddings is None else self.tie_embeddings

    @property
    def hidden(self) -> int:
        """MLP width.  Llama's default is its own rule, 2/3 of 4 d rounded up to a multiple of 8, so that
        the three SwiGLU matrices hold about the 8 d^2 weights of the GPT's two."""
        if self.arch == "gpt":
            return self.mlp_ratio * self.d_model
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return 8 * math.ceil((8 * self.d_model // 3) / 8)

    def validate(self) -> None:
        for key in ("layers", "d_model", "heads", "vocab", "seq_len", "batch"):
            if getattr(self, key) <= 0:
                raise ValueError(f"--{key.replace('_', '-')} must be > 0; got {getattr(self, key)}")
        if self.steps < 2:
            raise ValueError(f"--steps must be >= 2 (the first step is excluded as warm-up); got {self.steps}")
        if self.d_model % self.heads:
            raise ValueError(f"--d-model ({self.d_model}) must be a multiple of --heads ({self.heads})")
        if self.arch not in ARCHS:
            raise ValueError(f"--arch must be one of {', '.join(ARCHS)}; got {self.arch!r}")
        if self.arch == "gpt" and (self.kv_heads is not None or self.mlp_hidden is not None):
            raise ValueError("--kv-heads and --mlp-hidden are for --arch llama; the gpt arch has full multi-head "
                             "attention and a 4 d MLP")
        for key in ("kv_heads", "mlp_hidden"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"--{key.replace('_', '-')} must be > 0; got {getattr(self, key)}")
        if self.arch == "gpt" and not self.tied:
            raise ValueError("tie_embeddings=False is for --arch llama; the gpt bench model is tied")
        if self.heads % self.key_value_heads:
            raise ValueError(f"--kv-heads ({self.key_value_heads}) must divide --heads ({self.heads})")
        if self.lora_rank < 0:
            raise ValueError(f"--lora-rank must be > 0; got {self.lora_rank}")


# ---------------------------------------------------------------------------------------------------
# Memory budgets: a number of MB, "none" (no budget: the engine's default choice per layer, the FLOP
# rule 2T^2 <= pd for flat clipping) or "unlimited" (a budget so large that the time-cost model alone
# chooses).

NONE, UNLIMITED = "none", "unlimited"


def parse_budget(text: str | float | None):
    """``"256"`` -> 256.0 (MB); ``"none"``/None -> ``"none"``; ``"unlimited"``/``"inf"`` -> ``"unlimited"``."""
    if text is None:
        return NONE
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        word = text.strip().lower()
        if word in ("none", "null", ""):
            return NONE
        if word in ("unlimited", "inf", "infinite", "lifted"):
            return UNLIMITED
        try:
            value = float(word)
        except ValueError:
            raise ValueError(f"a memory budget is a number of MB, 'none' or 'unlimited'; got {text!r}") from None
    if math.isinf(value):
        return UNLIMITED
    if value < 0 or math.isnan(value):
        raise ValueError(f"a memory budget must be >= 0 MB; got {text!r}")
    return value


def budget_bytes(budget) -> float | None:
    if budget == NONE:
        return None
    if budget == UNLIMITED:
        return math.inf
    return float(budget) * 2**20


def budget_label(budget, clipping: str = "flat") -> str:
    if budget == NONE:
        return "none (fastest lean)" if clipping == "per_layer" else "none (FLOP rule)"
    if budget == UNLIMITED:
        return "unlimited"
    return f"{budget:g} MB"


# ---------------------------------------------------------------------------------------------------
# FLOPs

def block_linears(cfg: BenchConfig) -> list[tuple[str, int, int]]:
    """(name, in features, out features) of one block's linear layers, in the model's order."""
    d, h = cfg.d_model, cfg.hidden
    if cfg.arch == "gpt":
        return [("qkv", d, 3 * d), ("proj", d, d), ("fc", d, h), ("proj", h, d)]
    kv = cfg.key_value_heads * (d // cfg.heads)
    return [("q_proj", d, d), ("k_proj", d, kv), ("v_proj", d, kv), ("o_proj", d, d),
            ("gate_proj", d, h), ("up_proj", d, h), ("down_proj", h, d)]


READ_EMBEDDING = ("qkv", "q_proj", "k_proj", "v_proj")  # the first block's layers that read the (normed) embedding


def nonprivate_step_flops(cfg: BenchConfig) -> float:
    """Analytic matmul FLOPs of one non-private training step of the benchmark model.

    Per example of T tokens, a matmul of a linear layer (in, out) is 2 T in out FLOPs (2 per
    multiply-add), and the backward repeats it once for the input's gradient and once for the weight's:
      - the block linears (``block_linears``: GPT's qkv, out, 2 MLP; Llama's q, k, v of grouped-query
        width, o, and the 3 SwiGLU matrices);
      - attention: 2 T^2 d for Q K^T and 2 T^2 d for (softmax) V, over the full T x T square (the causal
        mask is not subtracted), backward twice that;
      - the vocabulary projection: 2 T d V.
    Full fine-tuning is thus 3x the forward.  With LoRA (rank r on every block linear) the frozen weights
    get no weight gradient, each adapter pair costs 3 x 2 T r (in + out), and the first block's q/k/v
    matmuls (base and lora_A) get no input gradient: they read the frozen embedding, so autograd skips
    it.  Embedding lookups, norms, softmax, the loss and element-wise work are not counted; they are
    small next to the matmuls here and memory-bound anyway.
    """
    T, r = cfg.seq_len, cfg.lora_rank
    weight_grads = 0 if r else 1
    per_example = 0.0
    for layer in range(cfg.layers):
        for name, n_in, n_out in block_linears(cfg):
            input_grads = 0 if r and layer == 0 and name in READ_EMBEDDING else 1
            per_example += 2.0 * T * n_in * n_out * (1 + input_grads + weight_grads)
            if r:  # lora_A (in -> r) and lora_B (r -> out): forward and weight gradient; lora_B's input gradient
                per_example += 2.0 * T * r * (n_in * (2 + input_grads) + 3 * n_out)
        per_example += 3 * 4.0 * T * T * cfg.d_model
    per_example += 2.0 * T * cfg.d_model * cfg.vocab * (2 + weight_grads)
    return cfg.batch * per_example


# ---------------------------------------------------------------------------------------------------
# The model and the batch

def model_config(cfg: BenchConfig):
    from ..model.config import ModelConfig
    if cfg.arch == "gpt":
        return ModelConfig(vocab_size=cfg.vocab, d_model=cfg.d_model, n_layers=cfg.layers, n_heads=cfg.heads,
                           max_seq_len=cfg.seq_len, mlp_ratio=cfg.mlp_ratio, tie_embeddings=True, dtype="float32",
                           init_seed=cfg.seed)
    return ModelConfig(arch="llama", vocab_size=cfg.vocab, d_model=cfg.d_model, n_layers=cfg.layers, n_heads=cfg.heads,
                       n_kv_heads=cfg.key_value_heads, mlp_hidden=cfg.hidden, max_seq_len=cfg.seq_len,
                       tie_embeddings=cfg.tied, norm="rmsnorm", bias=False, dtype="float32", init_seed=cfg.seed)


def run_overrides(bench: BenchConfig, data: int, tensor: int, backend: str, stage, private: bool, *,
                  checkpointing: str = "none") -> list[str]:
    """The ``key=value`` run config of one ``dpdist bench --backend`` case, for ``dpdist plan``: its model,
    each rank's share of the batch as one micro-batch, AdamW, fp32, flat clipping without a budget, its
    activation checkpointing."""
    arch = [] if bench.arch == "gpt" else [
        "model.arch=llama", f"model.n_kv_heads={bench.key_value_heads}", f"model.mlp_hidden={bench.hidden}",
        f"model.tie_embeddings={str(bench.tied).lower()}", "model.norm=rmsnorm", "model.bias=false"]
    return arch + [
        f"model.n_layers={bench.layers}", f"model.d_model={bench.d_model}", f"model.n_heads={bench.heads}",
        f"data.vocab_size={bench.vocab}", f"model.max_seq_len={bench.seq_len}", f"data.seq_len={bench.seq_len}",
        f"train.micro_batch_size={bench.batch // data}", f"train.batch_size={bench.batch}",
        f"privacy.enabled={str(private).lower()}", "privacy.noise_multiplier=1.0", f"train.backend={backend}",
        f"deepspeed.zero_stage={stage if stage else 'null'}", f"parallel.data={data}", f"parallel.tensor={tensor}",
        f"train.activation_checkpointing={checkpointing}"]



def planned_peak_mb(bench: BenchConfig, data: int, tensor: int, backend: str, stage, private: bool, *,
                    checkpointing: str = "none") -> float:
    """``dpdist plan --hardware cpu``'s peak per rank (MiB) for that case: the DP peak, or the non-private one."""
    from ..commands.plan import plan  # imported here: the planner imports this module for its FLOP count

    out = plan(None, run_overrides(bench, data, tensor, backend, stage, private, checkpointing=checkpointing), "cpu")
    return out["run"]["memory_bytes"]["peak" if private else "nonprivate_peak"] / 2**20

def build_bench_model(cfg: BenchConfig):
    """The benchmark model, with LoRA adapters on every block linear (everything else frozen) when
    ``cfg.lora_rank`` is set."""
    from ..model import build_model
    from ..model.lora import add_adapters

    model = build_model(model_config(cfg))
    if cfg.lora_rank:
        add_adapters(model, rank=cfg.lora_rank, alpha=LORA_ALPHA, seed=cfg.seed)
    return model


def describe(cfg: BenchConfig, params: int, trainable: int) -> str:
    """One line: the model the benchmark ran."""
    shape = f"{cfg.layers} layers, d_model {cfg.d_model}, {cfg.heads} heads"
    if cfg.arch == "gpt":
        text = f"GPT {shape}, vocab {cfg.vocab} (tied, {params / 1e6:.2f}M params)"
    else:
        text = (f"Llama {shape} ({cfg.key_value_heads} key/value), SwiGLU {cfg.hidden}, vocab {cfg.vocab} "
                f"({'tied' if cfg.tied else 'untied'}, {params / 1e6:.2f}M params)")
    if cfg.lora_rank:
        text += f", LoRA rank {cfg.lora_rank} on every block linear ({trainable / 1e6:.3f}M trainable)"
    return text


def make_batch(cfg: BenchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens from a fixed seed: inputs and next-token labels, both (B, T) and contiguous."""
    generator = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq_len + 1), generator=generator)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
