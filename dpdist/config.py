"""One typed, validated configuration for every knob of a run.

A config is a tree of dataclasses loaded from YAML and then overridden by dotted ``key=value`` pairs
from the command line.  Validation happens here, before any process group starts, and every error is
one line that says what to change: a training job that fails after an hour of queueing because of a
typo is the failure this module exists to prevent.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from .model.config import ModelConfig, lora_targets
from .model.hf import resolve_pretrained

SECRET_KEYS = frozenset({"privacy.seed"})  # whoever knows one can subtract the noise: no error message echoes it
# Re-Attention's knobs were model keys before they had their own section: the config.yaml of a run
# written then still names them so, and resuming, evaluating or exporting that run reads it.
MOVED_MODEL_KEYS = {"reattention": "enabled", "reattention_lambda": "variance_scale", "reattention_layers": "layers",
                    "reattention_frequencies": "frequencies", "reattention_frequency_noise": "frequency_noise"}


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says what to change."""


# The second backward forms the weight gradients with the model's own matmuls: in bf16 the clipped sum
# itself would be rounded to bf16 before the noise, which breaks the sensitivity bound.
TWO_PASS_LOW_PRECISION = ("privacy.mode=two_pass sums the clipped gradients in the model's own backward, which "
                          "rounds them to bf16/fp16 before the noise; use privacy.mode=bookkeeping (fp32 sums)")
PURE_BF16 = ("model.dtype=bfloat16 trains bf16 weights, which lose every update below a bf16 ulp; keep "
             "model.dtype=float32 and set train.precision=bf16 (bf16 compute, fp32 master weights)")


@dataclass
class DataConfig:
    """Where the private text comes from and how it is cut into examples (one sequence = one example)."""

    path: str | None = None  # a .txt/.jsonl file or a directory of them; None = the embedded default corpus
    seq_len: int = 64
    vocab_size: int = 4096  # sentencepiece vocabulary trained on the corpus (unused with data.tokenizer_path)
    # A tokenizer built from PUBLIC text: a sentencepiece .model, a Hugging Face tokenizer.json, or a
    # Hugging Face model folder (docs/data.md).  Without it the tokenizer is trained on the corpus
    # itself, and its vocabulary is a non-private function of the data (fine for the embedded corpus).
    tokenizer_path: str | None = None
    tokenizer_model: str = "bpe"  # bpe | unigram
    max_corpus_mb: float = 4.0  # cap on the embedded default corpus
    val_fraction: float = 0.02
    # What one example (the privacy unit) may hold.  "stream": a chunk of the corpus's one token stream,
    # so neighbouring documents share chunks and removing a document shifts every later chunk.
    # "document": a sequence never holds tokens of two documents (a .jsonl line's "text", a whole .txt
    # file, a default-corpus source file or canary line); the tail is padded and a longer document is
    # split into several sequences, each its own unit.  zipf_items: every sequence is one user either way.
    # A .jsonl of {"prompt", "completion"} pairs needs "document": one pair is one example.
    packing: str = "stream"
    canaries: bool = True  # plant fake secrets in the embedded corpus (for exposure measurements)
    cache_dir: str = ".cache/dpdist"
    # "text" (path / embedded corpus, tokenised) or "zipf_items": generated long-tailed item sequences
    # for next-item prediction (dpdist.data.items; items are tokens, evaluated by NDCG@10 / HIT@10)
    source: str = "text"
    num_items: int = 2000
    zipf_exponent: float = 1.1
    num_sequences: int = 20000
    items_seed: int = 0  # the generated task is public: its seed is not a secret
    # Whose sequences: "private" (the users a run protects) or "public", a disjoint population of the
    # same catalogue, to pretrain a model on before fine-tuning it privately.
    items_users: str = "private"

    def validate(self) -> None:
        _positive(self, "data", "seq_len", "vocab_size", "max_corpus_mb", "num_items", "zipf_exponent", "num_sequences")
        _choice("data.source", self.source, ("text", "zipf_items"))
        if self.items_seed < 0:
            raise ConfigError(f"data.items_seed must be a non-negative integer; got {self.items_seed}")
        if self.source == "zipf_items" and (self.path is not None or self.tokenizer_path is not None):
            raise ConfigError("data.path and data.tokenizer_path are for data.source=text; zipf_items generates its "
                              "own item sequences (tokens are item ids), so unset them")
        _choice("data.tokenizer_model", self.tokenizer_model, ("bpe", "unigram"))
        _choice("data.items_users", self.items_users, ("private", "public"))
        _choice("data.packing", self.packing, ("stream", "document"))
        if not 0.0 <= self.val_fraction < 0.5:
            raise ConfigError(f"data.val_fraction must be in [0, 0.5); got {self.val_fraction}")
        if self.path is not None and not Path(self.path).exists():
            raise ConfigError(f"data.path {self.path!r} does not exist; point it at a .txt/.jsonl file or folder")
        if self.tokenizer_path is not None and not Path(self.tokenizer_path).exists():
            raise ConfigError(f"data.tokenizer_path {self.tokenizer_path!r} does not exist; give a sentencepiece "
                              ".model, a tokenizer.json or a Hugging Face model folder")


