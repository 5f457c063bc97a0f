"""Every Python block of README.md runs as written, in a fresh interpreter, from the repository
root (as a user would paste it)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKS = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(), re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs(i, tmp_path):
    script = tmp_path / f"readme_block_{i}.py"
    script.write_text(BLOCKS[i])
    env = dict(os.environ, PYTHONWARNINGS="error::FutureWarning")  # the README shows current APIs
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, f"README block {i} failed:\n{BLOCKS[i]}\n--- stderr ---\n{out.stderr[-3000:]}"
