"""``dpdist account``: epsilon for sigma and sigma for epsilon, in text and JSON; bad input exits 2."""
import argparse
import json

import pytest

from dpdist.commands import account
from dpdist.config import RunConfig
from dpdist.privacy import accounting
from dpdist.train.reattention import release_history

ROW = ["--sample-rate", "0.01", "--steps", "1000", "--delta", "1e-5"]  # algorithms.md Appendix B, row 2


def _run(argv, capsys):
    parser = argparse.ArgumentParser(prog="dpdist")
    account.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["account", *argv])
    assert args.func is account.run
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_epsilon_for_a_noise_multiplier(capsys):
    code, out, err = _run(["--noise-multiplier", "1.0", *ROW], capsys)
    assert code == 0 and err == ""
    assert "1.8282 (PLD)" in out and "2.1014 (RDP)" in out


def test_epsilon_as_json(capsys):
    code, out, _ = _run(["--noise-multiplier", "1.0", *ROW, "--json"], capsys)
    result = json.loads(out)
    assert code == 0
    assert set(result) == {"sample_rate", "steps", "delta", "reattention_frequency_noise", "noise_multiplier",
                           "epsilon_pld", "epsilon_rdp"}
    assert result["reattention_frequency_noise"] is None
    assert [result[k] for k in ("sample_rate", "steps", "delta", "noise_multiplier")] == [0.01, 1000, 1e-5, 1.0]
    assert result["epsilon_pld"] == pytest.approx(1.8282, abs=1e-4)
    assert result["epsilon_rdp"] == pytest.approx(2.1014, abs=1e-4)


def test_noise_multiplier_for_a_target_epsilon(capsys):
    code, out, _ = _run(["--target-epsilon", "1", *ROW], capsys)
    assert code == 0 and "1.4146 (PLD)" in out and "1.5131 (RDP)" in out


def test_noise_multiplier_as_json(capsys):
    code, out, _ = _run(["--target-epsilon", "1", *ROW, "--json"], capsys)
    result = json.loads(out)
    assert code == 0 and set(result) == {"sample_rate", "steps", "delta", "reattention_frequency_noise",
                                         "target_epsilon", "noise_multiplier_pld", "noise_multiplier_rdp"}
    assert result["target_epsilon"] == 1.0
    assert result["noise_multiplier_pld"] == pytest.approx(1.4146, abs=1e-4)
    assert result["noise_multiplier_rdp"] == pytest.approx(1.5131, abs=1e-4)


def test_the_text_says_when_the_reattention_release_is_not_counted(capsys):
    _, out, _ = _run(["--noise-multiplier", "1.0", *ROW], capsys)
    assert out.rstrip().endswith("1000 steps (steps only, no Re-Attention token-frequency release)")


SHORT = ["--sample-rate", "0.05", "--steps", "50", "--delta", "1e-5"]  # fast to calibrate


def test_the_reattention_release_is_counted_as_training_counts_it(capsys):
    """The prior the run's plan composes (``release_history``): epsilon of the steps after
    the release, and a sigma calibrated for the target with it."""
    cfg = RunConfig()
    cfg.reattention.enabled, cfg.reattention.frequency_noise = True, 5.0
    prior = release_history(cfg)
    assert prior  # a run that draws the release
    code, out, _ = _run(["--noise-multiplier", "1.0", *SHORT, "--reattention-frequency-noise", "5", "--json"], capsys)
    result = json.loads(out)
    assert code == 0 and result["reattention_frequency_noise"] == 5.0
    for name in ("pld", "rdp"):
        alone = accounting.epsilon(0.05, 1.0, 50, 1e-5, name)
        assert result[f"epsilon_{name}"] == accounting.epsilon(0.05, 1.0, 50, 1e-5, name, prior=prior) > alone + 0.05
    code, out, _ = _run(["--target-epsilon", "2", *SHORT, "--reattention-frequency-noise", "5", "--json"], capsys)
    sigma = json.loads(out)["noise_multiplier_pld"]
    assert code == 0 and accounting.epsilon(0.05, sigma, 50, 1e-5, prior=prior) <= 2.0
    assert accounting.epsilon(0.05, sigma - 1e-3, 50, 1e-5, prior=prior) > 2.0  # the smallest sigma, with the release
    assert accounting.epsilon(0.05, sigma - 0.03, 50, 1e-5) <= 2.0  # well below what the steps alone would need


def test_a_target_the_release_alone_exceeds_is_one_line_and_exit_2(capsys):
    code, out, err = _run(["--target-epsilon", "0.1", *SHORT, "--reattention-frequency-noise", "1"], capsys)
    assert code == 2 and out == "" and err.startswith("error: --target-epsilon 0.1 cannot be reached")
    assert "already spend" in err and err.count("\n") == 1


def _args(sigma="1", q="0.1", steps="10", delta="1e-5"):
    return ["--noise-multiplier", sigma, "--sample-rate", q, "--steps", steps, "--delta", delta]


@pytest.mark.parametrize("argv, message", [
    (_args(q="0"), "--sample-rate must be in (0, 1]"),
    (_args(q="1.5"), "--sample-rate must be in (0, 1]"),
    (_args(steps="-1"), "--steps must be >= 0"),
    (_args(delta="0"), "--delta must be in (0, 1)"),
    (_args(delta="1"), "--delta must be in (0, 1)"),
    (_args(sigma="-1"), "--noise-multiplier must be >= 0"),
    (["--target-epsilon", "0", *ROW], "--target-epsilon must be in (0, 100]"),
    (["--noise-multiplier", "1", "--target-epsilon", "1", *ROW], "exactly one of"),
    (ROW, "exactly one of"),
    (_args() + ["--reattention-frequency-noise", "0"], "--reattention-frequency-noise must be > 0"),
])
def test_bad_input_is_one_line_on_stderr_and_exit_2(argv, message, capsys):
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
