"""Code the tests share: run set-ups, the brute-force oracle, launchers and the tiny training steps.

Importable as ``helpers`` from the tests (pytest's ``pythonpath`` puts tests/ on ``sys.path``) and
from the scripts in tests/dist, whose launches put tests/ on ``PYTHONPATH`` (``helpers.launch``).
Nothing here is a script: every entry point a subprocess runs lives in tests/dist.
"""
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent  # the repository
DIST = TESTS / "dist"