@dataclass
class PrivacyConfig:
    """The DP-SGD mechanism: clipping, noise, sampling and the budget."""

    enabled: bool = True
    clip_norm: float = 1.0
    noise_multiplier: float | None = None  # sigma; or give target_epsilon to calibrate it
    target_epsilon: float | None = None
    delta: float | None = None  # default: 1 / (10 N)
    allow_large_delta: bool = False  # delta >= 1/N is refused unless this is set
    sample_rate: float | None = None  # Poisson rate q; or give train.batch_size (expected) instead
    clipping: str = "flat"  # flat | per_layer | automatic
    automatic_gamma: float = 0.01  # automatic clipping: c_i = C / (n_i + gamma)
    mode: str = "bookkeeping"  # bookkeeping (one backward) | two_pass (second backward on sum c_i L_i)
    memory_budget_mb: float | None = None  # per-layer ghost/materialise/stream choice; None = default (strategy.py)
    max_epsilon: float | None = None  # stop cleanly before this would be exceeded; default target_epsilon
    seed: int | None = None  # None = secret from OS entropy; a fixed seed makes the noise reproducible (tests)
    accountant: str = "pld"  # pld | rdp: which one gives the headline epsilon

    def validate(self) -> None:
        if self.clip_norm <= 0 or not math.isfinite(self.clip_norm):
            raise ConfigError(f"privacy.clip_norm must be a positive number; got {self.clip_norm}")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ConfigError(f"privacy.noise_multiplier must be >= 0; got {self.noise_multiplier}")
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ConfigError("give privacy.noise_multiplier or privacy.target_epsilon, not both")
        _epsilon("privacy.target_epsilon", self.target_epsilon)
        if self.enabled and self.noise_multiplier is None and self.target_epsilon is None:
            raise ConfigError("set privacy.noise_multiplier (sigma) or privacy.target_epsilon")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta must be in (0, 1); got {self.delta}")
        if self.sample_rate is not None and not 0 < self.sample_rate <= 1:
            raise ConfigError(f"privacy.sample_rate must be in (0, 1]; got {self.sample_rate}")
        _choice("privacy.clipping", self.clipping, ("flat", "per_layer", "automatic"))
        _choice("privacy.mode", self.mode, ("bookkeeping", "two_pass"))
        _choice("privacy.accountant", self.accountant, ("pld", "rdp"))
        if self.memory_budget_mb is not None and self.memory_budget_mb < 0:
            raise ConfigError(f"privacy.memory_budget_mb must be >= 0; got {self.memory_budget_mb}")
        if self.automatic_gamma <= 0:
            raise ConfigError(f"privacy.automatic_gamma must be > 0; got {self.automatic_gamma}")
        if self.seed is not None and not 0 <= self.seed < 2**124:
            raise ConfigError("privacy.seed must be a non-negative integer below 2**124")  # never echo a secret
        _epsilon("privacy.max_epsilon", self.max_epsilon)


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int | None = 64  # expected (Poisson) batch size qN, used when privacy.sample_rate is not set
    micro_batch_size: int = 16  # fixed shape of a micro-batch per data-parallel rank
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    lr_schedule: str = "constant"  # constant | cosine | linear (dpdist.train.schedule)
    warmup_steps: int = 0  # linear warm-up to lr over these first steps
    min_lr: float = 0.0  # where cosine/linear decay ends, at step train.steps
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.0
    log_every: int = 10
    run_dir: str | None = None  # default: runs/<date>-<time>; an existing run directory is never reused
    progress: bool = True
    checkpoint_every: int = 0  # steps between sharded checkpoints (0: only when stopped by a signal)
    keep_checkpoints: int = 2  # newest committed checkpoints kept; older ones are removed after each commit
    backend: str = "native"  # native | fsdp (FSDP2 sharding) | deepspeed (ZeRO; settings in the deepspeed section)
    tensorboard: bool = False  # rank 0 also writes metrics.jsonl's scalars under RUN_DIR/tensorboard/
    precision: str = "fp32"  # fp32 | bf16: bf16 forward and backward, fp32 weights and pre-noise sums
    activation_checkpointing: str = "none"  # none | blocks: recompute each block in the backward (less memory)

    def validate(self) -> None:
        _positive(self, "train", "steps", "micro_batch_size", "log_every", "keep_checkpoints")
        from .train.activation_checkpointing import MODES as CHECKPOINTING
        from .train.backends import BACKENDS
        from .train.precision import PRECISIONS

        _choice("train.backend", self.backend, tuple(BACKENDS))
        if self.checkpoint_every < 0:
            raise ConfigError(f"train.checkpoint_every must be >= 0 (0: only on a stop signal); got {self.checkpoint_every}")
        if self.batch_size is not None and self.batch_size <= 0:
            raise ConfigError(f"train.batch_size must be > 0; got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0; got {self.lr}")
        # what torch's optimizers would refuse only once the workers build them
        if self.weight_decay < 0 or self.momentum < 0:
            raise ConfigError(f"train.weight_decay and train.momentum must be >= 0; got {self.weight_decay} and "
                              f"{self.momentum}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {list(self.betas)}")
        _choice("train.optimizer", self.optimizer, ("adamw", "sgd"))
        _choice("train.precision", self.precision, PRECISIONS)
        _choice("train.activation_checkpointing", self.activation_checkpointing, CHECKPOINTING)
        _choice("train.lr_schedule", self.lr_schedule, ("constant", "cosine", "linear"))
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"train.warmup_steps must be >= 0 and below train.steps ({self.steps}); got "
                              f"{self.warmup_steps}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"train.min_lr must be in [0, train.lr = {self.lr}]; got {self.min_lr}")
        if self.min_lr and self.lr_schedule == "constant":
            raise ConfigError("train.min_lr is where a decay ends; set train.lr_schedule=cosine or linear, or drop "
                              "train.min_lr")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("train.tensorboard=true needs the tensorboard package: pip install tensorboard")


