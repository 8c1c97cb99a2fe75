"""Runtime configuration from FERRUM_* environment variables, read once and validated.

| variable | meaning | default |
|---|---|---|
| FERRUM_GEN_CACHE | directory of compiled-kernel cache entries; a relative path is made absolute against the working directory when the settings are read (once per process) | $XDG_CACHE_HOME/ferrum-gen (~/.cache/ferrum-gen) |
| FERRUM_MOE_BLOCK_SIZE | prefill block size override; must be one of the spec's prefill.block_sizes | unset: the padding rule picks |
| FERRUM_MOE_HOST_ROUTE | 1: route in numpy on the host and upload the plan (debugging; synchronises) | 0 |
| FERRUM_MOE_PROFILE | 1: time each phase with CUDA events and keep a table (synchronises) | 0 |
| FERRUM_MOE_PDL | 1: launch the grouped path's gate+up and down kernels, and the stream path's align, gate+up, down and combine, as programmatic dependents of the kernel before them (sm_90+, needs cuda-bindings; see ferrum_gen/launch.py); 0: plain launches | 1 |

A malformed value raises SettingsError naming the variable; nothing falls back silently.
Numbers are ASCII digits only (no sign, spaces, '_' or other scripts' digits), flags exactly 0 or 1.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


class SettingsError(ValueError):
    """A FERRUM_* variable holds a value that cannot be used."""


def _flag(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw in ("0", "1"):
        return raw == "1"
    unset = "1 (or unset) to enable or 0 to disable" if default else "1 to enable or 0 (or unset) to disable"
    raise SettingsError(f"{name}={raw!r}: set it to {unset}")


def _block_size(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    # int() would also take ' 32 ', '+32', '3_2' and non-ASCII digits: one strict rule instead.
    if not re.fullmatch(r"[0-9]{1,6}", raw):
        raise SettingsError(
            f"{name}={raw!r}: set it to a block size written in ASCII digits, such as 16, 32 or 64, or unset it"
            + ("; a negative size is not a block size, use a positive multiple of 16" if raw.startswith("-") else "")
        )
    value = int(raw)
    if value <= 0 or value % 16:
        raise SettingsError(f"{name}={raw!r}: a block size is a positive multiple of 16 (16, 32, 64, ...)")
    return value


def _cache_dir(env: Mapping[str, str], name: str) -> Path:
    raw = env.get(name)
    if not raw:
        base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base).absolute() / "ferrum-gen"
    try:
        path = Path(raw).expanduser()
    except RuntimeError:  # ~user of a user that does not exist
        raise SettingsError(f"{name}={raw!r}: {raw.split('/')[0]!r} names no user's home; write the path out") from None
    # Resolved once, here: a later chdir must not move the cache.
    path = path.absolute()
    if path.is_symlink() and not path.exists():
        raise SettingsError(
            f"{name}={raw!r} is a symbolic link to {os.readlink(path)!r}, which does not exist: "
            "create the target directory or point the variable at a directory"
        )
    if path.exists():
        if not path.is_dir():
            raise SettingsError(f"{name}={raw!r} exists and is not a directory: point it at a directory")
        return path
    for parent in path.parents:
        # The directory is created on first use; that needs the nearest existing ancestor to be a
        # directory that can take a new entry. A pseudo-filesystem like /proc has no write bits at
        # all (root's access() would still say yes).
        if parent.is_symlink() and not parent.exists():
            raise SettingsError(
                f"{name}={raw!r}: {str(parent)!r} is a symbolic link to a missing target, so the directory "
                "cannot be created there; point it at a directory"
            )
        if parent.exists():
            if not parent.is_dir():
                raise SettingsError(
                    f"{name}={raw!r}: {str(parent)!r} is a file, so the directory cannot be created "
                    "there; point it at a directory"
                )
            if not (os.access(parent, os.W_OK | os.X_OK) and parent.stat().st_mode & 0o222):
                raise SettingsError(
                    f"{name}={raw!r}: {str(parent)!r} is not writable, so the directory cannot be created "
                    "there; point it at a directory you can write to"
                )
            break
    return path


@dataclass(frozen=True)
class Settings:
    cache_dir: Path
    block_size_override: int | None
    host_route: bool
    profile: bool
    pdl: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        return cls(
            cache_dir=_cache_dir(env, "FERRUM_GEN_CACHE"),
            block_size_override=_block_size(env, "FERRUM_MOE_BLOCK_SIZE"),
            host_route=_flag(env, "FERRUM_MOE_HOST_ROUTE"),
            profile=_flag(env, "FERRUM_MOE_PROFILE"),
            pdl=_flag(env, "FERRUM_MOE_PDL", default=True),
        )

    def check_block_size(self, allowed: tuple[int, ...]) -> None:
        """The override must name a block size whose kernels the bundle has."""
        if self.block_size_override is not None and self.block_size_override not in allowed:
            raise SettingsError(
                f"FERRUM_MOE_BLOCK_SIZE={self.block_size_override}: this bundle has kernels for block "
                f"sizes {list(allowed)} only; pick one of them or unset the variable"
            )


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings.from_env()
