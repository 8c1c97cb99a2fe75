"""Hostile spec files and GGUF files (issue 10): each one a clean, named error, fast and small.

docs/troubleshooting.md lists every input tested here and the error it gets.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml

from ferrum_gen.cli import main
from ferrum_gen.gguf_io import GgufError, open_gguf, spec_from_gguf
from ferrum_gen.spec import MAX_DIM, MAX_SPEC_BYTES, QuantType, SpecError, load_spec, spec_from_dict
from ferrum_gen.testing import write_moe_gguf

REPO = Path(__file__).resolve().parents[1]


def _tiny_text(**replace: str) -> str:
    """tiny.yaml as block YAML, with the given keys' values replaced by raw YAML text."""
    data = load_spec("tiny").model_dump(mode="json")
    lines = []
    for key, value in data.items():
        text = replace.get(key, yaml.safe_dump({key: value}, default_flow_style=True)[1:-2].split(": ", 1)[1])
        lines.append(f"{key}: {text}")
    return "\n".join(lines) + "\n"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_the_helper_writes_a_loadable_spec(tmp_path) -> None:
    assert load_spec(_write(tmp_path, _tiny_text())) == load_spec("tiny")


# --- item 10: a spec is a contract: YAML ints for sizes, YAML bools for flags -------------------


@pytest.mark.parametrize("text", ['"512"', "512.0", "0x200", "0o1000", "8:32", "5_12", "+512", "0512", "5.12e2"])
def test_a_size_must_be_a_plain_yaml_int(tmp_path, text) -> None:
    with pytest.raises(SpecError, match=r"hidden_size.*write a whole number"):
        load_spec(_write(tmp_path, _tiny_text(hidden_size=text)))


@pytest.mark.parametrize("text", ['"true"', "yes", "off", "On", "1", "y"])
def test_a_flag_must_be_true_or_false(tmp_path, text) -> None:
    with pytest.raises(SpecError, match=r"norm_topk_prob.*write true or false"):
        load_spec(_write(tmp_path, _tiny_text(norm_topk_prob=text)))


@pytest.mark.parametrize(("key", "value"), [("hidden_size", "512"), ("top_k", 2.0), ("norm_topk_prob", "off"),
                                            ("norm_topk_prob", 1)])
def test_spec_from_dict_is_as_strict(key, value) -> None:
    data = load_spec("tiny").model_dump(mode="json")
    data[key] = value
    with pytest.raises(SpecError, match=key):
        spec_from_dict(data)


def test_true_false_and_plain_numbers_still_load(tmp_path) -> None:
    spec = load_spec(_write(tmp_path, _tiny_text(norm_topk_prob="false", hidden_size="512")))
    assert spec.norm_topk_prob is False and spec.hidden_size == 512


# --- item 5: alias bombs, huge files, deep nesting ----------------------------------------


def _alias_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]")
    return "\n".join(lines) + f"\nmodel: *a{levels - 1}\n"


def test_an_alias_bomb_is_refused_fast_and_small(tmp_path) -> None:
    path = _write(tmp_path, _alias_bomb())
    assert path.stat().st_size < 700
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(SpecError, match="aliases and anchors are not allowed") as exc:
        load_spec(path)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 2 and peak < 20 * 2**20 and len(str(exc.value)) < 2000


def test_an_alias_in_a_valid_looking_spec_is_refused(tmp_path) -> None:
    text = _tiny_text(hidden_size="&h 512", intermediate_size="*h")
    with pytest.raises(SpecError, match=r"alias \*h"):
        load_spec(_write(tmp_path, text))


def test_messages_quote_bounded_reprs() -> None:
    data = load_spec("tiny").model_dump(mode="json")
    data["model"] = [["x" * 1000] * 1000] * 50
    data["name"] = "N" * 100_000
    data["hidden_sise"] = 1
    with pytest.raises(SpecError) as exc:
        spec_from_dict(data)
    assert len(str(exc.value)) < 3000


def test_a_huge_file_is_refused_before_parsing(tmp_path) -> None:
    path = _write(tmp_path, _tiny_text() + "#" * MAX_SPEC_BYTES + "\n")
    with pytest.raises(SpecError, match=rf"{path}.*larger than 64 KiB"):
        load_spec(path)


@pytest.mark.parametrize("opener", ["[", "{a: "])
def test_deep_nesting_is_a_spec_error_not_a_recursion_error(tmp_path, opener) -> None:
    path = _write(tmp_path, "model: " + opener * 5000 + "\n")
    with pytest.raises(SpecError, match=rf"(?s){path}.*nests deeper than"):
        load_spec(path)


# --- item 6: huge YAML integers name the file ----------------------------------------------


@pytest.mark.parametrize("key", ["hidden_size", "model"])
def test_a_huge_integer_names_the_file(tmp_path, key) -> None:
    path = _write(tmp_path, _tiny_text(**{key: "9" * 5000}))
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    message = str(exc.value)
    assert str(path) in message and "integer of 5000 digits" in message and len(message) < 1000


