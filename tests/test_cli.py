"""The ferrum-gen command line (CPU only)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from ferrum_gen.cli import main
from ferrum_gen.render import bundle_files
from ferrum_gen.spec import QuantType, load_spec, spec_from_dict
from ferrum_gen.tuning import PATHS
from ferrum_gen.testing import write_moe_gguf

import yaml


def test_generate_writes_the_bundle_and_check_agrees(tmp_path, capsys) -> None:
    assert main(["generate", "--spec", "tiny", "--out", str(tmp_path)]) == 0
    assert "tiny:" in capsys.readouterr().out
    files = bundle_files(load_spec("tiny"))
    assert {p.name for p in (tmp_path / "tiny").iterdir()} == set(files)
    assert main(["check", "--spec", "tiny", "--out", str(tmp_path)]) == 0


def test_check_reports_a_hand_edited_file(tmp_path, capsys) -> None:
    main(["generate", "--spec", "tiny", "--out", str(tmp_path)])
    victim = next((tmp_path / "tiny").glob("router_*.cu"))
    victim.write_text(victim.read_text() + "// edited\n")
    assert main(["check", "--spec", "tiny", "--out", str(tmp_path)]) == 1
    assert "differs from the generator's output" in capsys.readouterr().out


def test_generate_accepts_a_spec_file_path(tmp_path) -> None:
    spec_file = tmp_path / "mine.yaml"
    data = load_spec("tiny").model_dump(mode="json")
    data["name"] = "mine"
    spec_file.write_text(yaml.safe_dump(data))
    assert main(["generate", "--spec", str(spec_file), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "mine" / "manifest.json").is_file()


def test_a_bad_spec_is_an_error_message_not_a_traceback(tmp_path, capsys) -> None:
    spec_file = tmp_path / "bad.yaml"
    data = load_spec("tiny").model_dump(mode="json")
    data["hidden_size"] = 500
    spec_file.write_text(yaml.safe_dump(data))
    assert main(["generate", "--spec", str(spec_file), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "hidden_size" in err and "multiple of 256" in err


def test_spec_from_gguf_prints_a_loadable_spec(tmp_path, capsys) -> None:
    path = tmp_path / "m.gguf"
    write_moe_gguf(path, arch="qwen3moe", hidden_size=512, intermediate_size=256, num_experts=8, top_k=2,
                   quant_by_layer=[(QuantType.Q4_K, QuantType.Q4_K, QuantType.Q6_K)] * 2,
                   rng=np.random.default_rng(0))
    assert main(["spec-from-gguf", str(path), "--name", "small"]) == 0
    spec = spec_from_dict(yaml.safe_load(capsys.readouterr().out))
    assert (spec.name, spec.hidden_size, spec.intermediate_size, spec.num_experts, spec.top_k) == ("small", 512, 256, 8, 2)
    assert spec.quant.down is QuantType.Q6_K and spec.norm_topk_prob


def test_spec_from_gguf_notes_mixed_quant_layers(tmp_path, capsys) -> None:
    path = tmp_path / "mixed.gguf"
    write_moe_gguf(path, arch="qwen3moe", hidden_size=512, intermediate_size=256, num_experts=8, top_k=2,
                   quant_by_layer=[(QuantType.Q4_K, QuantType.Q4_K, QuantType.Q6_K),
                                   (QuantType.Q4_K, QuantType.Q4_K, QuantType.Q4_K)],
                   rng=np.random.default_rng(0))
    assert main(["spec-from-gguf", str(path), "--layer", "1"]) == 0
    captured = capsys.readouterr()
    assert spec_from_dict(yaml.safe_load(captured.out)).quant.down is QuantType.Q4_K
    assert "quant types by layer" in captured.err


def test_spec_from_gguf_on_a_missing_file_fails_cleanly(tmp_path, capsys) -> None:
    assert main(["spec-from-gguf", str(tmp_path / "nope.gguf")]) == 2
    assert "nope.gguf" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["generate"], ["generate", "--spec", "tiny", "--all"], ["frobnicate"]])
def test_bad_arguments_exit_with_usage(argv) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


# --- generate never destroys what it did not write; every failure is one line, exit 2 -----------

from pathlib import Path

from ferrum_gen import compile as fcompile
from ferrum_gen import render as frender


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for a directory): what 'nothing changed' compares."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("ferrum-gen: error: ") and err.count("\n") == 1, err
    return err


def _spec_file(tmp_path: Path, name: str, **changes) -> Path:
    data = {**load_spec("tiny").model_dump(mode="json"), "name": name, **changes}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_generate_refuses_a_directory_of_someone_elses_files(tmp_path, capsys) -> None:
    proj = tmp_path / "proj"
    (proj / "kernels").mkdir(parents=True)
    (proj / "kernels" / "my_attention.cu").write_text("__global__ void mine() {}\n")
    before = _snapshot(proj)
    spec = _spec_file(tmp_path, "kernels")
    for extra in ([], ["--force"]):  # --force replaces another spec's bundle, never unlisted files
        assert main(["generate", "--spec", str(spec), "--out", str(proj), *extra]) == 2
        err = _one_line_error(capsys)
        assert str(proj / "kernels") in err and "my_attention.cu" in err and "another --out" in err
        assert _snapshot(proj) == before


def test_generate_into_an_empty_directory_is_fine(tmp_path) -> None:
    (tmp_path / "kernels").mkdir()
    assert main(["generate", "--spec", str(_spec_file(tmp_path, "kernels")), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "kernels" / frender.MANIFEST).is_file()


def test_generate_refuses_another_specs_bundle_unless_forced(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["generate", "--spec", "tiny", "--out", str(out)]) == 0
    before = _snapshot(out)
    mine = _spec_file(tmp_path, "tiny", model="my own tiny", decode_max_tokens=8)
    capsys.readouterr()
    assert main(["generate", "--spec", str(mine), "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert str(out / "tiny") in err and "holds the bundle of spec 'tiny'" in err and "--force" in err
    assert _snapshot(out) == before
    assert main(["generate", "--spec", str(mine), "--out", str(out), "--force"]) == 0
    manifest = yaml.safe_load((out / "tiny" / frender.MANIFEST).read_text())
    assert manifest["spec"]["model"] == "my own tiny"


def test_generate_all_checks_every_directory_before_writing_any(tmp_path, capsys) -> None:
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "keep.txt").write_text("mine")
    before = _snapshot(tmp_path)
    assert main(["generate", "--all", "--out", str(tmp_path)]) == 2
    _one_line_error(capsys)
    assert _snapshot(tmp_path) == before


def test_out_pointing_at_a_file_is_one_line(tmp_path, capsys) -> None:
    target = tmp_path / "a_file"
    target.write_text("x")
    for argv in (["generate", "--spec", "tiny"], ["build", "--spec", "tiny", "--arch", "sm_90"]):
        assert main([*argv, "--out", str(target)]) == 2
        assert "is not a directory" in _one_line_error(capsys)
    assert _snapshot(tmp_path) == {"a_file": b"x"}


def test_an_unwritable_directory_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    def denied(path, data, mode=0o666):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(frender, "write_atomic", denied)
    assert main(["generate", "--spec", "tiny", "--out", str(tmp_path)]) == 2
    assert "Permission denied" in _one_line_error(capsys)
    assert _snapshot(tmp_path) == {}


def test_build_without_nvrtc_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch) -> None:
    def no_nvrtc():
        raise fcompile.CompileError("compiling kernels needs CuPy with NVRTC (pip install 'ferrum-gen[gpu]')")

    monkeypatch.setattr(fcompile, "_nvrtc", no_nvrtc)
    assert main(["build", "--spec", "tiny", "--arch", "sm_90", "--out", str(tmp_path)]) == 2
    assert "NVRTC" in _one_line_error(capsys)
    assert _snapshot(tmp_path) == {}


@pytest.mark.parametrize("command, args, option", [
    ("bench", ["--tokens", "0"], "--tokens"), ("bench", ["--tokens", "4", "-3"], "--tokens"),
    ("bench", ["--rotations", "0"], "--rotations"), ("bench", ["--threshold", "-0.1"], "--threshold"),
    ("bench", ["--threshold", "nan"], "--threshold"),
    ("tune", ["--buckets", "0", "4"], "--buckets"), ("tune", ["--buckets", "8", "8"], "--buckets"),
    ("tune", ["--budget-s", "-5"], "--budget-s"), ("tune", ["--budget-s", "nan"], "--budget-s"),
    ("tune", ["--rotations", "0"], "--rotations"), ("tune", ["--split-rounds", "-1"], "--split-rounds"),
    ("tune", ["--paths", "stream", "gemm"], "--paths"), ("tune", ["--paths", "stream", "stream"], "--paths"),
])
def test_bench_and_tune_refuse_unusable_options_before_looking_for_a_gpu(monkeypatch, capsys, command, args,
                                                                        option) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError, with or without CuPy here
    assert main([command, "--spec", "qwen3moe", *args]) == 2
    err = capsys.readouterr().err
    assert option in err and "GPU" not in err


def test_tune_passes_its_options_to_the_tuner(monkeypatch, capsys) -> None:
    """--midpoints, --routing and --update reach tune() (stopped there: no GPU is needed)."""
    import types

    from ferrum_gen import tune as tune_module
    from ferrum_gen.tuning import TuningError

    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1)  # the CLI's GPU check passes
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime)))
    seen = {}

    def stop(spec, out, **kwargs):
        seen.update(kwargs)
        raise TuningError("stopped before any GPU work")

    monkeypatch.setattr(tune_module, "tune", stop)
    args = ["tune", "--spec", "qwen3moe", "--buckets", "512", "1024", "--routing", "skewed", "--update"]
    assert main([*args, "--midpoints", "--paths", "stream", "prefill"]) == 2
    assert seen["midpoints"] is True and seen["routings"] == ("skewed",) and seen["update"] is True
    assert seen["buckets"] == (512, 1024) and seen["paths"] == ("stream", "prefill")
    assert "stopped before any GPU work" in capsys.readouterr().err
    assert main(args) == 2
    assert seen["midpoints"] is False and seen["paths"] == PATHS
