"""FSDP2 (train.backend=fsdp) on the data x tensor mesh, through the CLI's training loop, float64, noise on.

- The same weights as the native backend on one process (rel 1e-9), at (data, tensor) = (2, 1) and
  (2, 2), for flat book-keeping, per-layer and two-pass clipping, tied and untied output layers.
- Checkpoints move between backends: one saved under fsdp at (2, 2) loads under native at (1, 1) and one
  saved under native loads under fsdp at (2, 2), the loaded weights bit-identical to the saved ones, and
  the continued runs end where an uninterrupted run ends.
- Noise: a release with every clipped sum zero leaves each coordinate's keyed noise exactly once, the
  same bits at every layout and backend (a coordinate noised twice or never would show).
- Activation checkpointing under fsdp at (2, 2) ends where the native run without it ends (rel 1e-9).
- Sensitivity: removing one example moves the pre-noise sum by at most C, under fsdp, in float64 and
  under bf16 compute, where the sums are fp32.
"""
import shutil

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from dpdist.config import dump_config, load_config
from dpdist.privacy.step import share_ranges
from dpdist.train import checkpoint

from helpers.compare import assert_close_at_scale
from helpers.launch import python, torchrun
from helpers.runs import final_model, ledger, prepared

REL = 1e-9
CLIP = 1.0


@pytest.mark.parametrize("numels, size", [([5, 1, 7], 2), ([3], 4), ([0, 4, 9, 2], 3), ([1, 1], 5)])
def test_shares_hold_every_coordinate_once(numels, size):
    counts = [torch.zeros(n, dtype=torch.int64) for n in numels]
    for rank in range(size):
        for count, (start, stop) in zip(counts, share_ranges(numels, rank, size)):
            count[start:stop] += 1
    assert all(bool((c == 1).all()) for c in counts)
    sizes = [sum(stop - start for start, stop in share_ranges(numels, r, size)) for r in range(size)]
    assert max(sizes) - min(sizes) <= 1


CASES = {"flat": [], "per_layer": ["privacy.clipping=per_layer"],
         "two_pass_untied": ["privacy.mode=two_pass", "model.tie_embeddings=false"]}


def _runs(tmp_path, cache, data, tensor, backend, tag):
    return {name: prepared(cache, tmp_path / f"{tag}-{name}", data, tensor, "float64", f"train.backend={backend}",
                           *extra) for name, extra in CASES.items()}


def _loaded_equals_checkpoint(run_dir, source, tmp_path):
    """The weights a run loaded are the checkpoint's, bit for bit."""
    whole = tmp_path / f"{run_dir.name}-checkpoint.pt"
    dcp_to_torch_save(source, whole)
    saved = {k[len("model/"):]: v for k, v in torch.load(whole).items() if k.startswith("model/")}
    loaded = torch.load(run_dir / "loaded.pt")
    assert saved.keys() == loaded.keys()
    for name in saved:
        assert torch.equal(saved[name], loaded[name]), name


