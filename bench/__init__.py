"""Benchmarks and measurements of sftmix-trl, a package run from the repository root: ``python -m bench.kernel``,
``python -m bench.kernel_model``, ... (each module's docstring gives its commands; ``--help`` its flags)."""

import sys
from pathlib import Path

# the repository root: where `python -m bench.<module>` runs (a fresh interpreter's working directory)
ROOT = Path(__file__).resolve().parents[1]


def module_command(module: str) -> list[str]:
    """The command that runs ``module`` (``python -m``) in a fresh interpreter under this one's path rule: with
    ``-P`` when this one has it (bench/gpu_check.sh, where the checkout must not shadow the laid-out package)."""
    return [sys.executable, *(["-P"] if sys.flags.safe_path else []), "-m", module]
