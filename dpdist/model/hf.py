"""Hugging Face checkpoints in and out: GPT-2, Llama, Mistral and Qwen2 folders (config.json + safetensors).

Import reads ``config.json`` into a :class:`ModelConfig` and fills a model built on the meta device
from safetensors slices: every rank reads only the rows or columns of its own shards, so no process
ever holds the full model unless it is the whole model.  Export writes a full state dict (our names,
no vocabulary padding) as one ``model.safetensors`` with the ``config.json`` transformers reads; the
adapters of a LoRA model export in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``).

Names: a Llama-family module is named as in transformers (HF key = ``"model." + ours``, ``lm_head``
as is).  GPT-2 keeps dpdist's GPT names and differs in layout: its Conv1D weights are stored
``[in, out]`` (transposed), and its fused ``c_attn`` holds all queries, then all keys, then all values,
where our ``qkv`` rows are ordered (head, q|k|v, head_dim) so that a split over ranks keeps heads whole.

This module reads and writes files only (safetensors + json); transformers is never imported.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import ARCHITECTURES, DTYPES
from .config import ROPE_SCALINGS, ModelConfig
from .lora import adapter_state_dict

SUPPORTED = ("gpt2", "llama", "mistral", "qwen2")
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
              "qwen2": "Qwen2ForCausalLM"}
DEFAULT_EXPORT = {"gpt": "gpt2", "llama": "llama"}
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")
# our GPT name -> GPT-2's (without the "transformer." prefix GPT2LMHeadModel adds)
GPT2_NAMES = [(r"^tok_emb\.", "wte."), (r"^pos_emb\.", "wpe."), (r"^blocks\.", "h."), (r"\.attn\.qkv\b", ".attn.c_attn"),
              (r"\.attn\.proj\b", ".attn.c_proj"), (r"\.mlp\.fc\b", ".mlp.c_fc"), (r"\.mlp\.proj\b", ".mlp.c_proj")]
# One read's temporary tensor (and the file pages it maps): bounded, so that a rank's load peaks near
# its own shard rather than its shard plus its largest tensor.
READ_BYTES = 16 * 2**20
CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")  # GPT-2 weights stored [in, out]


# ---------------------------------------------------------------------------------------------- config

def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path} not found; model.pretrained must be a local Hugging Face model folder")
    return json.loads(path.read_text())


def read_config(folder: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face folder's ``config.json`` (dtype and init_seed at their
    defaults; ``pretrained`` and ``hf_model_type`` set)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"model.pretrained {str(folder)!r} is not a folder; give a local Hugging Face model folder")
    hf = _read_json(folder / "config.json")
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(f"{folder}/config.json has model_type {kind!r}; supported: {', '.join(SUPPORTED)}")
    shape = _gpt2_shape(hf) if kind == "gpt2" else _llama_shape(hf, kind)
    cfg = ModelConfig(**shape, pretrained=str(folder), hf_model_type=kind)
    cfg.validate()
    return cfg


def _refuse(hf: dict, key: str, wanted, why: str) -> None:
    if hf.get(key, wanted) != wanted:
        raise ValueError(f"config.json {key}={hf[key]!r} is not supported ({why}); supported: {wanted!r}")


def _gpt2_shape(hf: dict) -> dict:
    _refuse(hf, "scale_attn_weights", True, "dpdist scales attention by 1/sqrt(head_dim)")
    _refuse(hf, "scale_attn_by_inverse_layer_idx", False, "no per-layer attention scaling")
    _refuse(hf, "reorder_and_upcast_attn", False, "no reordered attention")
    activation = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(
        hf.get("activation_function", "gelu_new"))
    if activation is None:
        raise ValueError(f"config.json activation_function={hf['activation_function']!r} is not supported; supported: "
                         "gelu_new, gelu_pytorch_tanh, gelu")
    d = hf.get("n_embd", 768)
    return dict(arch="gpt", vocab_size=hf.get("vocab_size", 50257), d_model=d, n_layers=hf.get("n_layer", 12),
                n_heads=hf.get("n_head", 12), max_seq_len=hf.get("n_positions", 1024),
                mlp_hidden=hf.get("n_inner") or 4 * d, norm="layernorm", bias=True,
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation=activation,
                tie_embeddings=hf.get("tie_word_embeddings", True))


def _llama_shape(hf: dict, kind: str) -> dict:
    _refuse(hf, "hidden_act", "silu", "the MLP is SwiGLU")
    _refuse(hf, "attention_bias", False, "Llama's attention_bias also adds an o_proj bias; only q/k/v biases (Qwen2)")
    _refuse(hf, "mlp_bias", False, "the MLP has no biases")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // heads):
        raise ValueError(f"config.json head_dim={hf['head_dim']} is not hidden_size / num_attention_heads = "
                         f"{d // heads}, which dpdist requires")
    if kind == "qwen2" and hf.get("use_sliding_window", False):
        raise ValueError("config.json use_sliding_window=true (Qwen2's per-layer windows) is not supported; "
                         "supported: false")
    theta, scaling = _rope(hf)
    return dict(arch="llama", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"],
                n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
                max_seq_len=hf.get("max_position_embeddings", 2048), mlp_hidden=hf["intermediate_size"],
                norm="rmsnorm", bias=False, norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
                rope_scaling=scaling, qkv_bias=kind == "qwen2",
                sliding_window=hf.get("sliding_window") if kind == "mistral" else None,
                tie_embeddings=hf.get("tie_word_embeddings", False))


def _rope(hf: dict) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` from transformers 5's ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling`` keys."""
    if isinstance(hf.get("rope_parameters"), dict):
        params = dict(hf["rope_parameters"])
        theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    else:
        params, theta = dict(hf.get("rope_scaling") or {}), hf.get("rope_theta", 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"config.json rope type {kind!r} is not supported; supported: default, "
                         f"{', '.join(ROPE_SCALINGS)}")
    params.pop("type", None)
    return float(theta), {**params, "rope_type": kind}


