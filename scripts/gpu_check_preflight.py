"""Can this Python run scripts/gpu_check.py? Its version, and torch's and torchvision's, against pyproject.toml's
floors (refused in one line when too old: those come with the machine's CUDA); the other dependencies it lacks
pip-installed at requirements.txt's versions. Nothing of the project is imported here."""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import shlex
import site
import subprocess
import sys
from typing import Optional

from gpu_check_plan import ROOT  # scripts/, beside this file

HEAVY = ("torch", "torchvision")  # built for the machine's CUDA: refused when missing or old, never installed here


class Refused(Exception):
    """This Python cannot run the check; the message says why and what to do, in one line."""


def preflight(no_install: bool) -> list[str]:
    """Refused where this Python or its torch cannot run the check; the other dependencies it lacks installed
    (unless no_install); returns the pip specs installed."""
    python_floor, floors = declared()
    if sys.version_info < version_tuple(python_floor):
        raise Refused(f"Python {sys.version.split()[0]} at {sys.executable} is older than the project's "
                      f">={python_floor} (pyproject.toml); set PYTHON to a newer one")
    wrong = unmet(floors)
    heavy = {name: why for name, why in wrong.items() if name in HEAVY}
    if heavy:
        raise Refused(f"{sys.executable}: {described(heavy)}; the project needs "
                      f"{', '.join(f'{name}>={floors[name]}' for name in heavy)} (pyproject.toml): set PYTHON to a "
                      f"Python with a CUDA torch that new")
    if not wrong:
        return []
    specs = [pins().get(name.lower(), f"{name}>={floors[name]}") for name in wrong]
    if no_install:
        raise Refused(f"{sys.executable}: {described(wrong)}; install them: {shlex.join(pip_install(specs))}")
    install(specs, wrong)
    still = unmet(floors)
    if still:
        raise Refused(f"{sys.executable}: {described(still)} after {shlex.join(pip_install(specs))}")
    return specs


def declared() -> tuple[str, dict[str, str]]:
    """pyproject.toml's Python floor and {dependency: lowest version}: the project's one statement of them."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    python = re.search(r'^requires-python = ">=([\d.]+)"', text, re.M).group(1)
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", text, re.M | re.S).group(1)
    return python, dict(re.findall(r'^\s*"([\w.-]+)>=([\d.]+)', dependencies, re.M))


def pins() -> dict[str, str]:
    """requirements.txt's tested versions, {lower-case name: "name==version"}."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        found = (re.match(r"([\w.-]+)==\S+", line) for line in f)
        return {m.group(1).lower(): m.group(0) for m in found if m}


def version_tuple(version: str) -> tuple[int, ...]:
    """A version's release numbers: "2.5.0a0+nv24.10" -> (2, 5, 0)."""
    return tuple(int(part) for part in re.match(r"\d+(\.\d+)*", version).group().split("."))


def installed(name: str) -> Optional[str]:
    """The installed version of a distribution (read from its metadata, nothing imported), None where it is not."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def unmet(floors: dict[str, str]) -> dict[str, str]:
    """{dependency: "missing" or "<version> < <floor>"} for each one this Python lacks or has too old."""
    wrong = {}
    for name, floor in floors.items():
        have = installed(name)
        if have is None or version_tuple(have) < version_tuple(floor):
            wrong[name] = "missing" if have is None else f"{have} < {floor}"
    return wrong


def described(wrong: dict[str, str]) -> str:
    return ", ".join(f"{name} {why}" for name, why in wrong.items())  # "timm missing, tqdm 4.50.0 < 4.58"


def in_venv() -> bool:
    return sys.prefix != sys.base_prefix


def pip_install(specs: list[str]) -> list[str]:
    """The pip command that installs the specs for this Python: into its venv, else into the user's site."""
    return [sys.executable, "-m", "pip", "install", *([] if in_venv() else ["--user"]), *specs]


def install(specs: list[str], wrong: dict[str, str]) -> None:
    """pip-install the specs, importable in this process too; Refused where pip fails (no index reachable, say)."""
    print(f"gpu_check: {sys.executable}: {described(wrong)}; installing them: {shlex.join(pip_install(specs))}",
          file=sys.stderr, flush=True)
    command = pip_install(specs) + ["--quiet", "--disable-pip-version-check", "--retries", "1", "--timeout", "15"]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        error = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise Refused(f"{sys.executable}: {described(wrong)}; `{shlex.join(pip_install(specs))}` failed: {error}; "
                      f"install them, or set PYTHON to a Python that has them")
    if not in_venv():  # the user's site folder may be new: this process's path was set before it existed
        site.addsitedir(site.getusersitepackages())
    importlib.invalidate_caches()

