"""The compiled-kernel cache (CPU only: the compiler is replaced by a stand-in)."""

from __future__ import annotations

import hashlib
import threading

import pytest

from ferrum_gen import compile as fcompile


@pytest.fixture
def fake_compiler(monkeypatch):
    calls: list[str] = []

    def compile_many(sources, arch, workers=None):
        calls.extend(sources)
        return {uri: f"cubin:{arch}:{hashlib.sha256(src.encode()).hexdigest()}".encode() for uri, src in sources.items()}

    monkeypatch.setattr(fcompile, "compile_many", compile_many)
    monkeypatch.setattr(fcompile, "compiler_version", lambda: "nvrtc-test")
    return calls


def test_second_lookup_hits_the_cache(tmp_path, fake_compiler) -> None:
    cache = fcompile.KernelCache(tmp_path)
    sources = {"k_a": "a", "k_b": "b"}
    first = cache.get_or_compile(sources, "sm_90")
    assert sorted(fake_compiler) == ["k_a", "k_b"]
    assert cache.get_or_compile(sources, "sm_90") == first
    assert sorted(fake_compiler) == ["k_a", "k_b"]  # nothing recompiled


def test_key_covers_source_arch_and_compiler(tmp_path, fake_compiler, monkeypatch) -> None:
    cache = fcompile.KernelCache(tmp_path)
    cache.get_or_compile({"k": "a"}, "sm_90")
    cache.get_or_compile({"k": "a2"}, "sm_90")
    cache.get_or_compile({"k": "a"}, "sm_80")
    monkeypatch.setattr(fcompile, "compiler_version", lambda: "nvrtc-other")
    cache.get_or_compile({"k": "a"}, "sm_90")
    assert len(fake_compiler) == 4
    assert len(list(tmp_path.glob("k-*.cubin"))) == 4


@pytest.mark.parametrize("damage", [lambda raw: raw[:-1], lambda raw: raw[:10], lambda raw: b"",
                                    lambda raw: raw[:40] + bytes([raw[40] ^ 1]) + raw[41:]])
def test_a_corrupt_entry_is_detected_and_rebuilt(tmp_path, fake_compiler, damage) -> None:
    cache = fcompile.KernelCache(tmp_path)
    good = cache.get_or_compile({"k": "src"}, "sm_90")
    (entry,) = tmp_path.glob("k-*.cubin")
    entry.write_bytes(damage(entry.read_bytes()))
    assert cache.get_or_compile({"k": "src"}, "sm_90") == good
    assert fake_compiler == ["k", "k"]
    assert cache.load(entry) == good["k"]


def test_concurrent_writers_never_leave_a_torn_entry(tmp_path) -> None:
    cache = fcompile.KernelCache(tmp_path)
    path = tmp_path / "k-x.cubin"
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    errors: list[BaseException] = []

    def writer(data: bytes) -> None:
        try:
            for _ in range(20):
                cache.store(path, data)
                got = cache.load(path)
                assert got in payloads  # always one whole payload, never a mix
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert not list(tmp_path.glob("*.tmp"))


# --- a cache only its user can write; failures are misses, not errors ---------------------

import contextlib
import os
import stat as pystat
import warnings


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _plant(cache: fcompile.KernelCache, uri: str, source: str, arch: str, payload: bytes) -> "os.PathLike[str]":
    """An entry under the name the victim's lookup will use, with a valid checksum."""
    path = cache.entry(uri, fcompile.cache_key(source, arch, "nvrtc-test"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(hashlib.sha256(payload).digest() + payload)
    return path


def test_the_cache_directory_is_created_private(tmp_path, fake_compiler) -> None:
    root = tmp_path / "fresh" / "cache"
    with _umask(0o022):
        fcompile.KernelCache(root).get_or_compile({"k": "src"}, "sm_90")
    assert pystat.S_IMODE(root.stat().st_mode) == 0o700


def test_a_world_writable_cache_directory_is_not_trusted(tmp_path, fake_compiler) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o777)
    cache = fcompile.KernelCache(root)
    _plant(cache, "k", "src", "sm_90", b"planted cubin")
    with pytest.warns(fcompile.CacheWarning, match=r"not used: group or others may write to it \(mode 0777\)"):
        got = cache.get_or_compile({"k": "src"}, "sm_90")
    assert got["k"].startswith(b"cubin:sm_90:") and fake_compiler == ["k"]


def _foreign_owner(path, monkeypatch) -> None:
    """Make `path` owned by another uid: for real where this process may chown, else as fstat reports it."""
    other = os.getuid() + 4242
    try:
        os.chown(path, other, -1)
        return
    except PermissionError:
        pass
    real_fstat = os.fstat

    def fstat(fd):
        st = real_fstat(fd)
        if os.path.samestat(st, os.stat(path)):
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, other) + tuple(st)[5:10])
        return st

    monkeypatch.setattr(fcompile.os, "fstat", fstat)


