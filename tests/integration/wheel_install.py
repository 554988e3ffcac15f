"""Build the wheel from a copy of the source tree and install it into a fresh virtualenv, offline.

The wheel is built without build isolation (setuptools, wheel and build come from this
environment, `.[test]`).  The fresh virtualenv gets the wheel with `--no-deps`; its dependencies
come from this environment's site-packages through a `.pth` path entry (a plain path line: the
editable install's finder there is not loaded, so the only `cds_service` the new environment can
import is the installed wheel; callers check that).
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IGNORED = shutil.ignore_patterns(".git", ".venv", "data", "build", "dist", "*.egg-info", "__pycache__",
                                 ".pytest_cache", ".hypothesis", "test-artifacts", "node_modules")


def build_wheel(workdir: Path) -> Path:
    """`python -m build --wheel` of a copy of the repository; the wheel's path."""
    src = workdir / "src" / "b12-neck-cds"
    shutil.copytree(REPO, src, ignore=IGNORED)
    out = workdir / "dist"
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [whl] = out.glob("*.whl")
    return whl


def install_into_fresh_venv(wheel: Path, root: Path, base_python: str = sys.executable) -> Path:
    """A new virtualenv at `root` (from `base_python`) with `wheel` installed; `root`."""
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    purelib = Path(subprocess.run([str(root / "bin" / "python"), "-c",
                                   "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    deps = [p for p in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                                      *site.getsitepackages()]) if Path(p).is_dir()]
    (purelib / "zz-test-dependencies.pth").write_text("\n".join(deps) + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"), "install",
                           "--no-deps", "--no-index", "--disable-pip-version-check", "-q", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return root
