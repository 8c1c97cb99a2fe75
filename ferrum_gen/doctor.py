"""`ferrum-gen doctor` and `ferrum-gen cache clear`: what this machine has, and what to fix.

Each check gives one Finding: a label, what was found, and, for a problem, the fix.
The report exits 1 when any finding is a problem (no CuPy, no GPU, an unsupported GPU,
a stale shipped bundle, an unwritable cache, ...), 0 when everything needed to run is there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .compile import INSTALL_CUPY, CupyMissingError, compiler_version, require_cupy
from .launch import pdl_unavailable
from .spec import Arch, MoeSpec, load_spec, shipped_spec_names
from .tuning import gpu_slug, table_path as tuning_table_path  # the runtime's lookup, not a copy

__all__ = ["Finding", "run_checks", "format_report", "stale_files", "cache_entries", "clear_cache",
           "gpu_slug", "tuning_table_path", "format_size"]

CACHE_ENTRY = re.compile(r"^[a-z][a-z0-9_]*-[0-9a-f]{40}\.cubin$")
"""A cache entry's file name (compile.KernelCache.entry): <uri>-<40 hex digits of the key>.cubin."""
CACHE_TEMP = re.compile(r"^[a-z][a-z0-9_]*-[0-9a-f]{40}\.cubin\..+\.tmp$")
"""A temporary file a writer left behind when it was killed mid-write."""

SUPPORTED_ARCHS = tuple(a.value for a in Arch)


@dataclass(frozen=True)
class Finding:
    label: str
    detail: str
    fix: str = ""
    """empty when this is no problem"""

    @property
    def ok(self) -> bool:
        return not self.fix


# --- helpers the CLI uses too ----------------------------------------------


def stale_files(spec: MoeSpec, bundle: Path) -> list[tuple[Path, str]]:
    """(path, what is wrong) for every file of `bundle` that differs from a fresh generation."""
    from .render import MANIFEST, bundle_files

    want = bundle_files(spec)
    have = {p.name for p in bundle.glob("*.cu")} | ({MANIFEST} if (bundle / MANIFEST).exists() else set())
    out = []
    for fname in sorted(set(want) | have):
        path = bundle / fname
        if fname not in want:
            out.append((path, "not generated any more"))
        elif not path.exists():
            out.append((path, "missing"))
        elif path.read_text() != want[fname]:
            out.append((path, "differs from the generator's output"))
    return out


def cache_entries(root: Path) -> list[Path]:
    """ferrum-gen's own files in the cache directory (entries and leftover temporary files), nothing else."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_file() and (CACHE_ENTRY.match(p.name) or CACHE_TEMP.match(p.name)))


def clear_cache(root: Path) -> tuple[int, int]:
    """Removes ferrum-gen's cache entries under `root`; returns (files removed, bytes freed)."""
    count = freed = 0
    for path in cache_entries(root):
        size = path.stat().st_size
        path.unlink(missing_ok=True)
        count += 1
        freed += size
    return count, freed


def format_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


# --- the checks -------------------------------------------------------------


def driver_finding(driver: int, runtime: int) -> Finding:
    """The driver's CUDA version against CuPy's runtime (both as CUDA encodes them, 13020 = 13.2).

    CUDA's minor version compatibility lets a runtime of the driver's major version run on it
    (13.2 on a 13.0 driver); only a newer major needs another driver or CuPy build.
    """
    have, want = _cuda_version(driver), _cuda_version(runtime)
    if driver // 1000 < runtime // 1000:
        return Finding("CUDA driver", f"supports CUDA {have}", f"CuPy was built for CUDA {want}, a newer major "
                       "version than the driver's: update the driver or " + INSTALL_CUPY)
    if driver < runtime:
        return Finding("CUDA driver", f"supports CUDA {have} (CuPy's CUDA {want} runs on it through minor version "
                       "compatibility)")
    return Finding("CUDA driver", f"supports CUDA {have}")


