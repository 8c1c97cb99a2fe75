"""Prebuilt bundles (`ferrum-gen build`) checked on CPU: the compiler is a stand-in, and the
checks run in bundle._read_prebuilt, which reads files only (no CUDA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ferrum_gen import bundle as fbundle
from ferrum_gen import render as frender
from ferrum_gen.render import MANIFEST
from ferrum_gen.spec import load_spec

ARCH = "sm_90"


@pytest.fixture
def built(tmp_path, monkeypatch):
    """tiny built for sm_90 into tmp_path/tiny with fake cubins; returns (spec, bundle dir, cubin dir)."""
    monkeypatch.setattr(fbundle, "compile_many",
                        lambda sources, arch, workers=None: {u: f"cubin {arch} {s}".encode() for u, s in sources.items()})
    monkeypatch.setattr(fbundle, "compiler_version", lambda: "nvrtc-test")
    spec = load_spec("tiny")
    target = fbundle.build_bundle(spec, tmp_path, ARCH)
    return spec, tmp_path / spec.name, target


def _info(target: Path) -> dict:
    return json.loads((target / fbundle.BUILD_INFO).read_text())


def _write_info(target: Path, info: dict) -> None:
    (target / fbundle.BUILD_INFO).write_text(json.dumps(info))


def test_a_fresh_build_loads_with_the_fresh_manifest(built) -> None:
    spec, bundle, target = built
    manifest, cubins = fbundle._read_prebuilt(spec, bundle, ARCH)
    assert manifest == fbundle.build_manifest(spec, fbundle.render_spec(spec))
    assert set(cubins) == {k["uri"] for k in manifest["kernels"]}
    info = _info(target)
    for r in fbundle.render_spec(spec):
        assert info["kernels"][r.kernel.uri]["source_sha256"] == r.source_sha256


def test_cubins_of_older_kernel_code_are_refused(built, monkeypatch) -> None:
    """The same spec hash and generator version, but one kernel's source changed since the build."""
    spec, bundle, _ = built
    real = frender.render_kernel

    def newer(spec_, kernel):
        r = real(spec_, kernel)
        if kernel.family == "gemv_gate_up_silu":
            return frender.RenderedKernel(r.kernel, r.source.replace("{", "{ ", 1), r.template_sha256)
        return r

    monkeypatch.setattr(frender, "render_kernel", newer)
    with pytest.raises(fbundle.BundleError, match=r"gemv_gate_up_silu.*\.cubin was compiled from another source"):
        fbundle._read_prebuilt(spec, bundle, ARCH)


def test_the_manifest_on_disk_is_not_trusted_for_launch_settings(built) -> None:
    spec, bundle, _ = built
    on_disk = json.loads((bundle / MANIFEST).read_text())
    for entry in on_disk["kernels"]:
        entry["launch"]["threads"] = 7
    (bundle / MANIFEST).write_text(json.dumps(on_disk))
    manifest, _ = fbundle._read_prebuilt(spec, bundle, ARCH)
    assert all(e["launch"]["threads"] != 7 for e in manifest["kernels"])


def _drop_one(info: dict) -> None:
    info["kernels"].pop(sorted(info["kernels"])[0])


def _outside(info: dict) -> None:
    uri = sorted(info["kernels"])[0]
    info["kernels"]["../../outside"] = info["kernels"].pop(uri)


def _old_format(info: dict) -> None:
    info["kernels"] = {u: rec["cubin_sha256"] for u, rec in info["kernels"].items()}


def _not_a_mapping(info: dict) -> None:
    info["kernels"] = ["a", "b"]


@pytest.mark.parametrize(("damage", "needle"), [
    (_drop_one, "lacks"),
    (_outside, "lists kernels this spec does not have"),
    (_old_format, "is not a mapping of kernel uri"),
    (_not_a_mapping, "is not a mapping of kernel uri"),
])
def test_a_damaged_kernel_list_is_a_bundle_error(built, damage, needle) -> None:
    spec, bundle, target = built
    (bundle.parent / "outside.cubin").write_bytes(b"not ours")
    info = _info(target)
    damage(info)
    _write_info(target, info)
    with pytest.raises(fbundle.BundleError, match=needle) as exc:
        fbundle._read_prebuilt(spec, bundle, ARCH)
    assert str(target / fbundle.BUILD_INFO) in str(exc.value) and "ferrum-gen build" in str(exc.value)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe", ""])
@pytest.mark.parametrize("which", ["build", "manifest"])
def test_malformed_json_is_a_bundle_error_naming_the_file(built, text, which) -> None:
    spec, bundle, target = built
    path = target / fbundle.BUILD_INFO if which == "build" else bundle / MANIFEST
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(fbundle.BundleError) as exc:
        fbundle._read_prebuilt(spec, bundle, ARCH)
    assert str(path) in str(exc.value) and "rebuild" in str(exc.value)


def test_a_missing_cubin_or_manifest_is_a_bundle_error(built) -> None:
    spec, bundle, target = built
    victim = next(target.glob("router_*.cubin"))
    victim.unlink()
    with pytest.raises(fbundle.BundleError, match=rf"{victim.name} cannot be read.*rebuild"):
        fbundle._read_prebuilt(spec, bundle, ARCH)
    (bundle / MANIFEST).unlink()
    with pytest.raises(fbundle.BundleError, match=rf"{MANIFEST} is missing.*rebuild"):
        fbundle._read_prebuilt(spec, bundle, ARCH)


def test_a_tampered_cubin_is_refused(built) -> None:
    spec, bundle, target = built
    victim = next(target.glob("combine_*.cubin"))
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(fbundle.BundleError, match="does not match its checksum"):
        fbundle._read_prebuilt(spec, bundle, ARCH)


def test_build_compiles_before_it_writes(tmp_path, monkeypatch) -> None:
    from ferrum_gen.compile import CompileError

    def no_nvrtc(sources, arch, workers=None):
        raise CompileError("compiling kernels needs CuPy with NVRTC")

    monkeypatch.setattr(fbundle, "compile_many", no_nvrtc)
    with pytest.raises(CompileError):
        fbundle.build_bundle(load_spec("tiny"), tmp_path, ARCH)
    assert list(tmp_path.iterdir()) == []
