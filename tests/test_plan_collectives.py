"""``dpdist plan``'s bytes against counted ones: per collective, in this process, the DP step of a tiny
model on a fake tensor group of 2 (bf16, checkpointing, LoRA, per-layer clipping, Llama), and, slow,
``dpdist bench --data/--tensor``'s counts for its GPT and Llama models; the GPU noise's memory traffic
per normal."""
import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dpdist.bench.collectives import CollectiveCounter
from dpdist.bench.config import BenchConfig, run_overrides
from dpdist.commands.plan import plan
from dpdist.config import load_config
from dpdist.model import build_model
from dpdist.plan.hardware import DEVICE_NOISE_BYTES_PER_NORMAL
from dpdist.privacy import noise
from dpdist.privacy.step import native_step
from dpdist.train.activation_checkpointing import apply_activation_checkpointing
from dpdist.train.methods import transform_model
from dpdist.train.precision import apply_precision

from test_plan_command import LLAMA, TINY, B, S, V


def counted_tensor_bytes(overrides: list[str]) -> int:
    """One DP micro-batch of the config's model, as ``dpdist train`` builds it, at tensor degree 2 on
    torch's fake process group (collectives do nothing but are dispatched, so they are counted)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    cfg = load_config(None, overrides)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        group = dist.group.WORLD
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(cfg.model, vocab_size=V), tp_group=group)
        transform_model(cfg, model, group)
        apply_activation_checkpointing(cfg.train.activation_checkpointing, model)
        apply_precision(cfg.train.precision, model, "cpu")
        step = native_step(model, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=float(B),
                           clipping=cfg.privacy.clipping, micro_batch_size=B, seq_len=S, tp_group=group)
        ids = torch.randint(0, V, (B, S))
        with CollectiveCounter({"tensor": group}) as counter:
            step.microbatch(ids, ids)
        assert set(counter.bytes) == {"tensor"}
        return counter.bytes["tensor"]
    finally:
        dist.destroy_process_group()


FP32 = ["model.dtype=float32"]
LLAMA2 = LLAMA + ["model.n_kv_heads=2"]  # split over the two tensor ranks
CASES = {
    "gpt": [],
    "gpt-bf16": FP32 + ["train.precision=bf16"],
    "gpt-checkpointing": ["train.activation_checkpointing=blocks"],
    "gpt-per-layer": ["privacy.clipping=per_layer"],
    "gpt-lora-checkpointing": ["lora.enabled=true", "lora.rank=4", "train.activation_checkpointing=blocks"],
    "gpt-lora-qkv-bf16": FP32 + ["lora.enabled=true", "lora.rank=4", "lora.targets=qkv", "train.precision=bf16"],
    "llama": LLAMA2,
    "llama-bf16-checkpointing-per-layer": LLAMA2 + FP32 + ["train.precision=bf16", "train.activation_checkpointing=blocks",
                                                          "privacy.clipping=per_layer"],
    "llama-lora-tied-checkpointing": [*LLAMA2, "model.tie_embeddings=true", "lora.enabled=true", "lora.rank=4",
                                      "train.activation_checkpointing=blocks"],
}


@pytest.mark.parametrize("extra", CASES.values(), ids=CASES.keys())
def test_tensor_group_bytes_equal_the_dp_steps(extra):
    overrides = TINY + [f"train.batch_size={B}", "parallel.tensor=2"] + extra
    predicted = plan(None, overrides, "cpu")["run"]["collective_bytes"]["tensor"]
    assert predicted == counted_tensor_bytes(overrides)


@pytest.mark.slow
@pytest.mark.parametrize("arch, data, tensor", [("gpt", 2, 1), ("gpt", 1, 2), ("llama", 1, 2)])
def test_bytes_per_group_equal_dpdist_bench_counts(arch, data, tensor):
    """``dpdist bench --data D --tensor T``: the counted bytes of its warm-up DP and non-private steps,
    per group, against the plan of the same model and batch share (one micro-batch per rank)."""
    from dpdist.bench.parallel import launch

    bench = BenchConfig(layers=2, d_model=64, heads=4, vocab=500, seq_len=32, batch=8, steps=2, arch=arch)
    out = launch({"config": dataclasses.asdict(bench), "data": data, "tensor": tensor, "clipping": "flat"})
    for private, counted in ((True, out["dp_comm"]["bytes"]), (False, out["nonprivate_comm"]["bytes"])):
        predicted = plan(None, run_overrides(bench, data, tensor, "native", None, private), "cpu")["run"]
        assert {group: predicted["collective_bytes"][group] for group in ("tensor", "data")} == \
            {group: counted.get(group, 0) for group in ("tensor", "data")}, private


class TensorTraffic(TorchDispatchMode):
    """Bytes of every tensor each operator reads or writes (its arguments and results)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.bytes += sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs, out))
                          if isinstance(t, torch.Tensor))
        return out


def test_device_noise_traffic_per_normal_is_the_counted_one():
    """The GPU's path (torch ChaCha20 keystreams, then the Box-Muller transform), run here on the CPU:
    the bytes its operators move per extra normal, the plan's ``DEVICE_NOISE_BYTES_PER_NORMAL``."""
    keys = [noise.derive_key(1, 0, stream, "w") for stream in ("noise", "noise-angle")]

    def traffic(n: int) -> int:
        out = torch.empty(n, dtype=torch.float32)
        with TensorTraffic() as counter:
            radius, angle = (noise.device_keystream_words(key, 0, n // 2, "cpu") for key in keys)
            noise._box_muller(radius, angle, out)
        return counter.bytes

    per_normal = (traffic(1 << 16) - traffic(1 << 15)) / (1 << 15)
    assert per_normal == pytest.approx(DEVICE_NOISE_BYTES_PER_NORMAL, rel=0.01)