@pytest.mark.parametrize("how", ["group-writable", "foreign-owner"])
def test_an_entry_another_user_could_have_written_is_recompiled(tmp_path, fake_compiler, monkeypatch, how) -> None:
    cache = fcompile.KernelCache(tmp_path / "cache")
    cache.open_root()
    planted = _plant(cache, "k", "src", "sm_90", b"planted cubin")
    if how == "group-writable":
        planted.chmod(0o664)
    else:
        _foreign_owner(planted, monkeypatch)
    with pytest.warns(fcompile.CacheWarning, match="is not used"):
        got = cache.get_or_compile({"k": "src"}, "sm_90")
    assert got["k"] != b"planted cubin" and fake_compiler == ["k"]


def test_an_uncreatable_cache_directory_only_warns(tmp_path, fake_compiler) -> None:
    (tmp_path / "a_file").write_text("x")
    cache = fcompile.KernelCache(tmp_path / "a_file" / "cache")
    with pytest.warns(fcompile.CacheWarning, match="cannot be created"):
        got = cache.get_or_compile({"k": "src", "j": "src2"}, "sm_90")
    assert set(got) == {"k", "j"}


def test_an_unwritable_cache_directory_warns_once_and_returns_the_kernels(tmp_path, fake_compiler,
                                                                          monkeypatch) -> None:
    def refuse(path, data, mode=0o666):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(fcompile, "write_atomic", refuse)
    cache = fcompile.KernelCache(tmp_path / "cache")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = cache.get_or_compile({"k": "src", "j": "src2", "i": "src3"}, "sm_90")
    assert set(got) == {"k", "j", "i"}
    messages = [str(w.message) for w in caught if issubclass(w.category, fcompile.CacheWarning)]
    assert len(messages) == 1 and "3 entries could not be stored" in messages[0] and "Permission denied" in messages[0]


def test_an_entry_that_is_a_directory_is_a_miss(tmp_path, fake_compiler) -> None:
    cache = fcompile.KernelCache(tmp_path / "cache")
    cache.open_root()
    cache.entry("k", fcompile.cache_key("src", "sm_90", "nvrtc-test")).mkdir()
    with pytest.warns(fcompile.CacheWarning, match="could not be stored"):
        got = cache.get_or_compile({"k": "src"}, "sm_90")
    assert got["k"].startswith(b"cubin:sm_90:")


def test_an_unreadable_entry_is_a_miss(tmp_path, fake_compiler, monkeypatch) -> None:
    cache = fcompile.KernelCache(tmp_path / "cache")
    good = cache.get_or_compile({"k": "src"}, "sm_90")
    real_open = os.open

    def deny(path, flags, *args):
        if str(path).endswith(".cubin") and not flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(fcompile.os, "open", deny)
    assert cache.get_or_compile({"k": "src"}, "sm_90") == good
    assert fake_compiler == ["k", "k"]


@pytest.mark.parametrize(("umask", "file_mode", "entry_mode"), [(0o022, 0o644, 0o644), (0o002, 0o664, 0o644),
                                                                (0o077, 0o600, 0o600)])
def test_written_files_respect_the_umask(tmp_path, fake_compiler, umask, file_mode, entry_mode) -> None:
    with _umask(umask):
        fcompile.write_atomic(tmp_path / "out" / "file.cu", b"x")
        fcompile.KernelCache(tmp_path / "cache").get_or_compile({"k": "src"}, "sm_90")
    assert pystat.S_IMODE((tmp_path / "out" / "file.cu").stat().st_mode) == file_mode
    (entry,) = (tmp_path / "cache").glob("k-*.cubin")
    assert pystat.S_IMODE(entry.stat().st_mode) == entry_mode
