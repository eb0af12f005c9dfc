"""environment.yml (conda) and pyproject.toml must list the same requirements."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(map(_norm, project["dependencies"]))
    for extra in ("book", "test"):
        wanted |= set(map(_norm, project["optional-dependencies"][extra]))
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_reqs = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {_norm(r) for r in pip_reqs if not r.startswith("-e")}
    assert listed == wanted, f"only in environment.yml: {sorted(listed - wanted)}; only in pyproject: {sorted(wanted - listed)}"
    assert any(r.startswith("-e") for r in pip_reqs), "environment.yml should install lossbook itself (-e .)"


def test_constraints_pin_every_requirement():
    pins = {line.split("==")[0].lower() for line in (ROOT / "constraints" / "ci.txt").read_text().splitlines()
            if "==" in line}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["book"] + project["optional-dependencies"]["test"]
    names = {re.split(r"[<>=!~\[ ]", r)[0].lower() for r in reqs}
    assert names <= pins, f"not pinned in constraints/ci.txt: {sorted(names - pins)}"
    assert "torch==2.13.0" in (ROOT / "constraints" / "ci.txt").read_text()
