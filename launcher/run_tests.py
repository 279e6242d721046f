"""``python3 launcher/run_tests.py [pytest args ...]``: set up ``.venv`` with the test and deepspeed
extras (the DeepSpeed backend is tested on CPU too), then pytest.

The exit status is pytest's, except that "no tests collected" (5) is a failure: a typo in a path or a
``-k`` expression must not pass CI.
"""
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bootstrap import bootstrap  # noqa: E402

NO_TESTS_COLLECTED = 5


def main() -> int:
    python = str(bootstrap(("test", "deepspeed")) / "python")
    try:
        code = subprocess.call([python, "-m", "pytest", *sys.argv[1:]])
    except KeyboardInterrupt:
        return 130
    if code == NO_TESTS_COLLECTED:
        print("[tests] failed: no tests were collected; check the test paths and -k/-m expressions", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