def _check_gpu() -> tuple[list[Finding], str | None]:
    """CuPy, driver, runtime, NVRTC and each GPU; returns the findings and the first GPU's name."""
    try:
        cupy = require_cupy("running kernels")
    except CupyMissingError:
        return [Finding("CuPy", "not installed", INSTALL_CUPY),
                Finding("GPU", "not checked: CuPy is missing", "see CuPy above")], None
    out = [Finding("CuPy", cupy.__version__)]
    rt = cupy.cuda.runtime
    try:
        driver = rt.driverGetVersion()
        runtime = rt.runtimeGetVersion()
    except Exception as err:  # noqa: BLE001 - any CUDA failure is reported as such
        out.append(Finding("CUDA driver", f"unusable: {err}",
                           "install an NVIDIA driver (CUDA 12 or 13) and check `nvidia-smi`"))
        return out, None
    out.append(driver_finding(driver, runtime))
    out.append(Finding("CUDA runtime (CuPy)", _cuda_version(runtime)))
    try:
        out.append(Finding("NVRTC", compiler_version()))
    except Exception as err:  # noqa: BLE001
        out.append(Finding("NVRTC", f"unusable: {err}",
                           "install the NVRTC that matches CuPy (e.g. pip install nvidia-cuda-nvrtc-cu12) or "
                           "load bundles prebuilt with `ferrum-gen build` on another machine"))
    try:
        count = rt.getDeviceCount()
    except Exception as err:  # noqa: BLE001
        count, why = 0, f" ({err})"
    else:
        why = ""
    if count == 0:
        out.append(Finding("GPU", "none visible" + why, "run on a machine with an NVIDIA GPU (sm_80-sm_90); check "
                           "`nvidia-smi` and CUDA_VISIBLE_DEVICES"))
        return out, None
    first = None
    for i in range(count):
        props = rt.getDeviceProperties(i)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        arch = f"sm_{props['major']}{props['minor']}"
        first = first or name
        label = f"GPU {i}"
        if arch in SUPPORTED_ARCHS:
            out.append(Finding(label, f"{name}, {arch}"))
        else:
            newer = props["major"] >= 10
            out.append(Finding(label, f"{name}, {arch}: not supported",
                               "ferrum-gen generates for sm_80, sm_86, sm_89 and sm_90; "
                               + ("Blackwell (sm_100 and later) is not supported yet" if newer
                                  else "older GPUs lack the tensor-core instructions it uses")
                               + "; use a supported GPU"))
        if arch in SUPPORTED_ARCHS:
            # a speed feature, not a requirement: reported, never a failed check
            reason = pdl_unavailable(arch)
            out.append(Finding(f"{label} dependent launch",
                               "on (the grouped and stream paths' kernels overlap)" if reason is None
                               else f"off, plain launches: {reason}"))
    return out, first


def _check_nvcc() -> Finding:
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        # NVRTC compiles at run time; nvcc only serves `make test`'s compile check
        return Finding("nvcc", "not found (optional: only `make test`'s compile check uses it; "
                               "FERRUM_SKIP_NVCC=1 skips that check)")
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return Finding("nvcc", f"{nvcc} does not run: {err}", "repair or remove that CUDA toolkit install")
    release = re.search(r"release ([0-9.]+)", text)
    return Finding("nvcc", f"{nvcc} ({'release ' + release.group(1) if release else 'unknown version'})")


def _check_cache() -> list[Finding]:
    from .settings import Settings, SettingsError

    try:
        root = Settings.from_env().cache_dir
    except SettingsError as err:
        return [Finding("kernel cache", str(err), "fix or unset FERRUM_GEN_CACHE")]
    entries = cache_entries(root)
    size = sum(p.stat().st_size for p in entries)
    detail = f"{root}: {len(entries)} entries, {format_size(size)}"
    probe = root if root.exists() else next((p for p in root.parents if p.exists()), root)
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".ferrum-doctor-"):
            pass
    except OSError as err:
        return [Finding("kernel cache", f"{detail}; not writable ({err.strerror or err})",
                        "set FERRUM_GEN_CACHE to a writable directory (or fix the permissions)")]
    return [Finding("kernel cache", detail + ("; writable" if root.exists() else "; will be created on first use"))]


def _check_bundles(out_root: Path, gpu_name: str | None) -> list[Finding]:
    if not out_root.is_dir():
        return [Finding("shipped bundles", f"no {out_root}/ here (outside a checkout KernelBundle.load renders "
                                           "the kernels in memory; nothing to check)")]
    findings = []
    for name in shipped_spec_names():
        spec = load_spec(name)
        bundle = out_root / spec.name
        stale = stale_files(spec, bundle)
        if stale:
            findings.append(Finding(f"bundle {spec.name}", f"{len(stale)} file(s) out of date in {bundle}",
                                    f"run `ferrum-gen generate --spec {spec.name} --out {out_root}`"))
        else:
            findings.append(Finding(f"bundle {spec.name}", "current"))
        if gpu_name is not None:
            table = tuning_table_path(bundle, gpu_name)
            findings.append(Finding(f"tuning {spec.name}",
                                    f"{table} present" if table.is_file()
                                    else f"no table for {gpu_name} ({table}); the spec's tile defaults apply"))
    if gpu_name is None:
        findings.append(Finding("tuning tables", "not checked: no GPU to look them up for"))
    return findings


def run_checks(out_root: Path = Path("generated")) -> list[Finding]:
    findings = [Finding("ferrum-gen", __version__)]
    gpu, gpu_name = _check_gpu()
    findings += gpu
    findings.append(_check_nvcc())
    findings += _check_cache()
    findings += _check_bundles(out_root, gpu_name)
    return findings


def format_report(findings: list[Finding]) -> str:
    width = max(len(f.label) for f in findings)
    lines = []
    for f in findings:
        lines.append(f"{'ok ' if f.ok else 'BAD'} {f.label:<{width}}  {f.detail}")
        if not f.ok:
            lines.append(f"    {'':<{width}}  fix: {f.fix}")
    problems = sum(not f.ok for f in findings)
    lines.append(f"{problems} problem(s) found" if problems else "all good")
    return "\n".join(lines)