@pytest.mark.slow
def test_fsdp_trains_resumes_and_noises_as_native(tmp_path, cache):
    reference = _runs(tmp_path, cache, 1, 1, "native", "native")
    from_native = prepared(cache, tmp_path / "native-saved", 1, 1, "float64", "train.backend=native")
    native_noise = prepared(cache, tmp_path / "native-noise", 1, 1, "float64")
    ops = [arg for name in CASES for arg in ("train", reference[name])]
    python("fsdp_steps.py", *ops, "save", from_native, "noise", native_noise)

    two_two = _runs(tmp_path, cache, 2, 2, "fsdp", "fsdp22")
    saved = prepared(cache, tmp_path / "fsdp22-saved", 2, 2, "float64", "train.backend=fsdp")
    to_fsdp = prepared(cache, tmp_path / "fsdp22-from-native", 2, 2, "float64", "train.backend=fsdp")
    (to_fsdp / "checkpoints").mkdir(exist_ok=True)
    source = checkpoint.latest_checkpoint(from_native)
    shutil.copytree(source, to_fsdp / "checkpoints" / source.name)
    shutil.copy(from_native / "ledger.jsonl", to_fsdp / "ledger.jsonl")
    fsdp_noise = prepared(cache, tmp_path / "fsdp22-noise", 2, 2, "float64", "train.backend=fsdp")
    recomputed = prepared(cache, tmp_path / "fsdp22-checkpointed", 2, 2, "float64", "train.backend=fsdp",
                          "train.activation_checkpointing=blocks")
    ops = [arg for name in CASES for arg in ("train", two_two[name])]
    torchrun("fsdp_steps.py", 4, *ops, "save", saved, "reload", to_fsdp, "noise", fsdp_noise, "train", recomputed)

    two_one = _runs(tmp_path, cache, 2, 1, "fsdp", "fsdp21")
    ops = [arg for name in CASES for arg in ("train", two_one[name])]
    sensitive = {dtype: prepared(cache, tmp_path / f"fsdp21-sensitivity-{dtype}", 2, 1, dtype, "train.backend=fsdp",
                                 "privacy.noise_multiplier=0.0", f"privacy.clip_norm={CLIP}", *extra)
                 for dtype, extra in (("float64", []), ("float32", ["train.precision=bf16"]))}
    torchrun("fsdp_steps.py", 2, *ops, *[arg for run in sensitive.values() for arg in ("sensitivity", run)])

    for name in CASES:
        want = final_model(reference[name])
        for layout, runs in (("(2,2)", two_two), ("(2,1)", two_one)):
            assert_close_at_scale(final_model(runs[name]), want, rel=REL, what=f"fsdp {layout} {name}: ")
            assert ledger(runs[name]) == ledger(reference[name])

    # native -> fsdp (2, 2): the loaded weights are the checkpoint's; the continued run ends as the reference
    _loaded_equals_checkpoint(to_fsdp, source, tmp_path)
    assert_close_at_scale(final_model(to_fsdp), final_model(reference["flat"]), rel=REL, what="native->fsdp: ")
    # fsdp (2, 2) -> native (1, 1)
    moved = tmp_path / "fsdp22-to-native"
    shutil.copytree(saved, moved)
    cfg = load_config(moved / "config.yaml")
    cfg.parallel.data, cfg.parallel.tensor, cfg.train.backend, cfg.train.run_dir = 1, 1, "native", str(moved)
    dump_config(cfg, moved / "config.yaml")
    python("fsdp_steps.py", "reload", moved)
    _loaded_equals_checkpoint(moved, checkpoint.latest_checkpoint(saved), tmp_path)
    assert_close_at_scale(final_model(moved), final_model(reference["flat"]), rel=REL, what="fsdp->native: ")
    assert ledger(moved) == ledger(reference["flat"])

    noise_a, noise_b = torch.load(native_noise / "noise.pt"), torch.load(fsdp_noise / "noise.pt")
    assert noise_a.keys() == noise_b.keys()
    for name in noise_a:
        assert torch.equal(noise_a[name], noise_b[name]), name
        assert bool((noise_a[name] != 0).all()), name  # every coordinate got its noise

    assert_close_at_scale(final_model(recomputed), final_model(reference["flat"]), rel=REL, what="checkpointed: ")

    for dtype, slack in (("float64", 1e-12), ("float32", 1e-5)):
        with_all, without_first = torch.load(sensitive[dtype] / "sensitivity.pt")
        assert {v.dtype for v in with_all.values()} == {getattr(torch, dtype)}  # fp32 sums under bf16 compute
        moved_by = torch.sqrt(sum(((with_all[n] - without_first[n]).double() ** 2).sum() for n in with_all))
        assert 0 < float(moved_by) <= CLIP * (1 + slack), dtype