@dataclass
class ParallelConfig:
    data: int = 1
    tensor: int = 1
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    device: str = "cpu"  # cpu | cuda

    def validate(self) -> None:
        _positive(self, "parallel", "data", "tensor")
        _choice("parallel.backend", self.backend, ("auto", "gloo", "nccl"))
        _choice("parallel.device", self.device, ("cpu", "cuda"))

    @property
    def world_size(self) -> int:
        return self.data * self.tensor


@dataclass
class LaunchConfig:
    """How ``torchrun`` is started (see ``dpdist.runtime.launch``); inside a Slurm job the node count
    and rendezvous come from ``SLURM_*`` instead."""

    nnodes: int = 1  # > 1: multi-node; every node runs the printed torchrun command
    rdzv_endpoint: str | None = None  # host:port of the c10d rendezvous, required with nnodes > 1
    rdzv_id: str = "dpdist"  # the same on every node of one job
    max_restarts: int = 0  # torchrun restarts the workers this often after a failure; they resume from a checkpoint
    shutdown_timeout: int = 120  # seconds torchrun gives workers to checkpoint after a stop signal before SIGKILL

    def validate(self) -> None:
        _positive(self, "launch", "nnodes", "shutdown_timeout")
        if self.max_restarts < 0:
            raise ConfigError(f"launch.max_restarts must be >= 0; got {self.max_restarts}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError("launch.nnodes > 1 needs launch.rdzv_endpoint=HOST:PORT (a host every node reaches)")
        if self.rdzv_endpoint and ":" not in self.rdzv_endpoint:
            raise ConfigError(f"launch.rdzv_endpoint must be HOST:PORT; got {self.rdzv_endpoint!r}")


@dataclass
class AnadpConfig:
    """ANADP adaptive noise allocation (algorithms.md section 7; dpdist.privacy.anadp): per-layer
    clipping thresholds C_k = C/sqrt(K) and noise s_k = sigma C_k / sqrt(w_k), with importance weights
    w_k from moving averages of the already-released noisy gradient, so sum_k C_k^2/s_k^2 = 1/sigma^2."""

    enabled: bool = False
    beta1: float = 0.85  # smoothing of the sensitivity |w * g_noisy|
    beta2: float = 0.85  # smoothing of its uncertainty
    warmup_steps: int = 20  # uniform noise (plain per-layer DP-SGD) for this many steps
    refresh_every: int = 1  # steps between re-allocations after the warm-up
    temperature: float = 1.0  # w_k proportional to S_k ** temperature
    min_weight: float = 0.1  # floor of w_k as a fraction of the uniform share 1/K

    def validate(self) -> None:
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"anadp.beta1 and anadp.beta2 must be in [0, 1); got {self.beta1}, {self.beta2}")
        if self.warmup_steps < 0 or self.refresh_every < 1 or self.temperature < 0 or not 0 < self.min_weight <= 1:
            raise ConfigError("anadp needs warmup_steps >= 0, refresh_every >= 1, temperature >= 0 and 0 < min_weight "
                              f"<= 1; got {self.warmup_steps}, {self.refresh_every}, {self.temperature}, {self.min_weight}")