def resolve_pretrained(model_cfg: ModelConfig) -> ModelConfig:
    """``model_cfg`` with the architecture and shape of its ``pretrained`` folder (dtype, init_seed and
    padding_idx stay the user's); as it is when ``pretrained`` is unset."""
    if model_cfg.pretrained is None:
        return model_cfg
    return dataclasses.replace(read_config(model_cfg.pretrained), dtype=model_cfg.dtype,
                               init_seed=model_cfg.init_seed, padding_idx=model_cfg.padding_idx)


# ----------------------------------------------------------------------------------------------- names

def hf_name(cfg: ModelConfig, name: str) -> str:
    """The Hugging Face name of our parameter (or module path) ``name`` in the export of ``cfg``."""
    if name.startswith("lm_head"):
        return name
    if cfg.arch == "llama":
        return "model." + name
    for pattern, replacement in GPT2_NAMES:
        name = re.sub(pattern, replacement, name)
    return "transformer." + name


def _gpt2_qkv_order(n_heads: int, head_dim: int) -> torch.Tensor:
    """Indices into GPT-2's c_attn outputs (q of all heads | k | v) in our row order (head, q|k|v, dim)."""
    d = n_heads * head_dim
    return torch.tensor([part * d + h * head_dim + e for h in range(n_heads) for part in range(3) for e in range(head_dim)])


# --------------------------------------------------------------------------------------------- weights

class _Checkpoint:
    """The tensors of a folder's ``model.safetensors`` or its sharded set (``model.safetensors.index.json``).

    Each read opens its file anew and closes it: a file's pages a process has touched count in its
    resident memory for as long as the file stays mapped, which would add the checkpoint to every rank."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").is_file():
            with safe_open(folder / "model.safetensors", framework="pt") as f:
                weight_map = {key: "model.safetensors" for key in f.keys()}
        else:
            raise ValueError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
        missing = sorted({file for file in weight_map.values() if not (folder / file).is_file()})
        if missing:
            raise ValueError(f"{folder} lacks the shard file(s) {', '.join(missing)} listed in "
                             "model.safetensors.index.json; download the complete model")
        self.folder, self.weight_map = folder, weight_map

    def find(self, *names: str) -> str | None:
        return next((n for n in names if n in self.weight_map), None)

    def read(self, name: str, expected: tuple[int, ...], dim: int | None, start: int, stop: int,
             rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) ``start:stop`` of ``name`` (all of it for dim None), checked
        against its ``expected`` full shape; only the ``rows`` range of those when given."""
        with safe_open(self.folder / self.weight_map[name], framework="pt") as f:
            view = f.get_slice(name)
            shape = tuple(view.get_shape())
            if shape != tuple(expected):
                raise ValueError(f"tensor {name} has shape {list(shape)} in {self.folder}, but config.json implies "
                                 f"{list(expected)}")
            first, last = (start, stop) if dim == 0 else (0, shape[0] if shape else 0)
            if rows is not None:
                first, last = first + rows[0], first + rows[1]
            if not shape:
                return view[:]
            return view[first:last, start:stop] if dim == 1 else view[first:last]


