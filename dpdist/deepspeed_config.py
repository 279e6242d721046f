"""The DeepSpeed JSON a run hands to ``deepspeed.initialize``, and what it may not contain.

Pure Python (no torch, no deepspeed), so a bad setting is refused when the config is read, before
any process starts.  The run's ``deepspeed`` section overrides the user's JSON; dpdist then sets the
keys it owns.  Refused, because each would change what the privacy guarantee is about:

- fp16: dynamic loss scaling skips a step when a gradient overflows, a data-dependent event that
  the accountant does not see;
- bf16 with privacy on: DeepSpeed keeps and reduces the gradient handed to it in bf16, so the
  per-rank clipped sums would be rounded and reduced in bf16 before the noise, and removing one of
  many near-duplicate examples can then move them by more than C; the native backend keeps them fp32;
- ``gradient_clipping``: DeepSpeed would rescale the pre-noise aggregate of the clipped gradients
  (still private, a projection onto a ball, but the noise then swamps a shrunken signal, and the
  update is no longer the DP-SGD update the native backend computes);
- batch sizes and accumulation steps: Poisson sampling decides how many micro-batches a step has;
- ``optimizer``/``scheduler``: the noise rides on dpdist's optimizer (``dpdist.train.backends.deepspeed``);
- ZeRO stage 3: the weights are partitioned during the backward, so a layer cannot form exact
  per-example norms from its local weight and activations (README, "DeepSpeed").
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import ConfigError

OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
REFUSED = {"optimizer": "the optimizer is train.optimizer (the noise is added on it)",
           "scheduler": "set train.lr; DeepSpeed schedulers are not wired to the privacy step",
           "zero_force_ds_cpu_optimizer": "the noise is added on dpdist's optimizer"}
DEFAULT_STAGE = 1


def _read_file(path: str) -> dict:
    try:
        loaded = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"deepspeed.config_file {path!r} cannot be read: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"deepspeed.config_file {path!r} is not valid JSON: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"deepspeed.config_file {path!r} must hold a JSON object")
    return loaded


def resolve_deepspeed_config(cfg) -> dict:
    """The DeepSpeed config of ``cfg`` (a RunConfig with train.backend=deepspeed), or a ConfigError."""
    ds = cfg.deepspeed
    merged = _read_file(ds.config_file) if ds.config_file else {}
    for key in OWNED:
        if key in merged:
            raise ConfigError(f"deepspeed.config_file sets {key}; dpdist sets it from train.micro_batch_size and "
                              "Poisson sampling (the accumulation boundary is the end of each sampled batch)")
    for key, why in REFUSED.items():
        if key in merged:
            raise ConfigError(f"deepspeed.config_file sets {key}: {why}; remove it")
    if merged.get("fp16", {}).get("enabled", False):
        raise ConfigError("fp16 is refused under DP: its loss scaler skips steps whose gradients overflow, a "
                          "data-dependent event the accountant does not see; use fp32, or train.precision=bf16 with "
                          "train.backend=native")
    if merged.get("gradient_clipping", 0.0):
        raise ConfigError("deepspeed.config_file sets gradient_clipping; per-example clipping "
                          "(privacy.clip_norm) replaces it, set it to 0 or remove it")
    zero = dict(merged.get("zero_optimization", {}))
    for key in ("reduce_bucket_size", "allgather_bucket_size", "overlap_comm"):
        if getattr(ds, key) is not None:
            zero[key] = getattr(ds, key)
    stage = ds.zero_stage if ds.zero_stage is not None else zero.get("stage", DEFAULT_STAGE)
    if stage == 3:
        raise ConfigError("ZeRO stage 3 is not supported: it partitions the weights during the backward, so the "
                          "per-example norms cannot be computed exactly from a layer's local weight; use "
                          "deepspeed.zero_stage 1 or 2, with parallel.tensor to shard the model (README: DeepSpeed)")
    if stage not in (1, 2):
        raise ConfigError(f"deepspeed.zero_stage must be 1 or 2; got {stage!r} (stage 0 is train.backend=native)")
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key, {}).get("device", "none") not in ("none", None):
            raise ConfigError(f"zero_optimization.{key} is not supported: the noise is added on the optimizer "
                              "partition in place, which offloading moves out of dpdist's reach")
    zero["stage"] = stage
    bf16 = ds.bf16 if ds.bf16 is not None else bool(merged.get("bf16", {}).get("enabled", False))
    if bf16 and cfg.privacy.enabled:
        raise ConfigError("deepspeed.bf16=true with privacy on: DeepSpeed reduces the clipped sums in bf16 before the "
                          "noise, which breaks the sensitivity bound; use fp32, or train.precision=bf16 with "
                          "train.backend=native (fp32 pre-noise sums)")
    if bf16 and cfg.model.dtype != "float32":
        raise ConfigError("deepspeed.bf16=true casts the model itself and keeps fp32 master weights; leave "
                          f"model.dtype at float32 (got {cfg.model.dtype!r})")
    merged.update({
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": 1,  # the boundary is set per micro-batch by the sampler's plan
        "train_batch_size": cfg.train.micro_batch_size * cfg.parallel.data,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "bf16": {**merged.get("bf16", {}), "enabled": bf16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,  # dpdist's own AdamW/SGD carrying the noise hook
        "steps_per_print": merged.get("steps_per_print", 2**31 - 1),
    })
    return merged
