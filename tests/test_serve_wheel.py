"""`reasonembed serve` from an installed wheel, outside the checkout: the Serve application, its protocol models and
the launcher are part of the package, so nothing reads serve/ or edits sys.path, and the replicas import the app
from the installed package.

The wheel is built offline from a copy of the sources (so the shared checkout gets no build/ or egg-info) and
installed with --no-deps into a fresh venv; torch, Ray and the rest come from this environment's site-packages,
listed in a .pth file. Path lines in a .pth do not process that folder's own .pth files, so this environment's
editable reasonembed is not visible there: the venv imports only the wheel's copy.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_wheel(tmp: Path) -> Path:
    """The project's wheel, built offline from a copy of pyproject.toml, README.md and platform/."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "platform", src / "platform",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    dist = tmp / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(dist), str(src)], capture_output=True, text=True, timeout=120)
    wheels = sorted(dist.glob("reasonembed-*.whl"))
    if proc.returncode != 0 or not wheels:
        pytest.skip(f"the wheel cannot be built offline here (pip wheel exit {proc.returncode}): "
                    f"{(proc.stderr or proc.stdout)[-500:]}")
    return wheels[0]


def venv_with_wheel(tmp: Path, wheel: Path) -> Path:
    """A fresh venv holding the wheel; this environment's site-packages (minus its .pth files) are visible."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    # Installed before the .pth exists, so pip sees an empty environment (and the checkout's editable reasonembed
    # is never a candidate for uninstalling).
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, timeout=120)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "zz_main_env.pth").write_text("".join(f"{p}\n" for p in ours))
    return venv


@pytest.mark.slow
def test_serve_from_installed_wheel_outside_the_checkout(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert {"reasonembed/serving/http/app.py", "reasonembed/serving/http/protocol.py",
            "reasonembed/serving/http/launch.py", "reasonembed/serving/http/replica.py"} <= set(names)
    venv = venv_with_wheel(tmp_path, wheel)
    work = tmp_path / "elsewhere"  # no configs/, serve/ or platform/ here
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '')}", REASONEMBED_CACHE=str(tmp_path / "cache"))

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import reasonembed; print(reasonembed.__file__)"],
                           cwd=work, env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the wheel's copy, not the checkout's platform/

    cli = str(venv / "bin" / "reasonembed")
    helped = subprocess.run([cli, "serve", "--help"], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "usage: reasonembed serve" in helped.stdout, helped.stderr[-2000:]

    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([cli, "serve", "--model", "minilm", "--port", str(port), "replica.topology=fused",
                                 "batching.warmup=false"], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and "ready on" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(1)
        assert "ready on" in log_path.read_text(), log_path.read_text()[-3000:]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings",
                       json={"input": "Vitamin D deficiency is linked to fractures.", "encoding_format": "float"},
                       timeout=60)
        assert r.status_code == 200, r.text
        vec = np.array(r.json()["data"][0]["embedding"])
        assert vec.shape == (384,) and abs(np.linalg.norm(vec) - 1) < 1e-4
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(120) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
