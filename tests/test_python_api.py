"""The README's "Use it from Python" block, run exactly as it stands, as a user runs it: from a folder whose
default/ddpm_ckpt.pth is a checkpoint (here the tests' tiny one)."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
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
    """load_model and generate(..., progress=False) write nothing on stdout or stderr (the issue's command, in a new
    process); what they have to say goes through logging, which a program shows as it shows any library's log."""
    (tmp_path / "default").mkdir()
    shutil.copy(good_checkpoint, tmp_path / "default" / "ddpm_ckpt.pth")
    quiet = run_python("from sampling import load_model, generate; p = load_model('default/ddpm_ckpt.pth'); "
                       "generate(p, 4, steps=10, progress=False)", tmp_path)
    assert quiet.returncode == 0 and (quiet.stdout, quiet.stderr) == ("", "")
    shown = run_python("import logging; logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s')\n"
                       "from sampling import load_model; load_model('default/ddpm_ckpt.pth')", tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "ddpm.sampling: sampling on cpu in " in shown.stderr


@pytest.mark.slow
def test_the_fits_write_nothing_and_keep_what_they_fitted(good_checkpoint, tmp_path, monkeypatch, capfd):
    """The fits of UniPC's walk (below 10 evaluations) and of the fitted sampler, made when generate first needs
    them, write nothing on stdout or stderr with progress=False, however the scripts set up the log before."""
    import logging

    import samplers
    from sampling import generate, read_model
    monkeypatch.setattr(logging.getLogger("ddpm"), "handlers", [logging.NullHandler()])   # as in a new program
    monkeypatch.setattr(samplers, "WALK_FIT_SAMPLES", 20)                   # (a small walk fit, for the test's time)
    shutil.copy(good_checkpoint, tmp_path / "ckpt.pth")
    pipeline = read_model(str(tmp_path / "ckpt.pth"), torch.device("cpu"))
    capfd.readouterr()
    generate(pipeline, 2, steps=3, progress=False)
    generate(pipeline, 2, sampler="fitted", steps=4, progress=False)
    assert capfd.readouterr() == ("", "")
    assert {"walk_power", "grid"} <= set(pipeline.fit) and "3" in pipeline.fit["walk_power"]
    assert read_model(str(tmp_path / "ckpt.pth"), torch.device("cpu")).fit == pipeline.fit     # stored with it
