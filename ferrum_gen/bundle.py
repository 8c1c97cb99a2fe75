"""A kernel bundle: a spec's generated sources and manifest, compiled for one GPU arch.

Two ways to get one:
- `KernelBundle.load(spec)` renders the spec's sources in memory and compiles them
  through the on-disk cache (needs NVRTC the first time);
- `ferrum-gen build --spec X --arch sm_90` writes <bundle>/cubin/sm_90/*.cubin and a
  build.json; `KernelBundle.load(spec, bundle_dir=...)` then loads those cubins with no
  compiler at all, after checking that they were built for this spec, arch and
  generator version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .compile import KernelCache, compile_many, compiler_version, require_cupy, write_atomic
from .render import MANIFEST, build_manifest, render_spec, write_bundle
from .settings import get_settings
from .spec import MoeSpec

BUILD_INFO = "build.json"


class BundleError(ValueError):
    """A bundle that cannot be used here; the message says which spec, arch or version is off."""


def device_arch(device_id: int | None = None) -> str:
    cupy = require_cupy("finding the GPU's arch")

    dev = cupy.cuda.Device(device_id) if device_id is not None else cupy.cuda.Device()
    return f"sm_{dev.compute_capability}"


def _check_arch(spec: MoeSpec, arch: str) -> None:
    if arch not in {a.value for a in spec.target_archs}:
        raise BundleError(
            f"spec {spec.name} targets {[a.value for a in spec.target_archs]}, not {arch}: add {arch} to "
            "target_archs and regenerate"
        )


def build_bundle(spec: MoeSpec, out_root: Path, arch: str) -> Path:
    """Generate (or refresh) <out_root>/<spec>/ and compile every kernel for `arch` into it."""
    _check_arch(spec, arch)
    compiler_version()  # fails here, before anything is written, when there is no NVRTC
    bundle = write_bundle(spec, out_root)
    manifest = json.loads((bundle / MANIFEST).read_text())
    target = bundle / "cubin" / arch
    sources = {e["uri"]: (bundle / e["file"]).read_text() for e in manifest["kernels"]}
    kernels = {}
    for uri, cubin in compile_many(sources, arch).items():
        write_atomic(target / f"{uri}.cubin", cubin)
        kernels[uri] = hashlib.sha256(cubin).hexdigest()
    info = {
        "generator_version": __version__,
        "spec_name": spec.name,
        "spec_hash": spec.spec_hash(),
        "arch": arch,
        "compiler": compiler_version(),
        "kernels": kernels,
    }
    write_atomic(target / BUILD_INFO, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
    return target


def _read_prebuilt(spec: MoeSpec, bundle_dir: Path, arch: str) -> dict[str, bytes]:
    target = Path(bundle_dir) / "cubin" / arch
    info_path = target / BUILD_INFO
    if not info_path.is_file():
        built = sorted(p.parent.name for p in (Path(bundle_dir) / "cubin").glob(f"*/{BUILD_INFO}"))
        raise BundleError(
            f"bundle {bundle_dir} has no build for {arch} (it has: {built or 'none'}); run "
            f"`ferrum-gen build --spec {spec.name} --arch {arch}`"
        )
    info = json.loads(info_path.read_text())
    if info.get("spec_hash") != spec.spec_hash():
        raise BundleError(
            f"bundle {bundle_dir} was built for spec {info.get('spec_name')!r} (hash {str(info.get('spec_hash'))[:12]}), "
            f"not for spec {spec.name!r} (hash {spec.spec_hash()[:12]}): rebuild it for this spec"
        )
    if info.get("arch") != arch:
        raise BundleError(f"bundle {bundle_dir} was built for {info.get('arch')}, this GPU is {arch}: rebuild it")
    if info.get("generator_version") != __version__:
        raise BundleError(
            f"bundle {bundle_dir} was built by ferrum-gen {info.get('generator_version')}, this is "
            f"{__version__}: rebuild it with this version"
        )
    cubins = {}
    for uri, digest in info["kernels"].items():
        data = (target / f"{uri}.cubin").read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise BundleError(f"{target / (uri + '.cubin')} does not match its checksum in {BUILD_INFO}: rebuild")
        cubins[uri] = data
    return cubins


@dataclass
class Kernel:
    uri: str
    function: Any  # cupy.cuda.function.Function
    launch: dict[str, Any]
    module: Any = field(repr=False)  # keeps the module (and so the function) alive


class KernelBundle:
    """Every kernel of one spec, loaded on the current CUDA device."""

    def __init__(self, spec: MoeSpec, manifest: dict, cubins: dict[str, bytes], arch: str):
        cupy = require_cupy("loading kernels")

        self.spec = spec
        self.manifest = manifest
        self.arch = arch
        self.kernels: dict[str, Kernel] = {}
        for entry in manifest["kernels"]:
            module = cupy.cuda.function.Module()
            module.load(cubins[entry["uri"]])
            self.kernels[entry["uri"]] = Kernel(entry["uri"], module.get_function(entry["symbol"]), entry["launch"], module)

    @classmethod
    def load(cls, spec: MoeSpec, bundle_dir: Path | None = None, arch: str | None = None) -> "KernelBundle":
        arch = arch or device_arch()
        _check_arch(spec, arch)
        if bundle_dir is not None:
            manifest = json.loads((Path(bundle_dir) / MANIFEST).read_text())
            if manifest.get("spec_hash") != spec.spec_hash():
                raise BundleError(
                    f"bundle {bundle_dir} holds spec {manifest.get('spec_name')!r}, not {spec.name!r} (spec hashes differ)"
                )
            return cls(spec, manifest, _read_prebuilt(spec, Path(bundle_dir), arch), arch)
        rendered = render_spec(spec)
        cache = KernelCache(get_settings().cache_dir)
        cubins = cache.get_or_compile({r.kernel.uri: r.source for r in rendered}, arch)
        return cls(spec, build_manifest(spec, rendered), cubins, arch)

    def family(self, family: str) -> list[Kernel]:
        return [self.kernels[e["uri"]] for e in self.manifest["kernels"] if e["family"] == family]

    def one(self, family: str) -> Kernel:
        (k,) = self.family(family)
        return k
