"""The ferrum-gen command line (CPU only)."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum_gen.cli import main
from ferrum_gen.render import bundle_files
from ferrum_gen.spec import QuantType, load_spec, spec_from_dict
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
