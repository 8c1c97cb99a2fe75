"""The declared dependencies: lower bounds at least what the code needs, extras for both CUDA majors,
licence metadata, and the installed packages having the features the code uses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the dev extra installs tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

NEEDED = {
    "gguf": ("0.16", "ReaderField.contents(), which every metadata read in gguf_io uses, arrived in gguf 0.16"),
    "pydantic": ("2.6", "frozen models with field/model validators (pydantic 2 API)"),
    "numpy": ("1.26", "the first numpy with wheels for Python 3.12"),
    "jinja2": ("3.1", "StrictUndefined templates as render.py writes them"),
    "pyyaml": ("6.0", "yaml.SafeLoader subclasses with mark names"),
    "tqdm": ("4.66", "tqdm.auto with set_postfix_str (load_model's progress bar)"),
}
"""Each runtime dependency's lowest usable version, and why."""


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements(lines: list[str]) -> dict[str, Requirement]:
    return {Requirement(line).name.lower(): Requirement(line) for line in lines}


def _lower_bound(req: Requirement) -> Version | None:
    bounds = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    return max(bounds) if bounds else None


def test_every_runtime_dependency_is_declared_with_a_lower_bound_the_code_can_use(project) -> None:
    declared = _requirements(project["dependencies"])
    assert set(declared) == set(NEEDED), "a dependency was added or removed: list its needed version in NEEDED"
    for name, (needed, why) in NEEDED.items():
        bound = _lower_bound(declared[name])
        assert bound is not None, f"{name} is declared without a lower bound; it needs >= {needed} ({why})"
        assert bound >= Version(needed), f"{name} is declared >= {bound}, but the code needs >= {needed}: {why}"


def test_gguf_lower_bound_is_exactly_the_first_version_with_reader_field_contents(project) -> None:
    assert _lower_bound(_requirements(project["dependencies"])["gguf"]) == Version("0.16")


def test_cuda_extras_name_the_cupy_of_each_cuda_major(project) -> None:
    extras = {k: _requirements(v) for k, v in project["optional-dependencies"].items()}
    assert set(extras["cuda12"]) == {"cupy-cuda12x", "cuda-bindings"}
    assert set(extras["cuda13"]) == {"cupy-cuda13x", "cuda-bindings"}
    # each CUDA major's driver bindings (programmatic dependent launch: cuLaunchKernelEx)
    assert str(extras["cuda12"]["cuda-bindings"].specifier) == "<13,>=12.8"
    assert _lower_bound(extras["cuda13"]["cuda-bindings"]) >= Version("13.0")
    # cupy-cuda13x exists from CuPy 13.6 on; a lower bound below that cannot be resolved
    assert _lower_bound(extras["cuda13"]["cupy-cuda13x"]) >= Version("13.6")
    assert extras["gpu"] == extras["cuda13"], "the gpu extra is an alias of cuda13"
    # torch.library.custom_op (ferrum_gen.torch) arrived in torch 2.4
    assert _lower_bound(extras["torch"]["torch"]) >= Version("2.4")


def test_license_file_and_metadata_agree(project) -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0" in text
    assert project["license"] == {"text": "Apache-2.0"}
    assert "License :: OSI Approved :: Apache Software License" in project["classifiers"]
    assert all("example.invalid" not in url for url in project.get("urls", {}).values())


def test_installed_gguf_has_the_reader_api_the_code_uses() -> None:
    from gguf.gguf_reader import ReaderField

    assert callable(getattr(ReaderField, "contents", None)), (
        "the installed gguf lacks ReaderField.contents: upgrade it (pip install 'gguf>=0.16')"
    )


def test_installed_tqdm_has_what_load_model_uses() -> None:
    from tqdm.auto import tqdm

    with tqdm(total=1, disable=True) as bar:
        bar.set_postfix_str("x")
        bar.update(1)
