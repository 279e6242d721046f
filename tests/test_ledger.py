"""The privacy ledger never under-counts: every line is a release, a torn last line included."""
import json

import pytest

from dpdist.privacy import accounting
from dpdist.privacy.ledger import LedgerError, PrivacyLedger

Q, SIGMA, DELTA = 0.01, 1.0, 1e-5


def _ledger(tmp_path, steps=3) -> PrivacyLedger:
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    for step in range(steps):
        ledger.append(step, Q, SIGMA)
    return ledger


def test_round_trip_and_run_length_history(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    assert ledger.entries() == [] and ledger.num_steps == 0 and ledger.epsilon(DELTA) == 0.0
    for step, sigma in enumerate([1.0, 1.0, 1.2, 1.0]):
        ledger.append(step, Q, sigma, loss=0.5 * step)
    entries = ledger.entries()
    assert [e["step"] for e in entries] == [0, 1, 2, 3] and entries[3]["loss"] == 1.5
    assert ledger.num_steps == 4
    assert ledger.history() == [(Q, 1.0, 2), (Q, 1.2, 1), (Q, 1.0, 1)]  # step order, not merged across changes


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_epsilon_equals_the_accountant_for_a_constant_history(tmp_path, accountant):
    ledger = _ledger(tmp_path, steps=25)
    assert ledger.epsilon(DELTA, accountant) == accounting.epsilon(Q, SIGMA, 25, DELTA, accountant)
    coarse = accounting.DISPLAY_PLD_GRID
    assert ledger.epsilon(DELTA, accountant, coarse) == accounting.epsilon(Q, SIGMA, 25, DELTA, accountant, coarse)


def test_lines_survive_reopening(tmp_path):
    _ledger(tmp_path, steps=3)
    reopened = PrivacyLedger(tmp_path / "ledger.jsonl")
    assert reopened.num_steps == 3
    reopened.append(3, Q, SIGMA)
    assert [e["step"] for e in PrivacyLedger(tmp_path / "ledger.jsonl").entries()] == [0, 1, 2, 3]
    assert all(json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines())


def test_a_replayed_step_counts_twice(tmp_path):
    ledger = _ledger(tmp_path, steps=3)
    ledger.append(2, Q, SIGMA)  # resumed from a checkpoint taken before step 2's update
    assert ledger.num_steps == 4 and ledger.history() == [(Q, SIGMA, 4)]


def test_a_torn_last_line_counts_as_a_step(tmp_path):
    ledger = _ledger(tmp_path, steps=3)
    ledger.append(3, 0.02, 0.8)
    with open(ledger.path, "a") as handle:
        handle.write('{"step": 4, "sample_rate": 0.0')  # the crash cut the line
    assert ledger.num_steps == 5
    assert ledger.entries()[-1]["step"] is None
    assert ledger.history() == [(Q, SIGMA, 3), (0.02, 0.8, 2)]  # the previous entry's q and sigma
    assert ledger.epsilon(DELTA, "rdp") == accounting.epsilon_for_history([(Q, SIGMA, 3), (0.02, 0.8, 2)], DELTA, "rdp")


def test_a_resumed_run_appends_after_a_torn_line(tmp_path):
    ledger = _ledger(tmp_path, steps=2)
    with open(ledger.path, "a") as handle:
        handle.write('{"step": 2, "sam')
    resumed = PrivacyLedger(ledger.path)
    resumed.append(2, Q, SIGMA)  # the replay of the step whose line was torn
    resumed.append(3, Q, SIGMA)
    entries = PrivacyLedger(ledger.path).entries()
    assert [e["step"] for e in entries] == [0, 1, None, 2, 3]
    assert entries[3]["after_torn_line"] is True and "after_torn_line" not in entries[4]


def test_a_garbled_last_line_with_its_newline_counts_once(tmp_path):
    ledger = _ledger(tmp_path, steps=2)
    with open(ledger.path, "a") as handle:
        handle.write("\x00\x00\x00\n")  # what a filesystem can leave after a power loss
    assert ledger.num_steps == 3
    PrivacyLedger(ledger.path).append(2, Q, SIGMA)
    assert PrivacyLedger(ledger.path).num_steps == 4


def test_a_garbled_line_in_the_middle_is_an_error(tmp_path):
    ledger = _ledger(tmp_path, steps=3)
    lines = ledger.path.read_text().splitlines(keepends=True)
    lines[1] = "not json\n"
    ledger.path.write_text("".join(lines))
    with pytest.raises(LedgerError, match=r"ledger.jsonl:2: garbled ledger line in the middle"):
        ledger.epsilon(DELTA)


def test_a_lone_torn_line_cannot_be_accounted(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"step": 0, "sample_')
    with pytest.raises(LedgerError, match="only ledger line is garbled"):
        PrivacyLedger(path).entries()
    PrivacyLedger(path).append(0, Q, SIGMA)  # the resumed run's replay supplies q and sigma
    assert PrivacyLedger(path).history() == [(Q, SIGMA, 2)]
