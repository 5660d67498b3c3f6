"""The Docker image is reproducible: everything it installs comes from
scripts/requirements.lock, pinned by version and hash, and the lock agrees with
pyproject.toml (regenerate it with scripts/lock.sh when this fails).

`docker build` itself is not run here (no Docker daemon in CI); these check the files
it reads."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "scripts" / "requirements.lock"


def locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes)."""
    out: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"\n(?=\S)", LOCK.read_text()):
        m = re.match(r"([A-Za-z0-9._-]+)==([^\s\\;]+)", block)
        if m:
            out[canonicalize_name(m[1])] = (m[2], re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return out


def test_every_run_time_dependency_is_locked_within_its_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [
        *project["dependencies"],
        *project["optional-dependencies"]["tokenizer"],
        *project["optional-dependencies"]["fast"],
        *project["optional-dependencies"]["reports"],
    ]
    pins = locked()
    for spec in wanted:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in {LOCK.name}: run scripts/lock.sh"
        assert req.specifier.contains(pins[name][0], prereleases=True), (spec, pins[name][0])


def test_every_locked_package_is_pinned_by_hash() -> None:
    pins = locked()
    assert len(pins) >= 10  # the dependencies and theirs
    for name, (version, hashes) in pins.items():
        assert re.fullmatch(r"\d+(\.\d+)*", version), (name, version)
        assert hashes, f"{name} has no hash"
    assert "--index-url" not in LOCK.read_text() and "file://" not in LOCK.read_text()  # nothing of this machine


def test_the_image_installs_from_the_lock_as_a_non_root_user_with_the_scripts() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines() if line.strip() and not line.startswith("#")]
    base = next(line for line in lines if line.startswith("FROM "))
    assert re.fullmatch(r"FROM python:\d+\.\d+\.\d+-slim-\w+", base), base  # an exact version, not a moving tag
    installs = [line for line in lines if "pip install" in line]
    assert any("--require-hashes" in line and "requirements.lock" in line for line in installs)
    # Nothing resolved anew: the package is built with the locked setuptools, not a fetched one.
    assert all("--require-hashes" in line or ("--no-deps" in line and "--no-build-isolation" in line) for line in installs), installs
    assert "setuptools" in locked()
    assert "COPY scripts ./scripts" in lines
    user = [line for line in lines if line.startswith("USER ")]
    assert user and user[-1] not in ("USER root", "USER 0")
