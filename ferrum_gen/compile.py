"""Compile generated CUDA to cubins with NVRTC (through CuPy) and cache them on disk.

A cache entry is keyed by sha256 of (source, options, arch, compiler version) and
stored as <uri>-<key>.cubin: 32 bytes of sha256(cubin) followed by the cubin, written
to a temporary file and renamed into place, so concurrent builds of the same kernel
never leave a torn file. An entry whose checksum does not match is deleted and rebuilt.

A cubin from the cache runs in the caller's CUDA context, and entry names are predictable,
so the cache trusts only what its user alone can write: the directory is created 0700, and
a directory or entry that another user owns, or that group or others may write, is not
used (a CacheWarning says why, and the kernels are compiled instead). The cache is an
optimisation: a failure to read or store an entry is a miss or a warning, never an error.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import secrets
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path


class CompileError(RuntimeError):
    """NVRTC rejected a generated source; the message carries the compiler log."""


class CacheWarning(UserWarning):
    """The compile cache could not be used as a whole or in part; kernels were compiled instead."""


INSTALL_CUPY = "install ferrum-gen[cuda12] or [cuda13] (CuPy for a CUDA 12 or a CUDA 13 driver; see README, Install)"


class CupyMissingError(CompileError):
    """CuPy (with NVRTC) is not importable: nothing can be compiled or run on a GPU."""


def require_cupy(what: str, module: str = "cupy"):
    """Imports `module` (cupy, or a part of it), or raises CupyMissingError saying what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise CupyMissingError(f"{what} needs CuPy, which cannot be imported here ({err}): {INSTALL_CUPY}") from None


def _nvrtc():
    return require_cupy("compiling kernels (NVRTC)", "cupy_backends.cuda.libs.nvrtc")


def compiler_version() -> str:
    major, minor = _nvrtc().getVersion()
    return f"nvrtc-{major}.{minor}"


def cuda_include_dirs() -> list[str]:
    """Directories holding cuda_fp16.h / cuda_bf16.h and what they include."""
    candidates: list[str] = []
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    try:
        import cupy

        cuda_path = cupy.cuda.get_cuda_path()
        if cuda_path:
            candidates.append(os.path.join(cuda_path, "include"))
    except Exception:  # noqa: BLE001 - any CuPy failure just means no extra candidate
        pass
    try:  # CUDA headers shipped as wheels (nvidia-cuda-runtime etc.)
        import nvidia.cuda_runtime

        candidates.append(os.path.join(os.path.dirname(nvidia.cuda_runtime.__file__), "include"))
    except Exception:  # noqa: BLE001
        pass
    candidates.append("/usr/local/cuda/include")
    seen: list[str] = []
    for c in candidates:
        if os.path.isfile(os.path.join(c, "cuda_fp16.h")) and c not in seen:
            seen.append(c)
    return seen


ARCH_SPECIFIC = {"sm_90": "sm_90a"}
"""The target each arch is compiled for: sm_90a gives Hopper's wgmma (the stream path's w<size>
variants) to every kernel; its cubins run on compute capability 9.0 only, as sm_90's bundle does."""


def nvrtc_options(arch: str) -> tuple[str, ...]:
    """The options that go into a compile and into its cache key (include dirs do not: they
    locate the same CUDA headers and differ between machines)."""
    return (f"--gpu-architecture={ARCH_SPECIFIC.get(arch, arch)}", "--std=c++17")


def compile_cubin(source: str, name: str, arch: str) -> bytes:
    nvrtc = _nvrtc()
    options = nvrtc_options(arch) + tuple(f"--include-path={d}" for d in cuda_include_dirs())
    prog = nvrtc.createProgram(source, f"{name}.cu", (), ())
    try:
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as err:
            log = nvrtc.getProgramLog(prog)
            raise CompileError(f"NVRTC failed on {name} for {arch}: {err}\n{log}") from None
        return bytes(nvrtc.getCUBIN(prog))
    finally:
        nvrtc.destroyProgram(prog)


