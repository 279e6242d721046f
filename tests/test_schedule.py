"""Learning-rate schedules and TensorBoard (issue 15, fine-tuning UX).

- ``lr_at`` for each schedule at chosen steps against values computed by hand from the formulas in
  ``dpdist.train.schedule``; constant without warm-up returns ``train.lr`` itself (today's runs).
- Refusals, one line naming the key: warm-up out of range, min_lr out of range or without a decay,
  an unknown schedule, train.tensorboard without the tensorboard package.
- A resume under a changed schedule is allowed (the schedule is public) and noted in one line.
- End to end, one process, float64: cosine with warm-up, stopped at step K and resumed, against the
  run in one go: the same "lr" column, equal to ``lr_at``, and bit-identical final weights; the
  TensorBoard events hold metrics.jsonl's scalars at its steps.
"""
import json
import sys

import pytest
from torch.optim.optimizer import register_optimizer_step_pre_hook
from dpdist.config import ConfigError, TrainConfig, dump_config, load_config
from dpdist.train import schedule
from dpdist.train.metrics import SCALARS, TENSORBOARD
from dpdist.train.schedule import lr_at

from helpers.launch import torchrun
from helpers.runs import K, STEPS, assert_same_run, prepared, train_in_process

SCHEDULE = ("train.lr_schedule=cosine", "train.warmup_steps=2", "train.min_lr=1e-4")


def test_constant_without_warmup_is_the_configured_lr_at_every_step():
    train = TrainConfig(lr=0.00123, steps=50)
    assert all(lr_at(train, step) is train.lr for step in range(50))


def test_constant_with_warmup():
    train = TrainConfig(lr=0.2, steps=10, warmup_steps=4)
    assert [lr_at(train, s) for s in range(6)] == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2, 0.2], rel=1e-15)


def test_cosine_with_warmup_and_floor():
    train = TrainConfig(lr=1.0, steps=10, warmup_steps=2, min_lr=0.1, lr_schedule="cosine")
    # warm-up 1/2, 2/2; then p = (s - 2) / 8: p=0 -> lr, p=1/4 -> 0.1 + 0.45 (1 + cos(pi/4)), p=1/2 -> midpoint
    expected = {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.1 + 0.45 * (1 + 0.7071067811865476), 6: 0.55,
                9: 0.1 + 0.45 * (1 - 0.9238795325112867)}
    for step, value in expected.items():
        assert lr_at(train, step) == pytest.approx(value, rel=1e-14), step


def test_linear_decay():
    assert [lr_at(TrainConfig(lr=1.0, steps=4, lr_schedule="linear"), s) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    train = TrainConfig(lr=1.0, steps=10, warmup_steps=2, min_lr=0.1, lr_schedule="linear")
    expected = {0: 0.5, 2: 1.0, 6: 0.55, 9: 0.1 + 0.9 / 8}
    for step, value in expected.items():
        assert lr_at(train, step) == pytest.approx(value, rel=1e-14), step


@pytest.mark.parametrize("changes, key", [
    ({"warmup_steps": -1}, "train.warmup_steps"),
    ({"warmup_steps": 200}, "train.warmup_steps"),  # = train.steps
    ({"lr_schedule": "cosine", "min_lr": -0.1}, "train.min_lr"),
    ({"lr_schedule": "cosine", "min_lr": 0.01}, "train.min_lr"),  # > train.lr = 1e-3
    ({"min_lr": 1e-4}, "train.lr_schedule=cosine or linear"),
    ({"lr_schedule": "step"}, "train.lr_schedule"),
])
def test_bad_schedules_are_refused_in_one_line(changes, key):
    train = TrainConfig(**changes)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as caught:
        train.validate()
    assert "\n" not in str(caught.value)


def test_tensorboard_without_the_package_is_refused(monkeypatch):
    TrainConfig(tensorboard=True).validate()
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what find_spec reports for a package not installed
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        TrainConfig(tensorboard=True).validate()


def test_a_changed_schedule_is_noted():
    saved = schedule.identity(TrainConfig(lr_schedule="cosine", warmup_steps=5))
    assert schedule.changed(saved, TrainConfig(lr_schedule="cosine", warmup_steps=5)) is None
    note = schedule.changed(saved, TrainConfig(lr_schedule="cosine", warmup_steps=5, steps=400))
    assert note.startswith("note:") and "steps: checkpoint 200, run 400" in note
    note = schedule.changed(saved, TrainConfig(warmup_steps=5))
    assert "lr_schedule: checkpoint 'cosine', run 'constant'" in note and "steps: checkpoint 200, run unset" in note
    # a constant schedule does not depend on the horizon: extending such a run changes nothing
    assert schedule.changed(schedule.identity(TrainConfig()), TrainConfig(steps=400)) is None


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_resumed_cosine_schedule_matches_the_run_in_one_go(tmp_path, cache, capsys):
    extra = (*SCHEDULE, "train.log_every=1", "train.tensorboard=true")
    whole = prepared(cache, tmp_path / "whole", 1, 1, "float64", *extra)
    split = prepared(cache, tmp_path / "split", 1, 1, "float64", *extra)
    seen = []  # the lr of every optimizer step, as the optimizer saw it
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append(optimizer.param_groups[0]["lr"]))
    try:
        train_in_process(whole)
        whole_seen, seen[:] = list(seen), []
        train_in_process(split, max_steps=K)
        train_in_process(split, resume="auto")
    finally:
        hook.remove()
    assert_same_run(whole, split)

    train = load_config(whole / "config.yaml").train
    expected = [lr_at(train, s) for s in range(STEPS)]
    assert whole_seen == expected and seen[:K] == expected[:K] and seen[-(STEPS - K):] == expected[K:]
    # warm-up to lr at step 1, lr again at step 2 (the decay begins), then decaying: every part crosses the resume
    assert expected[1] == expected[2] == train.lr and len(set(expected)) == STEPS - 1
    for run in (whole, split):
        records = _metrics(run)
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        assert [r["lr"] for r in records] == expected

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(whole / TENSORBOARD)).Reload()
    assert set(SCALARS) <= set(events.Tags()["scalars"])
    for key in SCALARS:
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in _metrics(whole)], key

    # a resume under another schedule goes on (the schedule is public) and says so in one line
    cfg = load_config(split / "config.yaml")
    cfg.train.min_lr = 0.0
    dump_config(cfg, split / "config.yaml")
    capsys.readouterr()
    train_in_process(split, resume="auto")
    err = capsys.readouterr().err
    assert "note: the learning-rate schedule changed" in err and "min_lr: checkpoint 0.0001, run 0.0" in err



@pytest.mark.slow
def test_the_schedule_reaches_the_deepspeed_optimizer(tmp_path, cache):
    """ZeRO steps the client optimizer's param groups (with its fp32 partitions swapped in): the lr
    set on them is the one each of its steps uses."""
    run = prepared(cache, tmp_path / "ds", 1, 1, "float32", *SCHEDULE, "train.backend=deepspeed")
    out = tmp_path / "lrs.json"
    torchrun("schedule_steps.py", 1, run, out)
    train = load_config(run / "config.yaml").train
    assert json.loads(out.read_text()) == [[lr_at(train, s)] for s in range(STEPS)]
