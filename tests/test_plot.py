"""``dpdist plot RUN_DIR``: a PNG of loss and epsilon from metrics.jsonl; one-line refusals (exit 2)
for a missing run directory, a missing or unreadable metrics file, and matplotlib not installed."""
import json
import math
import sys

import pytest

from dpdist.cli import main
from dpdist.commands.plot import read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run_dir(tmp_path, records):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def _record(step, loss, epsilon):
    return {"step": step, "loss": loss, "lr": 1e-3, "epsilon": epsilon, "clipped_fraction": 0.5,
            "nonfinite_examples": 0, "tokens_per_s": 100.0}


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error:") and "\n" not in err and not captured.out
    return err


@pytest.mark.parametrize("epsilon", [lambda step: 0.1 * step, lambda step: math.inf], ids=["private", "non-private"])
def test_plot_writes_a_png(tmp_path, capsys, epsilon):
    run = _run_dir(tmp_path, [_record(s, 5.0 / s, epsilon(s)) for s in range(1, 6)])
    assert main(["plot", str(run)]) == 0
    png = run / "metrics.png"
    assert capsys.readouterr().out.strip() == f"wrote {png}"
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > len(PNG_SIGNATURE)

    out = tmp_path / "elsewhere" / "plot.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_a_step_logged_twice_is_drawn_with_its_latest_record(tmp_path):
    # a crash after step 2's log, a resume from the checkpoint at step 1: steps 2 and 3 logged again
    run = _run_dir(tmp_path, [_record(1, 3.0, 0.1), _record(2, 2.0, 0.2), _record(2, 2.5, 0.3), _record(3, 1.0, 0.4)])
    assert [(r["step"], r["loss"], r["epsilon"]) for r in read_metrics(run)] == [(1, 3.0, 0.1), (2, 2.5, 0.3),
                                                                                 (3, 1.0, 0.4)]


def test_refusals(tmp_path, capsys, monkeypatch):
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in _one_error_line(capsys)

    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in _one_error_line(capsys)
    assert not (tmp_path / "metrics.png").exists()

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    assert main(["plot", str(tmp_path)]) == 2
    assert "line 2 is not a metrics record" in _one_error_line(capsys)

    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["plot", str(tmp_path)]) == 2
    assert "holds no records yet" in _one_error_line(capsys)

    run = _run_dir(tmp_path, [_record(1, 2.0, 0.1)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what import finds where it is not installed
    assert main(["plot", str(run)]) == 2
    assert "pip install matplotlib" in _one_error_line(capsys)
    assert not (run / "metrics.png").exists()