@dataclass
class LsgConfig:
    """LSG low-rank + sparse gradients (algorithms.md section 8; dpdist.privacy.lsg): each block weight
    matrix is trained through rank-r carriers L, R chosen from already-released weights, with noise
    only on a batch-independent support of density rho in the r(p+d) carrier coordinates."""

    enabled: bool = False
    rank: int = 1
    density: float = 1.0  # fraction of carrier coordinates kept (and noised)
    refresh_every: int = 10  # steps between carrier (and mask) refreshes
    mask: str = "previous"  # previous: top coordinates of the last noisy carrier gradient | random: public seed

    def validate(self) -> None:
        if self.rank < 1 or not 0 < self.density <= 1 or self.refresh_every < 1:
            raise ConfigError(f"lsg needs rank >= 1, 0 < density <= 1 and refresh_every >= 1; got {self.rank}, "
                              f"{self.density}, {self.refresh_every}")
        _choice("lsg.mask", self.mask, ("previous", "random"))


@dataclass
class ReattentionConfig:
    """Re-Attention (algorithms.md section 4; ``dpdist.model.reattention``): the selected blocks subtract
    the DP-noise uncertainty of their keys from their attention logits.  The uncertainty of embedding
    row i grows as its token gets rarer, so the run needs token frequencies: ``dp`` (a Gaussian release
    of per-sequence presence counts, charged to the ledger; ``dpdist.privacy.frequencies``),
    ``uniform``, or the path of a JSON list of counts per token id from PUBLIC data."""

    enabled: bool = False
    # lambda of algorithms.md 4.2: multiplies every propagated noise variance (0: plain attention exactly)
    variance_scale: float = 1.0
    layers: str = "all"  # "all" or comma-separated block indices, e.g. "0,1"
    frequencies: str = "dp"  # dp | uniform | path of a JSON list of public counts
    frequency_noise: float = 10.0  # sigma_h: noise multiplier of the "dp" count release

    def validate(self) -> None:
        if not (0 <= self.variance_scale < math.inf and 0 < self.frequency_noise < math.inf):
            raise ConfigError("reattention.variance_scale must be >= 0 and reattention.frequency_noise > 0; got "
                              f"{self.variance_scale} and {self.frequency_noise}")
        if self.enabled and self.frequencies not in ("dp", "uniform") and not Path(self.frequencies).is_file():
            raise ConfigError(f"reattention.frequencies must be dp, uniform or the path of a JSON list of public token "
                              f"counts; {self.frequencies!r} is none of these")

    def block_indices(self, n_layers: int) -> frozenset[int]:
        """The blocks ``layers`` selects in a model of ``n_layers`` blocks."""
        if self.layers.strip() == "all":
            return frozenset(range(n_layers))
        try:
            indices = [int(part) for part in self.layers.split(",")]
        except ValueError:
            raise ConfigError(f"reattention.layers must be 'all' or comma-separated block indices like '0,1'; got "
                              f"{self.layers!r}") from None
        outside = [i for i in indices if not 0 <= i < n_layers]
        if outside:
            raise ConfigError(f"reattention.layers {self.layers!r} names blocks {outside} outside [0, {n_layers}) "
                              "(model.n_layers)")
        return frozenset(indices)