# --- item 7: sizes the kernels' 32-bit index arithmetic supports --------------------------


def _with(**over):
    data = load_spec("tiny").model_dump(mode="json")
    data.update(over)
    return data


@pytest.mark.parametrize("key", ["hidden_size", "intermediate_size"])
def test_sizes_are_bounded_at_max_dim(key) -> None:
    at_bound = spec_from_dict(_with(**{key: MAX_DIM}))
    assert getattr(at_bound, key) == MAX_DIM
    with pytest.raises(SpecError, match=rf"{key} is {MAX_DIM + 256}: at most {MAX_DIM}"):
        spec_from_dict(_with(**{key: MAX_DIM + 256}))
    with pytest.raises(SpecError, match=rf"{key} is an integer of about 250 digits: at most {MAX_DIM}"):
        spec_from_dict(_with(**{key: 256 * 10**247}))


def test_a_250_digit_size_leaves_nothing_behind(tmp_path, capsys) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(_tiny_text(hidden_size="2" + "0" * 249))
    out = tmp_path / "out"
    assert main(["generate", "--spec", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "integer of 250 digits" in err and "line 3" in err and not out.exists()


def test_a_spec_at_the_bound_renders_in_range_constants() -> None:
    from ferrum_gen.render import render_spec

    spec = spec_from_dict(_with(hidden_size=MAX_DIM, intermediate_size=MAX_DIM))
    sources = {r.kernel.family: r.source for r in render_spec(spec)}
    assert f"constexpr int H = {MAX_DIM};" in sources["gemv_gate_up_silu"]
    q6_row_bytes = MAX_DIM // 256 * 210
    assert q6_row_bytes * MAX_DIM < 2**32  # one expert's bytes fit the u64 offsets with room; rows fit int


# --- issue 6: no import loop -----------------------------------------------------------------


def test_spec_module_does_not_import_the_kernel_families_at_import_time() -> None:
    code = ("import sys, ferrum_gen.spec; "
            "print(sorted(m for m in sys.modules if m.startswith(('ferrum_gen.families', 'ferrum_gen.enumerate'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert out.strip() == "[]"
    source = (REPO / "ferrum_gen" / "spec.py").read_text()
    model = source[source.index("class MoeSpec"):source.index("_EXAMPLES")]
    assert "enumerate" not in model and "families" not in model


# --- GGUF files ---------------------------------------------------------------------------------


def _gguf(path: Path, **kw) -> Path:
    write_moe_gguf(path, arch="qwen3moe", hidden_size=512, intermediate_size=256, num_experts=4, top_k=2,
                   quant_by_layer=[(QuantType.Q4_K, QuantType.Q4_K, QuantType.Q6_K)],
                   rng=np.random.default_rng(0), **kw)
    return path


@pytest.mark.parametrize("layer", ["00", "\u0660", "\uff10", "0 "])
def test_an_expert_tensor_with_a_strange_layer_number_is_named(tmp_path, monkeypatch, layer) -> None:
    import gguf

    real = gguf.GGUFWriter.add_tensor

    def renamed(self, name, *args, **kwargs):
        return real(self, name.replace("blk.0.ffn_", f"blk.{layer}.ffn_"), *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", renamed)
    path = _gguf(tmp_path / "m.gguf")
    monkeypatch.undo()
    with pytest.raises(GgufError) as exc:
        spec_from_gguf(path)
    message = str(exc.value)
    assert f"blk.{layer}.ffn_" in message and "plain decimal number" in message and str(path) in message


def test_invalid_utf8_in_metadata_names_the_file_and_key(tmp_path) -> None:
    path = _gguf(tmp_path / "m.gguf", model_name="ModelNameXYZ")
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"ModelNameXYZ", b"ModelName\xff\xfeZ"))
    with pytest.raises(GgufError) as exc:
        spec_from_gguf(path)
    assert str(path) in str(exc.value) and "'general.name' is not valid UTF-8" in str(exc.value)


def test_a_fifo_is_refused_by_name_without_waiting(tmp_path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    reader = threading.Thread(target=lambda: result.append(pytest.raises(GgufError, open_gguf, fifo).value),
                              daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # release the blocked open() so the test run can go on
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
        pytest.fail("open_gguf waited on a FIFO")
    assert "is not a regular file" in str(result[0]) and str(fifo) in str(result[0])


@pytest.mark.parametrize("cut", [1, 1000, 300_000])
def test_a_truncated_file_is_refused_when_opened(tmp_path, cut) -> None:
    """The reader lays every tensor over the file as it opens it: a short file fails there, before any
    tensor byte is touched (a file truncated later, while mapped, is the SIGBUS the docs warn about)."""
    path = _gguf(tmp_path / "m.gguf")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - cut])
    with pytest.raises(GgufError, match=r"probably truncated"):
        open_gguf(path)


def test_cli_gguf_errors_are_one_line_exit_2(tmp_path, capsys) -> None:
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    assert main(["spec-from-gguf", str(fifo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ferrum-gen: error: ") and "not a regular file" in err and err.count("\n") == 1
