"""The privacy ledger: an append-only JSON-lines record of every DP release, one line per step.

A step's line is on disk (flush + fsync) BEFORE its update is applied, so whatever a crash or a
resume does, the ledger never shows fewer releases than were made and epsilon never under-counts.
A replayed step is a second line, never merged with the first: counting it twice can only
over-estimate epsilon.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import accounting

_REPAIR = "after_torn_line"  # set on the first line appended after a torn line (see ``entries``)


class LedgerError(ValueError):
    """The ledger is damaged: the privacy spent cannot be computed from it."""


class PrivacyLedger:
    def __init__(self, path):
        self.path = Path(path)
        # A crash mid-append leaves a torn last line; the first line appended after it says so.
        self._after_torn = self.path.exists() and _torn_tail(self.path.read_bytes())

    def append(self, step: int, sample_rate: float, noise_multiplier: float, **extra) -> None:
        """Record one release durably; call it before the step's update is applied."""
        record = {"step": int(step), "sample_rate": float(sample_rate), "noise_multiplier": float(noise_multiplier),
                  **extra}
        line = json.dumps(record) + "\n"
        if self._after_torn:
            ended = self.path.read_bytes().endswith(b"\n")
            line = ("" if ended else "\n") + json.dumps({**record, _REPAIR: True}) + "\n"  # end the torn line first
        created = not self.path.exists()
        with open(self.path, "a") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        if created:  # make the new directory entry durable too
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        self._after_torn = False

    def entries(self) -> list[dict]:
        """All releases in file order.

        A torn line (a crash mid-write) counts as one step: the noisy gradient was computed and other
        ranks may have applied it, and counting a release that never left the process can only
        over-estimate epsilon.  Its sample rate and noise multiplier are those of the entry before it,
        written by the same run, whose plan fixes both (with no step before, the one after).  A torn
        line is only plausible last in the file, or right before the line that the resumed run
        appended after it (marked ``after_torn_line``); anywhere else the file was damaged and no
        epsilon computed from it can be trusted, so that raises.
        """
        if not self.path.exists():
            return []
        parsed = [_parse(line) for line in _lines(self.path.read_bytes())]
        entries, torn = [], []  # torn: line numbers of torn lines not yet followed by a good one
        for number, record in enumerate(parsed, start=1):
            if record is None:
                torn.append(number)
                continue
            if torn and not record.get(_REPAIR):
                raise LedgerError(f"{self.path}:{torn[0]}: garbled ledger line in the middle of the file; the "
                                  "ledger is damaged and the privacy spent cannot be computed from it")
            source = _rate_source(entries, record)
            entries += [_stand_in(source, line) for line in torn] + [record]
            torn = []
        if torn:
            if not entries:
                raise LedgerError(f"{self.path}: the only ledger line is garbled; its sample rate and noise "
                                  "multiplier are unknown")
            entries += [_stand_in(_rate_source(entries, entries[-1]), line) for line in torn]
        return entries

    @property
    def num_steps(self) -> int:
        return len(self.entries())

    def history(self) -> list[tuple[float, float, int]]:
        """(sample_rate, noise_multiplier, count) runs in step order, as the accountant takes them."""
        return accounting.run_lengths((e["sample_rate"], e["noise_multiplier"], 1) for e in self.entries())

    def epsilon(self, delta: float, accountant: str = "pld", pld_grid: float = accounting.PLD_GRID) -> float:
        """``pld_grid=accounting.DISPLAY_PLD_GRID``: a fast, slightly larger epsilon for a progress bar."""
        return accounting.epsilon_for_history(self.history(), delta, accountant, pld_grid)


def _lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    return lines[:-1] if lines[-1] == b"" else lines


def _torn_tail(data: bytes) -> bool:
    """Whether the last line lacks its newline or is garbled: what a crash mid-append leaves."""
    return bool(data) and (not data.endswith(b"\n") or _parse(_lines(data)[-1]) is None)


def _parse(line: bytes) -> dict | None:
    """The record on a line, or None when the line is torn or garbled."""
    try:
        record = json.loads(line)
    except ValueError:  # also UnicodeDecodeError
        return None
    if not isinstance(record, dict) or not {"step", "sample_rate", "noise_multiplier"} <= record.keys():
        return None
    return record


def _rate_source(before: list[dict], after: dict) -> dict:
    """The entry whose sample rate and noise multiplier a torn line takes: the nearest training step
    before it.  A one-off release, marked with a ``kind`` (the token-frequency release written before
    step 0), has its own unrelated ones; with no step before, the line after the torn one."""
    return next((entry for entry in reversed(before) if "kind" not in entry), after)


def _stand_in(source: dict, line: int) -> dict:
    return {"step": None, "sample_rate": source["sample_rate"], "noise_multiplier": source["noise_multiplier"],
            "torn_line": line}