@dataclass
class LoraConfig:
    """DP-LoRA (``dpdist.model.lora``): the model's weights are frozen and each targeted block linear
    learns a rank-``rank`` update (alpha / rank) B A; only A and B are clipped, noised and released."""

    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input
    targets: str = "all-linear"  # all-linear (every block linear, never the output layer) or e.g. "qkv,fc"

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1; got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be > 0; got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1); got {self.dropout}")
        if not self.targets.strip() or not all(part.strip() for part in self.targets.split(",")):
            raise ConfigError(f"lora.targets must be all-linear or comma-separated layer names like qkv,fc; got "
                              f"{self.targets!r}")


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine behind ``train.backend=deepspeed`` (``dpdist.train.backends.deepspeed``).

    ``config_file`` is a DeepSpeed JSON passed through to ``deepspeed.initialize``; a key set here
    (not None) overrides it, and one left None is taken from the file or else from the default noted.
    Batch sizes, gradient accumulation, clipping and the optimizer are dpdist's own (Poisson sampling
    decides the accumulation boundary, per-example clipping replaces DeepSpeed's), so the file may not
    set them; ``dpdist.deepspeed_config`` says what is refused and why.
    """

    zero_stage: int | None = None  # 1 or 2 (default 1); 3 is refused: README, "DeepSpeed"
    bf16: bool | None = None  # bf16 weights and gradients, fp32 master partitions (default false); fp16 is refused
    reduce_bucket_size: int | None = None  # elements per gradient reduction bucket (DeepSpeed default 5e8)
    allgather_bucket_size: int | None = None  # elements per parameter all-gather bucket (DeepSpeed default 5e8)
    overlap_comm: bool | None = None  # overlap the gradient reduction with the backward (DeepSpeed default)
    config_file: str | None = None  # a DeepSpeed JSON

    def validate(self) -> None:
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"deepspeed.{key} must be > 0; got {value}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    anadp: AnadpConfig = field(default_factory=AnadpConfig)
    lsg: LsgConfig = field(default_factory=LsgConfig)
    reattention: ReattentionConfig = field(default_factory=ReattentionConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> "RunConfig":
        for name in (f.name for f in dataclasses.fields(self)):
            _finite(getattr(self, name), name)
        try:
            self.model.validate()
        except ValueError as exc:  # the model's own checks know nothing of ConfigError
            raise ConfigError(str(exc)) from None
        for section in (self.data, self.privacy, self.train, self.parallel, self.launch, self.deepspeed, self.anadp,
                        self.lsg, self.reattention, self.lora):
            section.validate()
        if self.reattention.enabled:
            self.reattention.block_indices(self.model.n_layers)
        _check_combinations(self)
        from .train.backends import check_backend_config

        check_backend_config(self)  # the backend's own refusals, before anything starts
        if self.parallel.world_size % self.launch.nnodes:
            raise ConfigError(f"parallel.data x parallel.tensor = {self.parallel.world_size} processes do not split "
                              f"evenly over launch.nnodes = {self.launch.nnodes} nodes")
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len}); "
                "lower data.seq_len or raise model.max_seq_len")
        if self.privacy.sample_rate is None and self.train.batch_size is None:
            raise ConfigError("set privacy.sample_rate or train.batch_size (the expected batch size)")
        if self.model.n_heads % self.parallel.tensor:
            raise ConfigError(f"model.n_heads ({self.model.n_heads}) must be divisible by parallel.tensor "
                              f"({self.parallel.tensor})")
        if self.model.kv_heads % self.parallel.tensor:
            raise ConfigError(f"model.n_kv_heads ({self.model.kv_heads}) must be divisible by parallel.tensor "
                              f"({self.parallel.tensor})")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_combinations(cfg: RunConfig) -> None:
    """What combines with what: the one place these rules live (the step, the methods and the
    backends do not re-check them)."""
    p = cfg.privacy
    if p.mode == "two_pass" and p.clipping == "per_layer":
        raise ConfigError("privacy.clipping=per_layer already clips during the backward; use privacy.mode=bookkeeping")
    if cfg.lsg.enabled and (p.clipping == "per_layer" or p.mode == "two_pass" or cfg.anadp.enabled):
        raise ConfigError("lsg.enabled clips the carriers jointly with the dense parameters in one book-keeping "
                          "backward: use privacy.clipping=flat or automatic, privacy.mode=bookkeeping, and no anadp")
    if cfg.train.precision == "bf16":
        if cfg.model.dtype != "float32":
            raise ConfigError(f"train.precision=bf16 keeps fp32 master weights; set model.dtype=float32 (got "
                              f"{cfg.model.dtype})")
        if cfg.train.backend == "deepspeed":
            raise ConfigError("train.precision=bf16 is implemented for train.backend=native and fsdp; got deepspeed "
                              "(its bf16 mode reduces the clipped sums in bf16)")
        if p.enabled and p.mode == "two_pass":
            raise ConfigError(TWO_PASS_LOW_PRECISION)
    if cfg.reattention.enabled and (cfg.model.arch != "gpt" or cfg.model.activation != "gelu"):
        raise ConfigError("reattention.enabled is implemented for model.arch=gpt with model.activation=gelu only")
    if cfg.anadp.enabled and p.clipping != "per_layer":
        raise ConfigError("anadp.enabled allocates noise per layer group, which needs the groups clipped "
                          "separately: set privacy.clipping=per_layer")
    if cfg.lora.enabled:
        try:
            lora_targets(cfg.model.arch, cfg.lora.targets)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if cfg.lsg.enabled:
            raise ConfigError("lora.enabled and lsg.enabled both reparametrize the block linear layers; enable one")
        if cfg.reattention.enabled:
            raise ConfigError("lora.enabled is not supported with reattention.enabled (its variance propagation "
                              "reads the plain linear layers); disable one")
        if cfg.lora.dropout > 0 and cfg.parallel.tensor > 1:
            raise ConfigError("lora.dropout > 0 needs parallel.tensor=1: the tensor ranks would draw different "
                              "dropout masks for their replicated adapter inputs; set lora.dropout=0")
        if cfg.train.backend == "deepspeed":
            raise ConfigError("lora.enabled is not supported with train.backend=deepspeed (its ZeRO step is not "
                              "checked against a model with frozen parameters); use train.backend=native")
    if cfg.train.backend == "deepspeed":
        for key, on in (("anadp.enabled", cfg.anadp.enabled), ("lsg.enabled", cfg.lsg.enabled),
                        ("reattention.enabled", cfg.reattention.enabled)):
            if on:
                raise ConfigError(f"{key} is not supported with train.backend=deepspeed (the DeepSpeed step adds "
                                  "uniform noise on ZeRO partitions); use train.backend=native")
    if cfg.train.backend == "fsdp":
        for key, on in (("anadp.enabled", cfg.anadp.enabled), ("lsg.enabled", cfg.lsg.enabled),
                        ("reattention.enabled", cfg.reattention.enabled), ("lora.enabled", cfg.lora.enabled)):
            if on:
                raise ConfigError(f"{key} is not supported with train.backend=fsdp (its state and parameters are "
                                  "not sharded over the data group); use train.backend=native")


def _positive(section: Any, name: str, *keys: str) -> None:
    for key in keys:
        value = getattr(section, key)
        if not value > 0:
            raise ConfigError(f"{name}.{key} must be > 0; got {value}")


def _finite(section: Any, name: str) -> None:
    """No float key has a use for nan or inf: nan passes every range check written as ``if x <= 0:
    refuse``, and inf trains (train.lr=inf)."""
    for key in (f.name for f in dataclasses.fields(section)):
        value = getattr(section, key)
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple) else (value,))):
            raise ConfigError(f"{name}.{key} must be finite (no nan or inf); got {value}")


def _epsilon(key: str, value: float | None) -> None:
    if value is None:
        return
    from .privacy.accounting import MAX_EPSILON  # imported only when needed: dp_accounting is slow to import

    if not 0 < value <= MAX_EPSILON:
        raise ConfigError(f"{key} must be in (0, {MAX_EPSILON:g}]; got {value:g} (past {MAX_EPSILON:g} no guarantee is "
                          "left and the PLD accountant runs out of memory; to train without privacy set "
                          "privacy.enabled=false)")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        hint = next((f"; did you mean {a}?" for a in allowed if a == value.replace("-", "_")), "")
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}{hint}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Turn a YAML or command-line value into the declared type, or say why it cannot be."""
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"{key} may not be null")
    if isinstance(value, str) and value.lower() in ("null", "none") and "None" in text:
        return None
    try:
        if text.startswith("dict"):
            items = yaml.safe_load(value) if isinstance(value, str) else value
            if not isinstance(items, dict):
                raise ValueError(value)
            return dict(items)
        if text.startswith("tuple"):
            items = yaml.safe_load(value) if isinstance(value, str) else value
            return tuple(float(v) for v in items)
        if "bool" in text:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if "int" in text and "float" not in text:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if "float" in text:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        shown = "a value not shown (it is secret)" if key in SECRET_KEYS else repr(value)
        raise ConfigError(f"{key} expects {text}; got {shown}") from None


