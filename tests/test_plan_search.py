"""``dpdist plan --fastest``: the fastest predicted step that fits, over layouts, micro-batch,
checkpointing and the norms' budget; none when nothing fits."""
import dataclasses

from dpdist.cli import main
from dpdist.commands.plan import plan
from dpdist.config import load_config
from dpdist.plan.hardware import HARDWARE, hardware
from dpdist.plan.search import Planner, valid

from helpers import ROOT

GPT2 = str(ROOT / "configs/gpt2-small.yaml")


def test_fastest_fits_and_beats_every_candidate_it_searched():
    cfg = load_config(GPT2, ["train.micro_batch_size=256", "parallel.data=4", "parallel.tensor=2"])
    planner = Planner(cfg, hardware("h100-80gb"), 0.5)
    best = planner.fastest_fitting()
    assert best is not None and best.fits
    assert best.cfg.parallel.world_size == 8 and best.cfg.train.batch_size == cfg.train.batch_size
    for layout in planner.layouts():
        for size in (1, 4, 32, 128):
            for checkpointing in ("none", "blocks"):
                variant = valid(layout.cfg, {"train.micro_batch_size": size, "train.activation_checkpointing": checkpointing})
                if variant is not None and (row := planner.evaluate(variant)).fits:
                    assert best.cost.step_s <= row.cost.step_s * (1 + 1e-3), row.label


def test_the_cli_prints_the_fastest_and_json_carries_it(capsys):
    assert main(["plan", "--config", GPT2, "train.micro_batch_size=256", "--hardware", "h100-80gb", "--fastest"]) == 1
    text = capsys.readouterr().out
    out = plan(GPT2, ["train.micro_batch_size=256"], "h100-80gb", fastest=True)
    best = out["fastest"]
    assert best["fits"] and f"fastest that fits: {best['layout']}, micro-batch {best['micro_batch_size']}" in text
    assert best["time_s"]["step"] <= out["suggestion"]["row"]["time_s"]["step"] * (1 + 1e-3)
    assert "fastest" not in plan(GPT2, [], "h100-80gb")  # only when asked


def test_nothing_fits_says_so(capsys):
    tiny_device = dataclasses.replace(HARDWARE["h100-80gb"], memory_bytes=2**20)
    assert Planner(load_config(GPT2, []), tiny_device, 0.5).fastest_fitting() is None
    # The CLI's own devices are all larger; a 70B shape on one H100 fits in no layout.
    code = main(["plan", "--config", str(ROOT / "configs/shapes/llama-3.1-70b.yaml"), "parallel.data=1",
                 "--hardware", "h100-80gb", "--fastest"])
    assert code == 1 and "fastest that fits: none on this device count" in capsys.readouterr().out
