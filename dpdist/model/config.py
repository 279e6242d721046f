"""The shape of the decoder (``dpdist.model.gpt`` or ``dpdist.model.llama``), and the checks that it can be built.

Only what the model computes lives here: how it is trained, sharded or made private is configured
elsewhere (``dpdist.config``), so this file depends on nothing else in the package.
"""
from __future__ import annotations

from dataclasses import dataclass

ARCHS = ("gpt", "llama")  # Mistral and Qwen2 are llama with flags (sliding_window, qkv_bias)
NORMS = ("layernorm", "rmsnorm")
DTYPES = ("float32", "float64", "bfloat16")
ACTIVATIONS = ("gelu", "gelu_tanh")  # gpt arch only; llama is always SwiGLU
ROPE_SCALINGS = ("linear", "llama3")
# The blocks' linear layers of each architecture, by attribute name: what LoRA may target.
LINEAR_NAMES = {"gpt": ("qkv", "proj", "fc"),
                "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
ALL_LINEAR = "all-linear"
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelConfig:
    """Shape of the decoder; the YAML section ``model``."""

    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    max_seq_len: int = 128
    mlp_ratio: int = 4
    tie_embeddings: bool = True
    norm: str = "layernorm"  # layernorm | rmsnorm (gpt arch; llama is always rmsnorm)
    bias: bool = True  # gpt arch; llama has no biases except qkv_bias
    padding_idx: int | None = None  # token id whose embedding is zero and never trained
    dtype: str = "float32"  # float32 | float64 | bfloat16
    init_seed: int = 0  # public: the initial weights are not private
    arch: str = "gpt"  # gpt | llama
    n_kv_heads: int | None = None  # grouped-query attention (llama); None: n_heads
    mlp_hidden: int | None = None  # MLP width; None: mlp_ratio * d_model
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Hugging Face's dict: rope_type linear (factor) or llama3 (LLAMA3_KEYS)
    norm_eps: float = 1e-5
    qkv_bias: bool = False  # biases on q, k, v only (Qwen2)
    activation: str = "gelu"  # gelu | gelu_tanh (GPT-2), gpt arch
    sliding_window: int | None = None  # a token attends to at most this many positions, itself included (Mistral)
    pretrained: str | None = None  # a local Hugging Face folder; its config.json sets arch and shape
    hf_model_type: str | None = None  # gpt2 | llama | mistral | qwen2: what an export writes (set by import)

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden(self) -> int:
        """Width of the MLP."""
        return self.mlp_ratio * self.d_model if self.mlp_hidden is None else self.mlp_hidden

    def validate(self) -> None:
        """Raise ValueError, naming the ``model.*`` key to change, for a shape that cannot be built."""
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "mlp_ratio", "rope_theta",
                    "norm_eps"):
            if not getattr(self, key) > 0:
                raise ValueError(f"model.{key} must be > 0; got {getattr(self, key)}")
        for key in ("n_kv_heads", "mlp_hidden", "sliding_window"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise ValueError(f"model.{key} must be > 0 or null; got {getattr(self, key)}")
        if not 0 <= self.init_seed < 2**63:  # torch's generator takes no more
            raise ValueError(f"model.init_seed must be a non-negative integer below 2**63; got {self.init_seed}")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be a multiple of model.n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_kv_heads ({self.n_kv_heads}) must divide model.n_heads ({self.n_heads})")
        if self.padding_idx is not None and not 0 <= self.padding_idx < self.vocab_size:
            raise ValueError(f"model.padding_idx must be in [0, {self.vocab_size}); got {self.padding_idx}")
        for key, allowed in (("norm", NORMS), ("dtype", DTYPES), ("arch", ARCHS), ("activation", ACTIVATIONS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        if self.arch == "gpt":
            for key, default in (("n_kv_heads", None), ("rope_scaling", None), ("qkv_bias", False),
                                 ("sliding_window", None)):
                if getattr(self, key) != default:
                    raise ValueError(f"model.{key} is for model.arch=llama; the gpt arch has full multi-head "
                                     "attention, learned positions and one bias flag (model.bias)")
        else:
            self._validate_rope_scaling()

    def _validate_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if scaling is None:
            return
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
        if kind in (None, "default") and isinstance(scaling, dict) and set(scaling) <= {"rope_type", "type"}:
            return
        if kind not in ROPE_SCALINGS:
            raise ValueError(f"model.rope_scaling must be null or a mapping with rope_type one of "
                             f"{', '.join(ROPE_SCALINGS)}; got {scaling!r}")
        needed = ("factor",) if kind == "linear" else LLAMA3_KEYS
        bad = [k for k in needed if not (isinstance(scaling.get(k), (int, float)) and scaling[k] > 0)]
        if bad:
            raise ValueError(f"model.rope_scaling of rope_type {kind} needs positive {', '.join(bad)}; got {scaling!r}")
        if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
            raise ValueError("model.rope_scaling needs high_freq_factor > low_freq_factor for rope_type llama3")



def lora_targets(arch: str, targets: str) -> set[str]:
    """The leaf names ``targets`` selects among ``arch``'s block linears (``all-linear``: all of them)."""
    available = LINEAR_NAMES[arch]
    if targets.strip() == ALL_LINEAR:
        return set(available)
    wanted = {name.strip() for name in targets.split(",") if name.strip()}
    unknown = sorted(wanted - set(available))
    if unknown or not wanted:
        raise ValueError(f"lora.targets {targets!r} names {', '.join(unknown) or 'nothing'}, not a linear layer of "
                         f"the model.arch={arch} blocks; use {ALL_LINEAR} or comma-separated names from "
                         f"{', '.join(available)}")
    return wanted