def _local_box(param: nn.Parameter) -> tuple[int | None, int, int]:
    """``(dim, start, stop)``: the part of the full tensor this rank's shard holds along its partition
    dimension (dim None: all of it)."""
    dim = getattr(param, "partition_dim", None)
    if dim is None:
        return None, 0, param.shape[0] if param.dim() else 0
    start = param.partition_offset
    return dim, start, start + param.shape[dim]


def _gpt2_qkv(checkpoint: _Checkpoint, key: str, cfg: ModelConfig, start: int, stop: int, ndim: int) -> torch.Tensor:
    """Our ``qkv`` rows ``start:stop`` (whole heads) from GPT-2's ``c_attn``: this rank's columns of
    the q, k and v blocks, interleaved per head."""
    d, head_dim = cfg.d_model, cfg.d_model // cfg.n_heads
    first, last = start // (3 * head_dim), stop // (3 * head_dim)
    expected = (d, 3 * d) if ndim == 2 else (3 * d,)
    parts = [checkpoint.read(key, expected, ndim - 1, part * d + first * head_dim, part * d + last * head_dim)
             for part in range(3)]  # each [d, heads * head_dim] (weight) or [heads * head_dim] (bias)
    parts = [p.t().reshape(last - first, head_dim, -1) for p in parts] if ndim == 2 else \
        [p.reshape(last - first, head_dim) for p in parts]
    return torch.stack(parts, dim=1).reshape(stop - start, *expected[:-1])


