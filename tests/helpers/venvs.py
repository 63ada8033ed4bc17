"""Virtual environments beside .venv that reuse its installed packages through links (a .pth file naming a
folder of links to their top-level files), not through a second 1.7 GB install of torch: CI's disk ran out
with one (stop 30). pip still sees the linked distributions, so it resolves requirements against them.

    link_core_dependencies(env_dir, names)   `names` and what they need, importable in the venv at env_dir
    declared_floors()                        {name: "X.Y"}: the `>=` floors of profuser's core install_requires

`python -m helpers.venvs floors DIR` (from tests/; `make test-floors`) builds the venv where the declared floors
are tested: the oldest numpy and triton series the floors admit (numpy==X.Y.*, triton==X.Y.*: the newest patch
release of the floor's series), torch linked from .venv (the package registry holds torch < 2.13 only as
multi-GB CUDA builds), and profuser itself installed from this tree."""

from __future__ import annotations

import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
# what the loss tests run with, linked from .venv; numpy and triton are installed at their floors
LINKED = ("torch", "pytest", "pytest-xdist", "setuptools", "pybind11", "ninja", "packaging")


def closure(*names: str) -> list[metadata.Distribution]:
    """The installed distributions `names` need, theirs included (markers evaluated here, no extras)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        dist = metadata.distribution(name)
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen[key] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def link_core_dependencies(env_dir: Path, names: tuple[str, ...], *, skip: tuple[str, ...] = ()) -> None:
    """Make `names` (and what they need, less `skip`) importable and pip-visible in the venv at `env_dir`."""
    links = env_dir / "core-links"
    links.mkdir()
    dists = [d for d in closure(*names) if d.metadata["Name"].lower() not in skip]
    # a venv of Python < 3.12 comes with its own older setuptools, which would shadow the linked one
    own = [d.metadata["Name"] for d in dists if d.metadata["Name"].lower() in ("setuptools", "wheel")]
    if own:
        subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "uninstall", "-y", "-q", *own],
                       capture_output=True, check=True)
    for dist in dists:
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (links / top).exists():
                (links / top).symlink_to(src)
    (site,) = env_dir.glob("lib/python*/site-packages")
    (site / "core-links.pth").write_text(f"{links}\n")


def declared_floors() -> dict[str, str]:
    """{name: floor version} of the `>=` requirements of profuser's core install (setup.py install_requires,
    read from the installed metadata; markers evaluated on this machine)."""
    out = {}
    for spec in metadata.requires("profuser") or []:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        for s in req.specifier:
            if s.operator == ">=":
                out[req.name.lower()] = s.version
    return out


def _pip(py: str, *args: str) -> None:
    """pip install, its log shown only when it fails (then SystemExit)."""
    p = subprocess.run([py, "-m", "pip", "install", "-q", *args], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"pip install {' '.join(args)} failed:\n{(p.stdout + p.stderr)[-3000:]}")


def floors_venv(env_dir: Path) -> None:
    """The venv of `make test-floors` (module header); replaces env_dir."""
    floors = declared_floors()
    missing = {"numpy", "triton", "torch"} - set(floors)
    if missing:
        raise SystemExit(f"setup.py install_requires declares no floor for {sorted(missing)}")
    subprocess.run(["rm", "-rf", str(env_dir)], check=True)
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    pins = [f"{name}=={'.'.join(floors[name].split('.')[:2])}.*" for name in ("numpy", "triton")]
    _pip(py, *pins)
    link_core_dependencies(env_dir, LINKED, skip=("numpy", "triton"))
    _pip(py, "--no-deps", "--no-build-isolation", str(REPO))
    got = subprocess.run([py, "-c", "import numpy, torch, triton; print('numpy', numpy.__version__, 'triton', "
                          "triton.__version__, 'torch', torch.__version__)"], capture_output=True, text=True,
                         check=True).stdout.strip()
    print(f"{env_dir}: {got} (declared floors: {', '.join(f'{k}>={v}' for k, v in sorted(floors.items()))})")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "floors":
        raise SystemExit("usage: python -m helpers.venvs floors DIR")
    floors_venv(Path(sys.argv[2]).resolve())
