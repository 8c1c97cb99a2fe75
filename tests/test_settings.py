"""FERRUM_* settings: defaults, valid values, and an error naming the variable for every bad one."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferrum_gen.settings import Settings, SettingsError, get_settings

VARIABLES = ("FERRUM_GEN_CACHE", "FERRUM_MOE_BLOCK_SIZE", "FERRUM_MOE_HOST_ROUTE", "FERRUM_MOE_PROFILE",
             "FERRUM_MOE_PDL")


@pytest.fixture
def clean_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """An environment with no FERRUM_* variables and a fresh get_settings cache, restored afterwards."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


# --- defaults and valid values ------------------------------------------------


def test_defaults() -> None:
    s = Settings.from_env({"XDG_CACHE_HOME": "/xdg"})
    assert s == Settings(
        cache_dir=Path("/xdg/ferrum-gen"), block_size_override=None, host_route=False, profile=False, pdl=True
    )


def test_default_cache_without_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Settings.from_env({}).cache_dir == tmp_path / ".cache" / "ferrum-gen"
    assert Settings.from_env({"XDG_CACHE_HOME": ""}).cache_dir == tmp_path / ".cache" / "ferrum-gen"


def test_empty_values_mean_unset() -> None:
    env = {"XDG_CACHE_HOME": "/xdg", **{name: "" for name in VARIABLES}}
    assert Settings.from_env(env) == Settings.from_env({"XDG_CACHE_HOME": "/xdg"})


def test_settings_are_frozen() -> None:
    s = Settings.from_env({"XDG_CACHE_HOME": "/xdg"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.profile = True  # type: ignore[misc]


@pytest.mark.parametrize(
    ("value", "expected"), [("16", 16), ("32", 32), ("64", 64), ("128", 128), ("48", 48)]
)
def test_block_size_valid(value: str, expected: int) -> None:
    assert Settings.from_env({"FERRUM_MOE_BLOCK_SIZE": value}).block_size_override == expected


@pytest.mark.parametrize("name", ["FERRUM_MOE_HOST_ROUTE", "FERRUM_MOE_PROFILE"])
@pytest.mark.parametrize(("value", "expected"), [("1", True), ("0", False), ("", False)])
def test_flags_valid(name: str, value: str, expected: bool) -> None:
    s = Settings.from_env({name: value})
    field = {"FERRUM_MOE_HOST_ROUTE": "host_route", "FERRUM_MOE_PROFILE": "profile"}[name]
    assert getattr(s, field) is expected
    # The other flag is untouched.
    other = ({"host_route", "profile"} - {field}).pop()
    assert getattr(s, other) is False


def test_cache_dir_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    existing = tmp_path / "cache"
    existing.mkdir()
    assert Settings.from_env({"FERRUM_GEN_CACHE": str(existing)}).cache_dir == existing
    # A directory that does not exist yet is fine: it is created on first use.
    fresh = tmp_path / "not" / "yet"
    assert Settings.from_env({"FERRUM_GEN_CACHE": str(fresh)}).cache_dir == fresh
    assert not fresh.exists()  # reading settings creates nothing
    # ~ expands; FERRUM_GEN_CACHE wins over XDG_CACHE_HOME.
    monkeypatch.setenv("HOME", str(tmp_path))
    s = Settings.from_env({"FERRUM_GEN_CACHE": "~/kernels", "XDG_CACHE_HOME": "/xdg"})
    assert s.cache_dir == tmp_path / "kernels"


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("0", False), ("", True)])
def test_programmatic_dependent_launch_is_on_unless_turned_off(value: str, expected: bool) -> None:
    s = Settings.from_env({"FERRUM_MOE_PDL": value})
    assert s.pdl is expected
    assert (s.host_route, s.profile) == (False, False)


def test_all_variables_together(tmp_path: Path) -> None:
    s = Settings.from_env(
        {
            "FERRUM_GEN_CACHE": str(tmp_path),
            "FERRUM_MOE_BLOCK_SIZE": "32",
            "FERRUM_MOE_HOST_ROUTE": "1",
            "FERRUM_MOE_PROFILE": "1",
            "FERRUM_MOE_PDL": "0",
            "FERRUM_SOMETHING_ELSE": "whatever",  # other FERRUM_* variables (the Rust engine's) are ignored
        }
    )
    assert s == Settings(cache_dir=tmp_path, block_size_override=32, host_route=True, profile=True, pdl=False)


# --- invalid values ------------------------------------------------------------


def _a_file(tmp_path: Path) -> str:
    f = tmp_path / "a_file"
    f.write_text("not a directory")
    return str(f)


def _below_a_file(tmp_path: Path) -> str:
    return str(Path(_a_file(tmp_path)) / "cache")


BAD_VALUES = [
    # (variable, value or a function of tmp_path, substrings of the message besides the variable)
    ("FERRUM_MOE_BLOCK_SIZE", "12", ["'12'", "multiple of 16"]),
    ("FERRUM_MOE_BLOCK_SIZE", "abc", ["'abc'", "16, 32 or 64", "unset"]),
    ("FERRUM_MOE_BLOCK_SIZE", "0", ["'0'", "positive multiple of 16"]),
    ("FERRUM_MOE_BLOCK_SIZE", "-16", ["'-16'", "positive multiple of 16"]),
    ("FERRUM_MOE_BLOCK_SIZE", "32.0", ["'32.0'", "16, 32 or 64"]),
    ("FERRUM_MOE_BLOCK_SIZE", "auto", ["'auto'", "unset"]),
    ("FERRUM_MOE_HOST_ROUTE", "yes", ["'yes'", "1 to enable", "0"]),
    ("FERRUM_MOE_HOST_ROUTE", "2", ["'2'", "1 to enable"]),
    ("FERRUM_MOE_HOST_ROUTE", "true", ["'true'", "1 to enable"]),
    ("FERRUM_MOE_PROFILE", "true", ["'true'", "1 to enable", "0"]),
    ("FERRUM_MOE_PROFILE", "on", ["'on'", "1 to enable"]),
    ("FERRUM_MOE_PROFILE", " 1", ["' 1'", "1 to enable"]),
    ("FERRUM_MOE_PDL", "off", ["'off'", "1 (or unset) to enable or 0 to disable"]),
    ("FERRUM_MOE_PDL", "false", ["'false'", "0 to disable"]),
    ("FERRUM_GEN_CACHE", _a_file, ["not a directory", "point it at a directory"]),
    ("FERRUM_GEN_CACHE", _below_a_file, ["is a file", "point it at a directory"]),
]


@pytest.mark.parametrize(
    ("name", "value", "needles"),
    [pytest.param(n, v, ne, id=f"{n}={v if isinstance(v, str) else v.__name__}") for n, v, ne in BAD_VALUES],
)
def test_bad_value_names_the_variable(name: str, value: object, needles: list[str], tmp_path: Path) -> None:
    raw = value if isinstance(value, str) else value(tmp_path)  # type: ignore[operator]
    with pytest.raises(SettingsError) as exc:
        Settings.from_env({name: raw})
    message = str(exc.value)
    assert name in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_settings_error_is_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)


# --- the bundle's block sizes ----------------------------------------------------


def test_check_block_size_accepts_a_size_the_bundle_has() -> None:
    Settings.from_env({"FERRUM_MOE_BLOCK_SIZE": "32"}).check_block_size((16, 32, 64))
    Settings.from_env({}).check_block_size((16, 32, 64))  # no override: nothing to check
    Settings.from_env({}).check_block_size(())


@pytest.mark.parametrize(("value", "allowed"), [("128", (16, 32, 64)), ("64", (16, 32)), ("16", (32,))])
def test_check_block_size_rejects_a_size_the_bundle_lacks(value: str, allowed: tuple[int, ...]) -> None:
    s = Settings.from_env({"FERRUM_MOE_BLOCK_SIZE": value})
    with pytest.raises(SettingsError) as exc:
        s.check_block_size(allowed)
    message = str(exc.value)
    assert f"FERRUM_MOE_BLOCK_SIZE={value}" in message
    assert str(list(allowed)) in message
    assert "unset" in message


# --- read once ------------------------------------------------------------------


def test_get_settings_reads_the_environment(clean_settings: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_settings.setenv("FERRUM_MOE_BLOCK_SIZE", "32")
    clean_settings.setenv("FERRUM_MOE_PROFILE", "1")
    clean_settings.setenv("FERRUM_GEN_CACHE", str(tmp_path / "c"))
    s = get_settings()
    assert s == Settings(cache_dir=tmp_path / "c", block_size_override=32, host_route=False, profile=True)


def test_get_settings_is_read_once(clean_settings: pytest.MonkeyPatch, tmp_path: Path) -> None:
    first = get_settings()
    assert first.block_size_override is None and first.profile is False
    clean_settings.setenv("FERRUM_MOE_BLOCK_SIZE", "64")
    clean_settings.setenv("FERRUM_MOE_PROFILE", "1")
    clean_settings.setenv("FERRUM_MOE_HOST_ROUTE", "1")
    clean_settings.setenv("FERRUM_GEN_CACHE", str(tmp_path / "elsewhere"))
    assert get_settings() is first
    assert get_settings().block_size_override is None
    assert get_settings().profile is False
    # Even a bad value set later goes unread until the cache is cleared...
    clean_settings.setenv("FERRUM_MOE_PROFILE", "true")
    assert get_settings() is first
    # ...and is then reported.
    get_settings.cache_clear()
    with pytest.raises(SettingsError, match="FERRUM_MOE_PROFILE"):
        get_settings()
    clean_settings.setenv("FERRUM_MOE_PROFILE", "1")
    fresh = get_settings()
    assert fresh is not first
    assert fresh.block_size_override == 64 and fresh.profile and fresh.host_route
    assert fresh.cache_dir == tmp_path / "elsewhere"


def test_get_settings_bad_value_is_not_cached(clean_settings: pytest.MonkeyPatch) -> None:
    clean_settings.setenv("FERRUM_MOE_BLOCK_SIZE", "12")
    with pytest.raises(SettingsError, match="FERRUM_MOE_BLOCK_SIZE"):
        get_settings()
    clean_settings.setenv("FERRUM_MOE_BLOCK_SIZE", "16")
    assert get_settings().block_size_override == 16


# --- one strict rule for numbers; cache paths that cannot work ----------------------


@pytest.mark.parametrize("value", [" 32 ", "+32", "3_2", "３２", "٣٢", "32 ", "0x20"])
def test_block_size_is_ascii_digits_only(value: str) -> None:
    with pytest.raises(SettingsError, match="FERRUM_MOE_BLOCK_SIZE") as exc:
        Settings.from_env({"FERRUM_MOE_BLOCK_SIZE": value})
    assert "ASCII digits" in str(exc.value)


@pytest.mark.parametrize("value", ["1 ", "01", "１", "+1"])
def test_flags_are_exactly_0_or_1(value: str) -> None:
    with pytest.raises(SettingsError, match="FERRUM_MOE_PROFILE"):
        Settings.from_env({"FERRUM_MOE_PROFILE": value})


def test_cache_dir_of_an_unknown_user_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"FERRUM_GEN_CACHE='~nosuchuser_ferrum/c'.*names no user"):
        Settings.from_env({"FERRUM_GEN_CACHE": "~nosuchuser_ferrum/c"})


def test_cache_dir_that_is_a_dangling_symlink_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "cache"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(SettingsError, match="symbolic link"):
        Settings.from_env({"FERRUM_GEN_CACHE": str(link)})
    with pytest.raises(SettingsError, match="symbolic link to a missing target"):
        Settings.from_env({"FERRUM_GEN_CACHE": str(link / "below")})


def test_cache_dir_on_a_read_only_pseudo_filesystem_is_refused() -> None:
    if not Path("/proc").is_dir():
        pytest.skip("no /proc on this system")
    with pytest.raises(SettingsError, match="'/proc' is not writable"):
        Settings.from_env({"FERRUM_GEN_CACHE": "/proc/ferrum_gen_cache"})


def test_relative_cache_dir_is_resolved_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings.from_env({"FERRUM_GEN_CACHE": "rel/cache"})
    assert s.cache_dir == tmp_path / "rel" / "cache" and s.cache_dir.is_absolute()
    monkeypatch.chdir("/")
    assert s.cache_dir == tmp_path / "rel" / "cache"


def test_the_test_seed_is_an_integer_or_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """FERRUM_TEST_SEED (tests/conftest.py) replays a GPU test's inputs; a bad value says what to give."""
    import conftest

    monkeypatch.delenv("FERRUM_TEST_SEED", raising=False)
    assert conftest._test_seed() is None
    monkeypatch.setenv("FERRUM_TEST_SEED", " 1234 ")
    assert conftest._test_seed() == 1234
    for bad in ("-1", "0x10", "seed"):
        monkeypatch.setenv("FERRUM_TEST_SEED", bad)
        with pytest.raises(ValueError, match="FERRUM_TEST_SEED=.*non-negative integer"):
            conftest._test_seed()