def _fill(model: nn.Module, name: str, param: nn.Parameter, checkpoint: _Checkpoint) -> None:
    """Copy this rank's shard of parameter ``name`` from ``checkpoint`` into ``param``, in our layout,
    reading at most ``READ_BYTES`` at a time (GPT-2's transposed or fused tensors whole)."""
    cfg = model.cfg
    key = hf_name(cfg, name)
    found = checkpoint.find(key, key.removeprefix("transformer."))  # hub GPT-2 files have no prefix
    if found is None:
        raise ValueError(f"tensor {key} (for {name}) is missing from {checkpoint.folder}")
    dim, start, stop = _local_box(param)
    full = list(param.full_shape)
    rows = getattr(param, "unpadded_rows", None)
    if rows is not None:  # a vocabulary table: rows past vocab_size only pad it and stay zero
        full[0] = rows
        stop = min(stop, rows) if dim == 0 else rows
        start = min(start, stop)
    if cfg.arch == "gpt" and ".attn.c_attn." in found:
        param.copy_(_gpt2_qkv(checkpoint, found, cfg, start, stop, param.dim()))
        return
    if cfg.arch == "gpt" and CONV1D.search(found):
        param.copy_(checkpoint.read(found, tuple(reversed(full)), None if dim is None else 1 - dim, start, stop).t())
        return
    if not full:
        param.copy_(checkpoint.read(found, (), None, 0, 0))
        return
    stored = stop - start if dim == 0 else full[0]  # rows past them pad a vocabulary table
    step = max(1, READ_BYTES // max(1, param[:1].numel() * param.element_size()))
    for first in range(0, stored, step):
        last = min(stored, first + step)
        param[first:last].copy_(checkpoint.read(found, tuple(full), dim, start, stop, rows=(first, last)))
    param[stored:].zero_()


def load_weights(model: nn.Module, folder: str | Path) -> None:
    """Fill ``model`` (built from the config of ``folder``, any tensor degree) with the checkpoint's
    weights, each rank reading only its own slices."""
    checkpoint = _Checkpoint(Path(folder))
    with torch.no_grad():
        for name, param in model.named_parameters():
            _fill(model, name, param, checkpoint)
        table = model.tok_emb if model.cfg.arch == "gpt" else model.embed_tokens
        head = checkpoint.find("lm_head.weight")
        if model.lm_head is None and head is not None:  # tied: a stored head must be the embedding itself
            dim, start, stop = _local_box(table.weight)
            rows = min(stop, model.cfg.vocab_size)
            stored = checkpoint.read(head, (model.cfg.vocab_size, model.cfg.d_model), dim, min(start, rows), rows)
            if not torch.equal(stored.to(table.weight.dtype), table.weight[: stored.shape[0]]):
                raise ValueError(f"{folder}/config.json ties the embeddings, but lm_head.weight differs from the "
                                 "embedding; set tie_word_embeddings to false in config.json")


def _materialize(model: nn.Module, device, dtype: torch.dtype) -> None:
    """Give every parameter of a model built on the meta device real (uninitialised) storage, keeping
    the sharding marks the layers put on it (``Module.to_empty`` would drop them)."""
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None:
                real = nn.Parameter(torch.empty(param.shape, device=device, dtype=dtype), param.requires_grad)
                real.__dict__.update(param.__dict__)
                module._parameters[key] = real


def build_pretrained(cfg: ModelConfig, tp_group=None, device: str | torch.device = "cpu",
                     reattention=None) -> nn.Module:
    """``build_model`` for a ``cfg`` with ``pretrained`` set: the weights are read from the folder, each
    rank its own slices, into a model built on the meta device (no random initialisation first)."""
    cfg.validate()
    with torch.device("meta"):
        model = ARCHITECTURES[cfg.arch](cfg, tp_group, reattention)
    _materialize(model, device, DTYPES[cfg.dtype])
    load_weights(model, cfg.pretrained)
    return model


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float64, tp_group=None,
                    device: str | torch.device = "cpu") -> nn.Module:
    """The model of a local Hugging Face folder (gpt2, llama, mistral, qwen2) in ``dtype``, sharded over
    ``tp_group``."""
    names = {v: k for k, v in DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {', '.join(map(str, names))}; got {dtype}")
    return build_pretrained(dataclasses.replace(read_config(path), dtype=names[dtype]), tp_group, device)


# ---------------------------------------------------------------------------------------------- export

def _export_type(cfg: ModelConfig) -> str:
    kind = cfg.hf_model_type or DEFAULT_EXPORT[cfg.arch]
    if (kind == "gpt2") != (cfg.arch == "gpt"):
        raise ValueError(f"model.hf_model_type={kind} does not fit model.arch={cfg.arch}")
    if kind == "gpt2" and (cfg.norm != "layernorm" or not cfg.bias):
        raise ValueError("GPT-2 has LayerNorm and biases; a model with model.norm=rmsnorm or model.bias=false has "
                         "no GPT-2 export")
    if cfg.arch == "llama" and cfg.qkv_bias != (kind == "qwen2"):
        raise ValueError(f"q/k/v biases (model.qkv_bias={cfg.qkv_bias}) are Qwen2's; set model.hf_model_type=qwen2 "
                         "with qkv_bias and llama or mistral without")
    if cfg.sliding_window is not None and kind != "mistral":
        raise ValueError("a sliding window (model.sliding_window) exports only as model.hf_model_type=mistral")
    return kind


def hf_config(cfg: ModelConfig, dtype: torch.dtype, token_ids: dict[str, int] | None = None) -> dict:
    """The ``config.json`` of ``cfg``'s export.  ``token_ids``: its special token ids (``bos_token_id``,
    ``eos_token_id``, ``pad_token_id``), e.g. from the tokenizer the model was trained with; None: those
    of the imported folder, when it is still there."""
    kind = _export_type(cfg)
    common = {"architectures": [HF_CLASSES[kind]], "model_type": kind, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": str(dtype).removeprefix("torch.")}
    if kind == "gpt2":
        shape = {"n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_positions": cfg.max_seq_len,
                 "n_inner": cfg.hidden, "layer_norm_epsilon": cfg.norm_eps,
                 "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
                 "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # dpdist trains without dropout
    else:
        shape = {"hidden_size": cfg.d_model, "intermediate_size": cfg.hidden, "num_hidden_layers": cfg.n_layers,
                 "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
                 "head_dim": cfg.d_model // cfg.n_heads, "max_position_embeddings": cfg.max_seq_len,
                 "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "rope_theta": cfg.rope_theta,
                 "rope_scaling": cfg.rope_scaling, "attention_dropout": 0.0}
        if kind == "llama":
            shape.update(attention_bias=False, mlp_bias=False)
        if kind == "mistral":
            shape["sliding_window"] = cfg.sliding_window
        if kind == "qwen2":
            shape.update(use_sliding_window=False, sliding_window=None)
    if token_ids is None and cfg.pretrained is not None and (Path(cfg.pretrained) / "config.json").is_file():
        source = json.loads((Path(cfg.pretrained) / "config.json").read_text())
        token_ids = {key: source[key] for key in SPECIAL_TOKENS if source.get(key) is not None}
    unknown = sorted(set(token_ids or {}) - set(SPECIAL_TOKENS))
    if unknown:
        raise ValueError(f"token_ids has {', '.join(unknown)}; give only {', '.join(SPECIAL_TOKENS)}")
    return {**common, **shape, **(token_ids or {})}


def save_pretrained(state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path,
                    token_ids: dict[str, int] | None = None) -> Path:
    """Write a full state dict with our names (``strip_vocab_padding(full_state_dict(...))``) as a Hugging
    Face folder for ``cfg.hf_model_type`` (default gpt2 for gpt, llama for llama): config.json (special
    token ids as :func:`hf_config` takes them) and one model.safetensors.  Returns the folder."""
    kind = _export_type(cfg)
    out_dir = Path(out_dir)
    tensors = {}
    for name, tensor in state.items():
        key, tensor = hf_name(cfg, name), tensor.detach().cpu()
        if name.endswith(("tok_emb.weight", "embed_tokens.weight")) or name == "lm_head.weight":
            tensor = tensor[: cfg.vocab_size]
        if kind == "gpt2" and ".attn.c_attn." in key:
            tensor = _to_gpt2_qkv(cfg, tensor if tensor.dim() == 1 else tensor.t(), dim=-1)
        elif kind == "gpt2" and CONV1D.search(key):
            tensor = tensor.t()
        tensors[key] = tensor.contiguous()
    dtype = next(iter(tensors.values())).dtype
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hf_config(cfg, dtype, token_ids), indent=2) + "\n")
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def _to_gpt2_qkv(cfg: ModelConfig, tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """``tensor`` with its ``dim`` (our qkv outputs, ordered head, q|k|v, dim) in c_attn's order (q | k | v)."""
    order = torch.argsort(_gpt2_qkv_order(cfg.n_heads, cfg.d_model // cfg.n_heads))
    return tensor.index_select(dim, order)


# --------------------------------------------------------------------------------------------- adapters

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what peft's PeftModelForCausalLM puts in front of the model's names


def peft_adapter(state: dict[str, torch.Tensor], cfg: ModelConfig, *, rank: int, alpha: float, dropout: float,
                 base: str | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The ``adapter_config.json`` and ``adapter_model.safetensors`` tensors of peft's LoRA format for
    the adapters in ``state`` (a full state dict of an adapted model, ``dpdist.model.lora``), applied
    to the Hugging Face export of ``cfg``; ``base``: the base model's name or folder, or None.

    peft computes ``base(x) + (alpha / r) lora_B(lora_A(dropout(x)))`` as we do, so A and B keep their
    shapes under the base layer's Hugging Face name.  GPT-2's Conv1D layers only store their own weight
    transposed (peft's ``fan_in_fan_out`` concerns merging into it), but the outputs of ``c_attn`` come
    in GPT-2's q | k | v order: the rows of its B are permuted as the base's are."""
    kind = _export_type(cfg)
    tensors, leaves = {}, set()
    for key, value in adapter_state_dict(state).items():
        module, _, param = key.rpartition(".lora_")
        if param not in ("A.weight", "B.weight"):
            raise ValueError(f"{key} is not a LoRA adapter weight (lora_A.weight or lora_B.weight)")
        if param == "A.weight" and value.shape[0] != rank:
            raise ValueError(f"{key} has rank {value.shape[0]}, not lora.rank {rank}; export with the lora section "
                             "the adapters were trained with")
        name = hf_name(cfg, module)
        value = value.detach().cpu()
        if kind == "gpt2" and name.endswith(".attn.c_attn") and param == "B.weight":
            value = _to_gpt2_qkv(cfg, value, dim=0)
        tensors[f"{PEFT_PREFIX}{name}.lora_{param}"] = value.contiguous()
        leaves.add(name.rsplit(".", 1)[-1])
    if not tensors:
        raise ValueError("the state dict holds no LoRA adapters (no .lora_A.weight / .lora_B.weight keys)")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank,
              "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(leaves), "bias": "none",
              "fan_in_fan_out": kind == "gpt2", "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "init_lora_weights": True, "inference_mode": True}
    return config, tensors


def save_adapter(state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path, *, rank: int, alpha: float,
                 dropout: float, base: str | None) -> Path:
    """Write :func:`peft_adapter`'s ``adapter_config.json`` and ``adapter_model.safetensors`` into
    ``out_dir``, which ``peft.PeftModel.from_pretrained(base_model, out_dir)`` loads.  Returns the folder."""
    config, tensors = peft_adapter(state, cfg, rank=rank, alpha=alpha, dropout=dropout, base=base)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out_dir