def _apply(section: Any, values: dict, prefix: str) -> None:
    hints = get_type_hints(type(section))
    for key, value in values.items():
        if key not in hints:
            if prefix == "model." and key in MOVED_MODEL_KEYS:
                raise ConfigError(f"model.{key} is now reattention.{MOVED_MODEL_KEYS[key]}")
            known = ", ".join(f.name for f in dataclasses.fields(section))
            raise ConfigError(f"unknown config key {prefix}{key!s}; known keys here: {known}")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{key} is a section; give it as a mapping")
            _apply(current, value, f"{prefix}{key}.")
        else:
            setattr(section, key, _coerce(value, hints[key], f"{prefix}{key}"))


def _moved_model_keys(raw: dict) -> dict:
    """``raw`` with an older run's ``model.reattention*`` keys under their names in ``reattention``."""
    model = raw.get("model")
    if not isinstance(model, dict) or not MOVED_MODEL_KEYS.keys() & model.keys():
        return raw
    moved = {new: model[old] for old, new in MOVED_MODEL_KEYS.items() if old in model}
    section = raw.get("reattention") or {}
    if not isinstance(section, dict):
        return raw  # refused by _apply
    if moved.keys() & section.keys():
        raise ConfigError("the config gives Re-Attention keys both under model (their old names) and under "
                          "reattention; keep only the reattention section")
    return {**raw, "model": {k: v for k, v in model.items() if k not in MOVED_MODEL_KEYS},
            "reattention": {**moved, **section}}


