"""The DeepSpeed ZeRO backend (issue 5): equal to the native path, noise once per coordinate, exact resume.

- ``tests/dist/deepspeed_steps.py`` at (data, tensor) = (2, 1) and (2, 2): noisy AdamW steps through
  ZeRO-1 and ZeRO-2 (book-keeping, two-pass, per-layer) against the native engine (fp32, relative
  1e-6); an empty-batch step whose update is the noise alone (variance 1: each coordinate noised once,
  not once per rank, and equal to the keyed noise); one example clipped to a tiny C moves the
  parameters by exactly lr C / qN (the clipped gradient, not an unclipped one, reached the optimizer:
  this fails if DeepSpeed renamed a hook or changed what its optimizer step receives).
- The real training loop under DeepSpeed: K steps, checkpoint, resume to the end equals the run in
  one go bit for bit, ledger included; a DeepSpeed checkpoint is refused by the native backend.
- Config refusals that protect the guarantee (fp16, DeepSpeed's clipping, ZeRO-3, owned keys).
"""
import json
import shutil

import pytest

from dpdist.config import ConfigError, RunConfig, dump_config, load_config
from dpdist.deepspeed_config import resolve_deepspeed_config
from dpdist.runtime.mesh import Mesh
from dpdist.train import checkpoint
from dpdist.train.backends import backend_for

from helpers.launch import torchrun
from helpers.runs import assert_launched_resume_is_exact

DS = ("train.backend=deepspeed",)


@pytest.fixture(scope="module", params=[1, 2], ids=["data2-tensor1", "data2-tensor2"])
def verdict(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "verdict.json"
    torchrun("deepspeed_steps.py", 2 * request.param, out, request.param)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_zero_1_and_2_equal_the_native_backend_with_noise_on(verdict):
    assert set(verdict["equivalence"]) == {"1/bookkeeping/flat", "2/bookkeeping/flat", "2/two_pass/flat",
                                           "1/bookkeeping/per_layer"}
    for case, difference in verdict["equivalence"].items():
        assert difference <= 1e-6, f"ZeRO {case} differs from native by {difference:.2e} (relative)"


@pytest.mark.slow
def test_each_coordinate_is_noised_once(verdict):
    noise = verdict["noise"]
    spread = 5 * (2 / noise["count"]) ** 0.5  # 5 standard errors of a variance estimate
    assert abs(noise["variance"] - 1) < spread, noise  # twice per coordinate would be 2, split over ranks 1/2
    assert abs(noise["mean"]) < 5 / noise["count"] ** 0.5, noise
    assert noise["max_abs_from_keyed"] < 1e-5, "the partition noise is not the keyed noise of its coordinates"


@pytest.mark.slow
def test_clipped_gradient_reaches_the_optimizer(verdict):
    canary = verdict["canary"]
    assert canary["update_norm"] <= canary["bound"] * (1 + 1e-5), canary
    assert canary["update_norm"] >= canary["bound"] * (1 - 1e-4), canary  # normalised once, clipped to exactly C


@pytest.mark.slow
def test_exact_resume_under_deepspeed(tmp_path, cache):
    split = assert_launched_resume_is_exact(tmp_path, cache, 2, 1, *DS, "deepspeed.zero_stage=2")
    latest = checkpoint.latest_checkpoint(split)
    record = checkpoint.read_record(latest)
    assert record["backend"] == {"name": "deepspeed", "zero_stage": 2}
    assert any(name.startswith("deepspeed/") for name in record["files"]), "DeepSpeed's files are not in the manifest"

    native = shutil.copytree(split, tmp_path / "native")
    cfg = load_config(native / "config.yaml")
    cfg.train.backend = "native"
    dump_config(cfg, native / "config.yaml")
    with pytest.raises(checkpoint.CheckpointError, match="deepspeed backend"):
        checkpoint.check_backend(record, latest, backend_for(cfg), Mesh(dp_size=2))
    cfg.train.backend, cfg.deepspeed.zero_stage = "deepspeed", 1
    with pytest.raises(checkpoint.CheckpointError, match="ZeRO stage 2"):
        checkpoint.check_backend(record, latest, backend_for(cfg), Mesh(dp_size=2))


def ds_config(**changes) -> RunConfig:
    cfg = RunConfig()
    cfg.train.backend = "deepspeed"
    for key, value in changes.items():
        setattr(cfg.deepspeed, key, value)
    return cfg


def with_file(tmp_path, content) -> RunConfig:
    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return ds_config(config_file=str(path))


def test_deepspeed_config_passes_settings_through(tmp_path):
    resolved = resolve_deepspeed_config(with_file(tmp_path, {"zero_optimization": {"stage": 2, "contiguous_gradients": True},
                                                             "communication_data_type": "fp32"}))
    assert resolved["zero_optimization"] == {"stage": 2, "contiguous_gradients": True}
    assert resolved["communication_data_type"] == "fp32"
    assert resolved["gradient_clipping"] == 0.0 and resolved["fp16"] == {"enabled": False}
    assert resolved["gradient_accumulation_steps"] == 1
    cfg = ds_config(zero_stage=1, bf16=True, reduce_bucket_size=1000)
    cfg.privacy.enabled = False  # bf16 only for the non-private baseline (tests/test_robust_sum.py)
    resolved = resolve_deepspeed_config(cfg)
    assert resolved["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}
    assert resolved["bf16"] == {"enabled": True}
    assert resolved["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size


@pytest.mark.parametrize("content, message", [
    ({"fp16": {"enabled": True}}, "fp16 is refused"),
    ({"gradient_clipping": 1.0}, "gradient_clipping"),
    ({"zero_optimization": {"stage": 3}}, "stage 3 is not supported"),
    ({"zero_optimization": {"stage": 0}}, "must be 1 or 2"),
    ({"train_batch_size": 64}, "sets train_batch_size"),
    ({"gradient_accumulation_steps": 4}, "Poisson sampling"),
    ({"optimizer": {"type": "Adam"}}, "train.optimizer"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
])
def test_deepspeed_config_refusals(tmp_path, content, message):
    with pytest.raises(ConfigError, match=message):
        resolve_deepspeed_config(with_file(tmp_path, content))


def test_deepspeed_settings_are_checked_when_the_config_loads(tmp_path):
    base = ["privacy.noise_multiplier=1.0", "train.backend=deepspeed"]
    with pytest.raises(ConfigError, match="stage 3 is not supported"):
        load_config(None, [*base, "deepspeed.zero_stage=3"])
    with pytest.raises(ConfigError, match="leave model.dtype at float32"):
        load_config(None, [*base, "deepspeed.bf16=true", "model.dtype=float64", "privacy.enabled=false"])
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(None, [*base, f"deepspeed.config_file={tmp_path / 'missing.json'}"])
    assert load_config(None, [*base, "deepspeed.zero_stage=2"]).deepspeed.zero_stage == 2


@pytest.mark.parametrize("option", ["lsg.enabled=true", "reattention.enabled=true",
                                    "anadp.enabled=true privacy.clipping=per_layer"])
def test_noise_reshaping_options_are_refused_under_deepspeed(option):
    with pytest.raises(ConfigError, match="not supported with train.backend=deepspeed"):
        load_config(None, ["privacy.noise_multiplier=1.0", "train.backend=deepspeed", *option.split()])
