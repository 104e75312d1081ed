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


def run_python(code, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_python_api_is_quiet_until_a_program_shows_its_log(good_checkpoint, tmp_path):
    """load_model, generate(..., progress=False) and the fits (UniPC's walk below 10 evaluations, the fitted
    sampler's costs) write nothing on stdout or stderr; what they have to say goes through logging, which a program
    shows as it shows any library's log."""
    shutil.copy(good_checkpoint, tmp_path / "ckpt.pth")
    calls = ("import samplers; samplers.WALK_FIT_SAMPLES = 40\n"          # (a small walk fit, for the test's time)
             "from sampling import generate, load_model\n"
             "p = load_model('ckpt.pth')\n"
             "generate(p, 4, steps=10, progress=False)\n"
             "generate(p, 4, steps=3, progress=False)\n"
             "generate(p, 4, sampler='fitted', steps=4, progress=False)\n"
             "assert set(p.fit) >= {'walk_power', 'grid'}, p.fit\n")
    quiet = run_python(calls, tmp_path)
    assert quiet.returncode == 0 and (quiet.stdout, quiet.stderr) == ("", "")
    shown = run_python("import logging; logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s')\n"
                       "from sampling import load_model\nload_model('ckpt.pth')\n", tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "ddpm.sampling: sampling on cpu in " in shown.stderr
