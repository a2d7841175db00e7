"""The README's install commands: GPU users' default unchanged, a CPU-only install documented.

PyPI's Linux build of torch brings about 5 GB of NVIDIA CUDA libraries. The CPU-only install puts
PyTorch's CPU build in place first, so that ``pip install -e .`` finds torch satisfied and keeps it.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def test_default_install_lines_use_pypi_torch():
    readme = _readme()
    for number in ("1", "2"):  # the set-up commands CI takes from the README
        line = re.search(rf"^# {number}\. .*\n(.*)$", readme, re.M).group(1)
        assert re.search(r"\.venv/bin/pip install -e (\.|\"\.\[test\]\")", line) and "index-url" not in line, line


def test_cpu_only_install_puts_the_cpu_torch_first():
    readme = _readme()
    section = readme[readme.index("**CPU-only machines.**"):]
    block = section[section.index("```bash") + len("```bash"):]
    block = block[:block.index("```")]
    torch_at = block.index(f"pip install torch torchvision --index-url {CPU_INDEX}")
    assert torch_at < block.index("pip install -e "), "torch must be installed before the package"


def test_torch_is_a_plain_dependency_without_a_cuda_index():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    torch = [d for d in pyproject["project"]["dependencies"] if re.match(r"torch\b(?!vision)", d)]
    assert torch and not any("@" in d or "cu1" in d for d in torch)  # any torch build satisfies it
    assert "uv" not in pyproject.get("tool", {})  # no index pinned for one platform
