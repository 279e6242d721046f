#!/usr/bin/env bash
# The one-shot GPU check (issue 17; docs/gpu_check.md):
#   bash benchmarks/gpu_check.sh [--wheels DIR] [--device cuda|cpu] [--tiny] [--out FILE]
# dpdist runs from this tree through PYTHONPATH rather than `pip install -e .`, whose isolated build
# would fetch setuptools from the network; what the machine lacks comes from --wheels DIR only.
# PYTHON picks the interpreter (default: python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PIP_NO_INDEX=1  # no pip call of this check may reach an index, whatever the machine's pip.conf says
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
