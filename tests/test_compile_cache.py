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
