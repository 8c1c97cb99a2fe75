"""A new user's first hour on a CPU machine: doctor, cache clear, --version, help, check hints,
--name errors, the missing-CuPy message, and `ferrum-gen demo`."""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from ferrum_gen import __version__, cli, demo, doctor
from ferrum_gen.cli import main
from ferrum_gen.compile import KernelCache, cache_key
from ferrum_gen.settings import get_settings
from ferrum_gen.spec import QuantType, load_spec
from ferrum_gen.testing import write_moe_gguf

HAVE_CUPY = importlib.util.find_spec("cupy") is not None
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("FERRUM_GEN_CACHE", str(root))
    get_settings.cache_clear()
    yield root
    get_settings.cache_clear()


def _entry(root: Path, uri: str = "router_topk_softmax_e8_k2_renorm") -> Path:
    path = KernelCache(root).entry(uri, cache_key("source", "sm_90", "nvrtc-13.0"))
    KernelCache(root).store(path, b"cubin bytes")
    return path


# --- doctor ---------------------------------------------------------------


@pytest.mark.skipif(HAVE_CUPY, reason="CuPy is installed: this is the report of a machine without it")
def test_doctor_on_a_cpu_machine_reports_each_problem_with_its_fix(cache_dir, capsys, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    _entry(cache_dir)
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "BAD CuPy" in out and "fix: install ferrum-gen[cuda12] or [cuda13]" in out
    assert f"{cache_dir}: 1 entries" in out and "writable" in out
    for name in ("tiny", "qwen3moe"):
        assert f"bundle {name}" in out
    assert "tuning tables" in out and "problem(s) found" in out


@pytest.mark.parametrize("driver, runtime, problem", [
    (13000, 13020, False),  # minor version compatibility: the case of the lent H200
    (13000, 13000, False),
    (12080, 13000, True),
    (13000, 12060, False),
])
def test_doctor_flags_a_driver_only_when_its_major_cuda_version_is_older(driver, runtime, problem) -> None:
    finding = doctor.driver_finding(driver, runtime)
    assert bool(finding.fix) is problem
    assert "CUDA" in finding.detail


def test_doctor_flags_a_stale_bundle_and_an_unwritable_cache(tmp_path, cache_dir, monkeypatch) -> None:
    out_root = tmp_path / "generated"
    assert main(["generate", "--spec", "tiny", "--out", str(out_root)]) == 0
    victim = next((out_root / "tiny").glob("*.cu"))
    victim.write_text("// edited\n")
    findings = {f.label: f for f in doctor.run_checks(out_root)}
    assert not findings["bundle tiny"].ok and "ferrum-gen generate --spec tiny" in findings["bundle tiny"].fix
    assert findings["bundle qwen3moe"].ok is False  # not generated into this root at all

    cache_dir.mkdir()
    if os.geteuid() != 0:  # root writes anywhere
        cache_dir.chmod(0o500)
        try:
            cache = {f.label: f for f in doctor.run_checks(out_root)}["kernel cache"]
            assert not cache.ok and "FERRUM_GEN_CACHE" in cache.fix
        finally:
            cache_dir.chmod(0o700)


def test_doctor_reports_a_bad_cache_variable(tmp_path, monkeypatch) -> None:
    file = tmp_path / "a-file"
    file.write_text("x")
    monkeypatch.setenv("FERRUM_GEN_CACHE", str(file))
    cache = {f.label: f for f in doctor.run_checks(tmp_path)}["kernel cache"]
    assert not cache.ok and "FERRUM_GEN_CACHE" in cache.detail


def test_tuning_table_path_uses_the_card_slug(tmp_path) -> None:
    assert doctor.gpu_slug("NVIDIA H200") == "nvidia_h200"
    assert doctor.tuning_table_path(tmp_path / "qwen3moe", "NVIDIA A100-SXM4-80GB") == (
        tmp_path / "qwen3moe" / "tuning" / "nvidia_a100_sxm4_80gb.json")


# --- cache ------------------------------------------------------------------


def test_cache_clear_removes_only_ferrum_gen_entries(cache_dir, capsys) -> None:
    entries = [_entry(cache_dir), _entry(cache_dir, "combine_h512_i256_e8_k2_f32")]
    leftover = cache_dir / (entries[0].name + ".abc123.tmp")
    leftover.write_bytes(b"torn")
    foreign = [cache_dir / "notes.txt", cache_dir / "other-tool.cubin", cache_dir / "sub"]
    foreign[0].write_text("mine")
    foreign[1].write_bytes(b"x")
    foreign[2].mkdir()
    assert all(doctor.CACHE_ENTRY.match(p.name) for p in entries)
    assert main(["cache", "info"]) == 0
    assert "3 entries" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert "removed 3 cache entries" in capsys.readouterr().out
    assert not any(p.exists() for p in entries + [leftover])
    assert all(p.exists() for p in foreign)


def test_cache_clear_on_a_missing_directory_is_fine(cache_dir, capsys) -> None:
    assert main(["cache", "clear"]) == 0
    assert "removed 0 cache entries" in capsys.readouterr().out and not cache_dir.exists()


# --- CLI polish -----------------------------------------------------------------


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"ferrum-gen {__version__}"


def test_every_argument_of_every_command_has_help(monkeypatch) -> None:
    parsers: list[argparse.ArgumentParser] = []
    real_parse = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        main([])
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", real_parse)
    (top,) = parsers
    assert "Mixture-of-Experts" in top.description
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    assert {"generate", "check", "spec-from-gguf", "build", "doctor", "cache", "demo"} <= set(subs.choices)
    for choice in subs._choices_actions:
        assert choice.help, f"command {choice.dest} has no help"
    for name, parser in list(subs.choices.items()) + [("ferrum-gen", top)]:
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{name}: argument {action.dest} has no help"


def test_name_errors_blame_the_flag(tmp_path, capsys) -> None:
    path = tmp_path / "m.gguf"
    write_moe_gguf(path, arch="qwen3moe", hidden_size=512, intermediate_size=256, num_experts=8, top_k=2,
                   quant_by_layer=[(QuantType.Q4_K, QuantType.Q4_K, QuantType.Q6_K)], rng=np.random.default_rng(0))
    assert main(["spec-from-gguf", str(path), "--name", "Qwen-3"]) == 2
    err = capsys.readouterr().err
    assert "--name" in err and "'Qwen-3'" in err and "m.gguf" not in err


def test_spec_from_gguf_names_the_spec_by_shape_and_mix(tmp_path, capsys) -> None:
    import yaml

    path = tmp_path / "m.gguf"
    write_moe_gguf(path, arch="qwen3moe", hidden_size=512, intermediate_size=256, num_experts=8, top_k=2,
                   quant_by_layer=[(QuantType.Q4_K, QuantType.Q4_K, QuantType.Q6_K),
                                   (QuantType.Q4_K, QuantType.Q4_K, QuantType.Q4_K)], rng=np.random.default_rng(0))
    assert main(["spec-from-gguf", str(path), "--layer", "1"]) == 0
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out)["name"] == "qwen3moe_h512_i256_e8_k2_q4_k_q4_k_q4_k"
    assert "--layer" in captured.err and "spec_from_gguf(" not in captured.err


