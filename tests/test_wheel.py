"""The package as a user installs it: a built wheel, in a fresh venv, run from an empty directory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _run(args, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return res


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_inits_and_reports_status_from_an_empty_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
          str(ROOT)], tmp_path, env)
    wheel = next((tmp_path / "dist").glob("spectralkd_pipeline-*.whl"))
    venv = tmp_path / "venv"  # the dependencies (torch, timm, ...) come from this interpreter's site-packages
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path, env)
    bin_ = venv / "bin"
    _run([str(bin_ / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp_path, env)
    empty = tmp_path / "empty"
    empty.mkdir()
    where = _run([str(bin_ / "python"), "-c", "import pipeline, spectralkd; print(pipeline.__file__)"], empty, env)
    assert where.stdout.strip().startswith(str(venv)), where.stdout  # the wheel's copy, not the checkout
    recipes = _run([str(bin_ / "spectralkd"), "recipes"], empty, env).stdout
    assert recipes.startswith("default") and "cait_s24_to_deit_tiny_imagenet" in recipes
    _run([str(bin_ / "spectralkd"), "init"], empty, env)
    assert (empty / "pipeline.yaml").read_text() == (ROOT / "configs" / "default.yaml").read_text()
    status = _run([str(bin_ / "spectralkd"), "status"], empty, env).stdout
    assert status.splitlines()[0].startswith("prepare") and "missing" in status
    assert "distill/deit-spectral" in status
    _run([str(bin_ / "spectralkd"), "init", "--recipe", "swin_s_to_swin_t_imagenet", "-c", "swin.yaml"], empty, env)
    assert "swin" in (empty / "swin.yaml").read_text().lower()
    again = subprocess.run([str(bin_ / "spectralkd"), "init"], cwd=empty, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr
