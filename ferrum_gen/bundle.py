"""A kernel bundle: a spec's generated sources and manifest, compiled for one GPU arch.

Two ways to get one:
- `KernelBundle.load(spec)` renders the spec's sources in memory and compiles them
  through the on-disk cache (needs NVRTC the first time);
- `ferrum-gen build --spec X --arch sm_90` writes <bundle>/cubin/sm_90/*.cubin and a
  build.json; `KernelBundle.load(spec, bundle_dir=...)` then loads those cubins with no
  compiler at all, after checking that they were built for this spec, arch and
  generator version, and from the very sources this generator renders now (build.json
  records each kernel's source sha256). The launch settings always come from a fresh
  render, never from the files on disk, so old cubins cannot meet new launch geometry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .compile import KernelCache, compile_many, compiler_version, require_cupy, write_atomic
from .render import MANIFEST, build_manifest, previous_bundle_files, render_spec, write_bundle
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


def build_bundle(spec: MoeSpec, out_root: Path, arch: str, force: bool = False) -> Path:
    """Generate (or refresh) <out_root>/<spec>/ and compile every kernel for `arch` into it.

    Everything is compiled before anything is written: a compiler failure leaves the
    directory as it was.
    """
    _check_arch(spec, arch)
    previous_bundle_files(spec, out_root, force)  # refuse a directory we may not write before compiling
    compiler = compiler_version()  # fails here, before anything is written, when there is no NVRTC
    rendered = render_spec(spec)
    cubins = compile_many({r.kernel.uri: r.source for r in rendered}, arch)
    bundle = write_bundle(spec, out_root, force=force)
    target = bundle / "cubin" / arch
    kernels = {}
    for r in rendered:
        cubin = cubins[r.kernel.uri]
        write_atomic(target / f"{r.kernel.uri}.cubin", cubin)
        kernels[r.kernel.uri] = {"cubin_sha256": hashlib.sha256(cubin).hexdigest(), "source_sha256": r.source_sha256}
    info = {
        "generator_version": __version__,
        "spec_name": spec.name,
        "spec_hash": spec.spec_hash(),
        "arch": arch,
        "compiler": compiler,
        "kernels": kernels,
    }
    write_atomic(target / BUILD_INFO, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
    return target


def _read_json_object(path: Path, what: str, fix: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path} is missing: the bundle is incomplete; {fix}") from None
    except OSError as err:
        raise BundleError(f"{path} cannot be read ({err.strerror or err}): {fix}") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise BundleError(f"{path} is not valid JSON ({str(err)[:120]}): {what} is damaged; {fix}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path} holds a JSON {type(data).__name__}, not an object: {what} is damaged; {fix}")
    return data


def _kernel_records(info: dict, info_path: Path, fix: str) -> dict[str, dict[str, str]]:
    kernels = info.get("kernels")
    if not (
        isinstance(kernels, dict)
        and all(
            isinstance(rec, dict) and isinstance(rec.get("cubin_sha256"), str) and isinstance(rec.get("source_sha256"), str)
            for rec in kernels.values()
        )
    ):
        raise BundleError(
            f"{info_path}: 'kernels' is not a mapping of kernel uri to its cubin_sha256 and source_sha256 "
            f"(an older ferrum-gen wrote it, or it was edited): {fix}"
        )
    return kernels


def _read_prebuilt(spec: MoeSpec, bundle_dir: Path, arch: str) -> tuple[dict, dict[str, bytes]]:
    """The fresh manifest and the checked cubins of a prebuilt bundle; reads files only (no CUDA).

    Every cubin must have been compiled from the source this generator renders for `spec`
    now, and build.json must list exactly the kernels the spec has.
    """
    bundle_dir = Path(bundle_dir)
    rebuild = f"rebuild it with `ferrum-gen build --spec {spec.name} --arch {arch} --out {bundle_dir.parent}`"
    on_disk = _read_json_object(bundle_dir / MANIFEST, "the bundle manifest", rebuild)
    if on_disk.get("spec_hash") != spec.spec_hash():
        raise BundleError(
            f"bundle {bundle_dir} holds spec {str(on_disk.get('spec_name'))[:80]!r}, not {spec.name!r} "
            f"(spec hashes differ): load the bundle of this spec, or {rebuild}"
        )
    target = bundle_dir / "cubin" / arch
    info_path = target / BUILD_INFO
    if not info_path.is_file():
        built = sorted(p.parent.name for p in (bundle_dir / "cubin").glob(f"*/{BUILD_INFO}"))
        raise BundleError(
            f"bundle {bundle_dir} has no build for {arch} (it has: {built or 'none'}); run "
            f"`ferrum-gen build --spec {spec.name} --arch {arch}`"
        )
    info = _read_json_object(info_path, "the build record", rebuild)
    if info.get("spec_hash") != spec.spec_hash():
        raise BundleError(
            f"bundle {bundle_dir} was built for spec {str(info.get('spec_name'))[:80]!r} "
            f"(hash {str(info.get('spec_hash'))[:12]}), not for spec {spec.name!r} (hash {spec.spec_hash()[:12]}): "
            "rebuild it for this spec"
        )
    if info.get("arch") != arch:
        raise BundleError(f"bundle {bundle_dir} was built for {str(info.get('arch'))[:20]}, this GPU is {arch}: rebuild it")
    if info.get("generator_version") != __version__:
        raise BundleError(
            f"bundle {bundle_dir} was built by ferrum-gen {str(info.get('generator_version'))[:20]}, this is "
            f"{__version__}: rebuild it with this version"
        )
    records = _kernel_records(info, info_path, rebuild)
    rendered = render_spec(spec)
    fresh = {r.kernel.uri: r for r in rendered}
    missing, extra = sorted(set(fresh) - set(records)), sorted(set(records) - set(fresh))
    if missing or extra:
        # A uri that is not one of the spec's (e.g. '../x') never becomes a path: it ends here.
        parts = ([f"lacks {missing[:3]}"] if missing else []) + ([f"lists kernels this spec does not have: {[u[:80] for u in extra[:3]]}"] if extra else [])
        raise BundleError(
            f"{info_path} {' and '.join(parts)}: it was built from other kernel code than this ferrum-gen renders; "
            + rebuild
        )
    cubins = {}
    for uri, r in fresh.items():
        path = target / f"{uri}.cubin"
        if records[uri]["source_sha256"] != r.source_sha256:
            raise BundleError(
                f"{path} was compiled from another source of {uri} (source sha256 "
                f"{records[uri]['source_sha256'][:12]}) than this ferrum-gen renders ({r.source_sha256[:12]}): the "
                f"kernel code changed since the build, and its launch settings may have too; {rebuild}"
            )
        try:
            data = path.read_bytes()
        except OSError as err:
            raise BundleError(f"{path} cannot be read ({err.strerror or err}): {rebuild}") from None
        if hashlib.sha256(data).hexdigest() != records[uri]["cubin_sha256"]:
            raise BundleError(f"{path} does not match its checksum in {info_path}: {rebuild}")
        cubins[uri] = data
    return build_manifest(spec, rendered), cubins


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
        self.bundle_dir: Path | None = None
        """The prebuilt bundle's directory when loaded from one (its tuning/ tables are looked up there)."""
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
            manifest, cubins = _read_prebuilt(spec, Path(bundle_dir), arch)
            bundle = cls(spec, manifest, cubins, arch)
            bundle.bundle_dir = Path(bundle_dir)
            return bundle
        rendered = render_spec(spec)
        cache = KernelCache(get_settings().cache_dir)
        cubins = cache.get_or_compile({r.kernel.uri: r.source for r in rendered}, arch)
        return cls(spec, build_manifest(spec, rendered), cubins, arch)

    def family(self, family: str) -> list[Kernel]:
        return [self.kernels[e["uri"]] for e in self.manifest["kernels"] if e["family"] == family]

    def one(self, family: str) -> Kernel:
        (k,) = self.family(family)
        return k