@pytest.mark.parametrize(
    ("argv", "in_repo", "hint", "absent"),
    [
        (["--all"], True, "make generate-all", None),
        (["--all"], False, "ferrum-gen generate --all`", "make"),
        (["--spec", "tiny", "--out", "OUT"], True, "ferrum-gen generate --spec tiny --out OUT", "make"),
        (["--spec", "custom.yaml"], True, "ferrum-gen generate --spec custom.yaml`", "--all"),
    ],
)
def test_check_hints_fit_the_situation(tmp_path, monkeypatch, argv, in_repo, hint, absent) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_in_repository", lambda: in_repo)
    (tmp_path / "OUT").mkdir()
    (tmp_path / "generated").mkdir()
    out = argv[argv.index("--out") + 1] if "--out" in argv else "generated"
    args = argparse.Namespace(all="--all" in argv, spec=argv[1] if argv[0] == "--spec" else None, out=out)
    text = cli._regenerate_hint(args)
    assert hint in text
    if absent:
        assert absent not in text


def test_check_outside_a_checkout_says_the_bundle_root_is_missing(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["check", "--spec", "tiny"]) == 1
    out = capsys.readouterr().out
    assert "generated/tiny: no bundle there" in out and "--out" in out and "make" not in out


# --- without CuPy ------------------------------------------------------------------


@pytest.mark.skipif(HAVE_CUPY, reason="CuPy is installed: the missing-CuPy message cannot be seen here")
def test_bundle_load_without_cupy_says_what_to_install() -> None:
    from ferrum_gen.bundle import KernelBundle
    from ferrum_gen.compile import CupyMissingError

    with pytest.raises(CupyMissingError, match=r"install ferrum-gen\[cuda12\] or \[cuda13\]"):
        KernelBundle.load(load_spec("tiny"))
    with pytest.raises(CupyMissingError, match=r"install ferrum-gen\[cuda12\] or \[cuda13\]"):
        KernelBundle.load(load_spec("tiny"), arch="sm_90")


@pytest.mark.skipif(HAVE_CUPY, reason="CuPy is installed: the missing-CuPy message cannot be seen here")
def test_build_without_cupy_fails_before_writing_anything(tmp_path) -> None:
    from ferrum_gen.bundle import build_bundle
    from ferrum_gen.compile import CupyMissingError

    out = tmp_path / "out"
    with pytest.raises(CupyMissingError) as err:
        build_bundle(load_spec("tiny"), out, "sm_90")
    assert "install ferrum-gen[cuda12] or [cuda13]" in str(err.value) and "ferrum-gen build" not in str(err.value)
    assert not out.exists()


# --- the demo -----------------------------------------------------------------------


def test_demo_without_a_gpu_runs_the_reference_and_says_what_it_skipped(tmp_path, monkeypatch, capsys) -> None:
    # the nvcc part is the compile check tests/test_nvcc.py runs on every spec; here it is skipped for time
    monkeypatch.setattr(demo, "_nvcc", lambda: None)
    assert demo.run_demo(tmp_path, gpu="skip") == 0
    out = capsys.readouterr().out
    assert "SMALL qwen3moe-shaped" in out
    assert "qwen3moe_h512_i256_e8_k2_q4_k_q4_k_q6_k: layers 0, 2" in out
    assert "qwen3moe_h512_i256_e8_k2_q4_k_q4_k_q4_k: layers 1, 3" in out
    assert out.count("float64 reference, T=4") == 4
    assert "skipped: GPU run of every layer and its timings: --gpu skip was given" in out
    assert "skipped: nvcc compile check" in out and out.rstrip().endswith("demo passed")
    assert {p.name for p in (tmp_path / "generated").iterdir()} == {
        "qwen3moe_h512_i256_e8_k2_q4_k_q4_k_q6_k", "qwen3moe_h512_i256_e8_k2_q4_k_q4_k_q4_k"}


def test_demo_requiring_a_gpu_fails_without_one(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(demo, "_gpu_unusable", lambda: "no CUDA GPU is visible to CuPy")
    assert demo.run_demo(tmp_path, gpu="require") == 1
    assert "no GPU run: no CUDA GPU is visible to CuPy" in capsys.readouterr().out