def parse_overrides(pairs: list[str]) -> dict:
    """``["train.steps=5", "privacy.seed=1"]`` -> nested dict with YAML-typed values."""
    tree: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like section.key=value")
        key, raw = pair.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override key {key!r} must be dotted, e.g. train.steps=5")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults), apply dotted overrides and validate."""
    cfg = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}".splitlines()[0]) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
        _apply(cfg, _moved_model_keys(raw), "")
    if overrides:
        _apply(cfg, parse_overrides(overrides), "")
    if cfg.model.pretrained is not None:  # the folder's config.json gives the architecture and shape
        try:
            cfg.model = resolve_pretrained(cfg.model)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if cfg.data.source == "text" and cfg.data.tokenizer_path is None:
            cfg.data.tokenizer_path = _pretrained_tokenizer(cfg.model.pretrained)
    return cfg.validate()


def _pretrained_tokenizer(folder: str) -> str:
    """A pretrained model reads ids of the tokenizer it came with: one trained on the corpus would not match."""
    if not any((Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise ConfigError(f"model.pretrained {folder} holds no tokenizer.json or tokenizer.model; set "
                          "data.tokenizer_path to the model's tokenizer")
    return folder


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    data = cfg.to_dict()
    data["train"]["betas"] = list(data["train"]["betas"])
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