def compile_many(sources: dict[str, str], arch: str, workers: int | None = None) -> dict[str, bytes]:
    """uri -> cubin, compiled on worker threads when there is more than one.

    NVRTC runs without the GIL (8 kernels on 8 threads: 0.41 s against 3.95 s one by one, on
    the lent H200's host), so threads compile in parallel; unlike worker processes they never
    re-import the user's __main__, which breaks scripts without an `if __name__` guard.
    """
    if len(sources) <= 1 or workers == 1:
        return {uri: compile_cubin(src, uri, arch) for uri, src in sources.items()}
    n = min(len(sources), workers or os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        futures = {uri: pool.submit(compile_cubin, src, uri, arch) for uri, src in sources.items()}
        return {uri: f.result() for uri, f in futures.items()}


def cache_key(source: str, arch: str, compiler: str) -> str:
    payload = json.dumps(
        {"source": hashlib.sha256(source.encode()).hexdigest(), "options": nvrtc_options(arch), "arch": arch,
         "compiler": compiler},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def write_atomic(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Write `data` to `path` through a temporary file renamed into place.

    The file is created with `mode` filtered by the umask, as open() would create it
    (tempfile.mkstemp would always give 0600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _untrusted(st: os.stat_result) -> str | None:
    """Why a cache directory or entry with this stat may hold someone else's code, or None."""
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"it is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    if st.st_mode & 0o022:
        return f"group or others may write to it (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


ENTRY_MODE = 0o644
"""Cache entries are never group- or other-writable, whatever the umask allows."""


@dataclass(frozen=True)
class KernelCache:
    root: Path

    def entry(self, uri: str, key: str) -> Path:
        return self.root / f"{uri}-{key[:40]}.cubin"

    def open_root(self) -> str | None:
        """Create the directory (0700) if needed; None when it can be trusted, else why not."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.stat(self.root)
        except OSError as err:
            return f"it cannot be created or read ({err.strerror or err})"
        if not stat.S_ISDIR(st.st_mode):
            return "it is not a directory"
        return _untrusted(st)

    def load(self, path: Path) -> bytes | None:
        """The cubin of an entry, or None when it is missing, unreadable, untrusted or corrupt
        (a corrupt one is removed)."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:  # missing, a symlink, unreadable: all a miss
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            why = _untrusted(st)
            if why is not None:
                warnings.warn(CacheWarning(f"compile cache entry {path} is not used: {why}; recompiling"),
                              stacklevel=2)
                return None
            with os.fdopen(fd, "rb") as f:
                fd = -1
                raw = f.read()
        except OSError:
            return None
        finally:
            if fd >= 0:
                os.close(fd)
        digest, cubin = raw[:32], raw[32:]
        if len(raw) <= 32 or hashlib.sha256(cubin).digest() != digest:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass  # it is rewritten below, or stays a miss
            return None
        return cubin

    def store(self, path: Path, cubin: bytes) -> None:
        write_atomic(path, hashlib.sha256(cubin).digest() + cubin, mode=ENTRY_MODE)

    def get_or_compile(self, sources: dict[str, str], arch: str, workers: int | None = None) -> dict[str, bytes]:
        """uri -> cubin for every source; misses are compiled in parallel on worker threads."""
        compiler = compiler_version()
        why_not = self.open_root()
        if why_not is not None:
            warnings.warn(
                CacheWarning(
                    f"compile cache {self.root} is not used: {why_not}; compiling every kernel. Point "
                    f"FERRUM_GEN_CACHE at a directory only you can write to (e.g. `chmod 700 {self.root}`)"
                ),
                stacklevel=2,
            )
            return compile_many(sources, arch, workers)
        paths = {uri: self.entry(uri, cache_key(src, arch, compiler)) for uri, src in sources.items()}
        cubins = {uri: self.load(path) for uri, path in paths.items()}
        missing = [uri for uri, c in cubins.items() if c is None]
        built = compile_many({uri: sources[uri] for uri in missing}, arch, workers)
        failed: list[str] = []
        for uri, cubin in built.items():
            cubins[uri] = cubin
            try:
                self.store(paths[uri], cubin)
            except OSError as err:
                failed.append(f"{paths[uri].name} ({err.strerror or err})")
        if failed:
            warnings.warn(
                CacheWarning(
                    f"compile cache {self.root}: {len(failed)} entr{'y' if len(failed) == 1 else 'ies'} could not be "
                    f"stored, e.g. {failed[0]}; the kernels compiled and are used, but will be compiled again "
                    "next time"
                ),
                stacklevel=2,
            )
        return cubins  # type: ignore[return-value]
