"""The README's "Use it from Python" block, run exactly as it stands, as a user runs it: from a folder whose
default/ddpm_ckpt.pth is a checkpoint (here the tests' tiny one)."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import ROOT

README = os.path.join(ROOT, "README.md")


def python_block(heading):
    """The first ```python block under a `## heading` of the README."""
    text = open(README, encoding="utf-8").read()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_block_samples_a_grid(good_checkpoint, tmp_path):
    code = python_block("Use it from Python")
    assert "load_model(" in code and "generate(" in code and "save_grid(" in code
    (tmp_path / "default").mkdir()
    shutil.copy(good_checkpoint, tmp_path / "default" / "ddpm_ckpt.pth")
    (tmp_path / "snippet.py").write_text(code)
    env = dict(os.environ, PYTHONPATH=ROOT)       # the repository's modules, as from its folder
    result = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (4 * (28 + 2) + 2, 4 * (28 + 2) + 2)           # 16 images of 28 px, 4 a row, 2 px padding
    assert (np.asarray(grid) < 255).any(), "the grid holds images, not only the white padding"
