"""`ferrum-gen bench`: everything that needs no GPU (schema, floors, routings, compare, plot, CLI),
plus one GPU run on the tiny spec that skips without CuPy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from ferrum_gen import bench
from ferrum_gen.cli import main
from ferrum_gen.families import fused_moe
from ferrum_gen.families.grouped import supported as grouped_supported
from ferrum_gen.families.stream import supported as stream_supported
from ferrum_gen.spec import SpecError, load_spec, shipped_spec_names

CARD = bench.Card(copy_bandwidth_gbps=4000.0, matmul_tflops=500.0, matmul_source="hand-made")


def make_case(tokens: int, path: str, routing: str, median_us: float, spec_name: str = "qwen3moe",
              rel_err: float = 3e-3, split: bench.Split | None = None) -> bench.Case:
    spec = load_spec(spec_name)
    distinct = min(tokens * spec.top_k, spec.num_experts)
    nbytes = distinct * bench.expert_bytes(spec)
    flops = bench.layer_flops(spec, tokens)
    fig = bench.figures(median_us, nbytes, flops, CARD)
    return bench.Case(
        tokens=tokens, path=path, routing=routing, resolved_path="prefill" if path == "auto" else path,
        median_us=median_us, p10_us=0.95 * median_us, p90_us=1.1 * median_us, min_us=0.9 * median_us, replays=10,
        distinct_expert_bytes=nbytes, flops=flops, memory_floor_us=fig.memory_floor_us,
        compute_floor_us=fig.compute_floor_us, x_floor=fig.x_floor, gbps=fig.gbps, tflops=fig.tflops, launches=5,
        kernels={"router": bench.KernelInfo(uri="router_x", registers=32, smem_bytes=0)}, split=split,
        accuracy=bench.Accuracy(rel_err=rel_err, tolerance=1e-2, ok=rel_err <= 1e-2, tokens_checked=min(tokens, 32)))


def make_result(medians: dict[tuple[int, str, str], float], device: str = "NVIDIA H200",
                spec_name: str = "qwen3moe", skew: str = bench.SKEW_PER_SET) -> bench.BenchResult:
    spec = load_spec(spec_name)
    env = bench.Environment(date="2026-01-02T03:04:05+00:00", command="ferrum-gen bench", device=device,
                            driver="580.00", cuda_runtime="13.0", cupy="13.6.0", torch="2.9.0", git_commit="abc",
                            clocks=bench.Clocks(sm_mhz=1980, memory_mhz=3201, sm_max_mhz=1980, memory_max_mhz=3201))
    cases = [make_case(T, path, routing, us, spec_name) for (T, path, routing), us in medians.items()]
    tokens = sorted({T for T, _, _ in medians})
    torch_rows = [bench.TorchRow(tokens=T, routing="uniform", median_us=100.0 * T ** 0.5, rel_err=4e-3, ok=True)
                  for T in tokens]
    return bench.BenchResult(
        spec_name=spec.name, spec_hash=spec.spec_hash(), environment=env, card=CARD, rotations=8, seed=0, skew=skew,
        routing_stats=[bench.RoutingStats(tokens=T, routing="uniform", distinct_experts=8.0, max_tokens_per_expert=2,
                                          real_rows=T * spec.top_k, padded_rows=16.0 * T, block_sizes=[16])
                       for T in tokens],
        cases=cases,
        torch=bench.TorchBaseline(available=True, note="eager", implementation="torch._grouped_mm", rows=torch_rows))


BASE = {(1, "auto", "uniform"): 27.7, (1, "decode", "uniform"): 27.5, (8, "prefill", "skewed"): 150.0,
        (4096, "prefill", "uniform"): 4996.0}


# --- compare ---------------------------------------------------------------------------------------

def test_a_case_ten_percent_slower_fails_the_comparison() -> None:
    new = dict(BASE)
    new[(8, "prefill", "skewed")] *= 1.10
    cmp = bench.compare(make_result(BASE), make_result(new))
    assert cmp.regressed
    assert [c.key for c in cmp.slower] == [(8, "prefill", "skewed")]
    assert "SLOWER" in cmp.table()


def test_equal_results_pass_and_faster_cases_do_not_fail() -> None:
    assert not bench.compare(make_result(BASE), make_result(BASE)).regressed
    faster = {k: 0.8 * v for k, v in BASE.items()}
    cmp = bench.compare(make_result(BASE), make_result(faster))
    assert not cmp.regressed and "faster" in cmp.table()


def test_a_case_with_other_inputs_is_named_with_both_floors() -> None:
    """Cases whose routings picked other experts (other distinct bytes) do not compare like with like:
    the comparison names them with both memory floors and both x floor figures."""
    old, new = make_result(BASE), make_result(BASE)
    key = (8, "prefill", "skewed")
    case = new.case_map()[key]
    more = case.distinct_expert_bytes * 1.15
    fig = bench.figures(case.median_us, more, case.flops, CARD)
    new.cases[new.cases.index(case)] = case.model_copy(
        update={"distinct_expert_bytes": more, "memory_floor_us": fig.memory_floor_us, "x_floor": fig.x_floor})
    notes = bench.compare(old, new).notes
    assert len(notes) == 1 and notes[0].startswith("T=8 prefill skewed: other inputs")
    assert f"{case.memory_floor_us:.1f} -> {fig.memory_floor_us:.1f} us" in notes[0]
    assert f"{case.x_floor:.2f} -> {fig.x_floor:.2f}" in notes[0]
    assert not bench.compare(old, make_result(BASE)).notes


def test_the_threshold_decides_what_counts_as_slower() -> None:
    new = {k: 1.03 * v for k, v in BASE.items()}
    assert not bench.compare(make_result(BASE), make_result(new), threshold=0.05).regressed
    assert bench.compare(make_result(BASE), make_result(new), threshold=0.02).regressed
    with pytest.raises(bench.BenchError, match="threshold"):
        bench.compare(make_result(BASE), make_result(new), threshold=-0.1)


def test_missing_cases_are_reported_not_failures() -> None:
    old = dict(BASE)
    new = dict(BASE)
    del new[(4096, "prefill", "uniform")]
    new[(2, "decode", "uniform")] = 30.0
    cmp = bench.compare(make_result(old), make_result(new))
    assert not cmp.regressed
    assert cmp.only_old == [(4096, "prefill", "uniform")]
    assert cmp.only_new == [(2, "decode", "uniform")]
    table = cmp.table()
    assert "only in the old result" in table and "T=4096 prefill uniform" in table
    assert "only in the new result" in table and "T=2 decode uniform" in table


def test_skewed_cases_are_not_compared_with_results_whose_sets_shared_one_popularity_ranking() -> None:
    """Older results gave every input set one ranking, so their popular experts stayed in L2 between forwards:
    their skewed medians are set apart (listed, not judged); the uniform ones still compare."""
    new = dict(BASE)
    new[(8, "prefill", "skewed")] *= 1.10
    new[(1, "auto", "uniform")] *= 1.10
    cmp = bench.compare(make_result(BASE, skew=""), make_result(new))
    assert cmp.other_skew == [(8, "prefill", "skewed")]
    assert [c.key for c in cmp.slower] == [(1, "auto", "uniform")]
    assert all(c.key[2] == "uniform" for c in cmp.changes)
    assert "skewed inputs drawn another way (not compared): T=8 prefill skewed" in cmp.table()
    assert any("skewed cases not compared" in n for n in cmp.notes)
    assert not bench.compare(make_result(BASE), make_result(BASE)).other_skew


def test_each_input_set_of_a_skewed_case_has_its_own_popularity_ranking() -> None:
    """A model's every layer has its own experts, so the sets of one case must not share their popular
    experts: with one ranking for all, those experts' weights were read from L2 by every forward after the first."""
    spec = load_spec("qwen3moe")
    hottest = {int(np.argmax(bench.popularity_bias(spec.num_experts, [0, i]))) for i in range(bench.DEFAULT_ROTATIONS)}
    assert len(hottest) > bench.DEFAULT_ROTATIONS // 2
    for routing in bench.ROUTINGS:
        first, second = (bench.make_logits(spec, 4, np.random.default_rng(5), routing, 0, input_set=i) for i in (0, 1))
        assert np.array_equal(first, second) == (routing == "uniform")


def test_comparing_across_cards_says_so() -> None:
    cmp = bench.compare(make_result(BASE), make_result(BASE, device="NVIDIA H100"))
    assert any("different cards" in n for n in cmp.notes)


# --- the CLI on saved results -------------------------------------------------------------------------

def _save(tmp_path, name: str, medians) -> str:
    path = tmp_path / name
    bench.save_result(make_result(medians), path)
    return str(path)


def test_compare_against_exit_codes(tmp_path, capsys) -> None:
    old = _save(tmp_path, "old.json", BASE)
    same = _save(tmp_path, "same.json", BASE)
    slower = dict(BASE)
    slower[(1, "decode", "uniform")] *= 1.10
    worse = _save(tmp_path, "worse.json", slower)
    assert main(["bench", "--compare", old, "--against", same]) == 0
    assert "no case more than 5% slower" in capsys.readouterr().out
    assert main(["bench", "--compare", old, "--against", worse]) == 1
    assert "1 case(s) more than 5% slower" in capsys.readouterr().out
    assert main(["bench", "--compare", old, "--against", worse, "--threshold", "0.2"]) == 0


def test_compare_refuses_what_it_cannot_read(tmp_path, capsys) -> None:
    old = _save(tmp_path, "old.json", BASE)
    assert main(["bench", "--compare", old, "--against", str(tmp_path / "nope.json")]) == 2
    assert "cannot read bench result" in capsys.readouterr().err
    data = json.loads((tmp_path / "old.json").read_text())
    data["schema_version"] = bench.SCHEMA_VERSION + 1
    (tmp_path / "future.json").write_text(json.dumps(data))
    assert main(["bench", "--compare", old, "--against", str(tmp_path / "future.json")]) == 2
    assert "schema_version" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("{not json")
    assert main(["bench", "--compare", str(tmp_path / "junk.json"), "--against", old]) == 2
    assert "is not JSON" in capsys.readouterr().err


def test_against_needs_compare(tmp_path, capsys) -> None:
    assert main(["bench", "--against", _save(tmp_path, "new.json", BASE)]) == 2
    assert "--compare" in capsys.readouterr().err


def test_bench_help_works(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--spec", "--tokens", "--paths", "--routing", "--rotations", "--json", "--plot", "--compare",
                   "--against", "--threshold", "--no-torch", "--no-split", "--seed", "--set"):
        assert option in out


def test_bench_without_cupy_says_it_needs_a_gpu_and_exits_2(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError, with or without CuPy here
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--spec", "qwen3moe"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU with CuPy" in lines[0]
    assert captured.out == "" and not list(tmp_path.iterdir())


def test_bench_reports_a_bad_override_before_looking_for_a_gpu(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert main(["bench", "--spec", "qwen3moe", "--set", "hidden_size=500"]) == 2
    assert "hidden_size" in capsys.readouterr().err


# --- schema, arithmetic, statistics --------------------------------------------------------------------

def test_json_round_trip_keeps_every_field(tmp_path) -> None:
    split = bench.make_split({"route": 3.0, "gate_up_silu": 15.0, "down_combine": 27.0}, 27.7)
    clocks = bench.LoadClocks(samples=6, sm_mhz_median=1717.5, sm_mhz_min=1365, power_w_max=None, power_capped=0.5)
    result = make_result(BASE).model_copy(update={"cases": [
        make_case(1, "decode", "uniform", 27.7, split=split).model_copy(update={"clocks": clocks}),
        make_case(8, "auto", "skewed", 150.0, rel_err=float("nan"))]})
    path = tmp_path / "r.json"
    bench.save_result(result, path)
    data = json.loads(path.read_text())
    assert data["schema_version"] == bench.SCHEMA_VERSION
    back = bench.load_result(path)
    assert back.model_dump(exclude={"cases"}) == result.model_dump(exclude={"cases"})
    assert back.cases[0] == result.cases[0]
    assert back.cases[0].split.parts_us == {"route": 3.0, "gate_up_silu": 12.0, "down_combine": 12.0}
    # a NaN error (an output that was not written) survives the file and still fails the check
    assert np.isnan(back.cases[1].accuracy.rel_err) and not back.cases[1].accuracy.ok


def test_expert_bytes_and_flops_of_qwen3moe() -> None:
    spec = load_spec("qwen3moe")
    # gate and up: 768 rows of 2048 Q4_K weights (8 blocks of 144 B); down: 2048 rows of 768 Q6_K (3 x 210 B)
    assert bench.expert_bytes(spec) == 2 * 768 * 8 * 144 + 2048 * 3 * 210 == 3_059_712
    assert bench.layer_flops(spec, 1) == 2 * 3 * 8 * 2048 * 768


def test_floors_and_rates_on_a_hand_made_example() -> None:
    card = bench.Card(copy_bandwidth_gbps=4000.0, matmul_tflops=500.0, matmul_source="hand-made")
    # memory-bound: 24.0 MB at 4 TB/s = 6 us; 0.5 GFLOP at 500 TFLOP/s = 1 us; measured 12 us
    fig = bench.figures(12.0, 24e6, 0.5e9, card)
    assert fig.memory_floor_us == pytest.approx(6.0)
    assert fig.compute_floor_us == pytest.approx(1.0)
    assert fig.x_floor == pytest.approx(2.0)
    assert fig.gbps == pytest.approx(2000.0)
    assert fig.tflops == pytest.approx(0.5e9 / 12e-6 / 1e12)
    # compute-bound: 300 GFLOP = 600 us against a 100 us memory floor; measured 900 us
    fig = bench.figures(900.0, 400e6, 300e9, card)
    assert (fig.memory_floor_us, fig.compute_floor_us) == (pytest.approx(100.0), pytest.approx(600.0))
    assert fig.x_floor == pytest.approx(1.5)
    assert fig.tflops == pytest.approx(300e9 / 900e-6 / 1e12)


def test_each_token_count_is_timed_under_every_routing_before_the_next_count() -> None:
    """No light case follows the heaviest one: T = 1 skewed comes right after T = 1 uniform, not after T = 4096."""
    steps = bench.bench_steps(("uniform", "skewed"), (1, 8, 4096))
    assert steps == [("uniform", 1), ("skewed", 1), ("uniform", 8), ("skewed", 8), ("uniform", 4096),
                     ("skewed", 4096)]


def test_timing_summary() -> None:
    s = bench.timing_summary(np.arange(1.0, 12.0))  # 1..11
    assert (s["median_us"], s["p10_us"], s["p90_us"], s["min_us"]) == (6.0, 2.0, 10.0, 1.0)


def test_split_adds_parts_and_flags_a_mismatch() -> None:
    ok = bench.make_split({"route": 4.0, "align": 10.0, "gemm": 100.0}, 104.0)
    assert ok.parts_us == {"route": 4.0, "align": 6.0, "gemm": 90.0}
    assert ok.sum_us == pytest.approx(100.0) and not ok.flagged
    off = bench.make_split({"route": 4.0, "align": 10.0, "gemm": 100.0}, 125.0)
    assert off.flagged and off.mismatch == pytest.approx(0.2)
    # a cut that timed shorter than the one before it is noise: that part shows 0, not a negative time
    noisy = bench.make_split({"route": 4.0, "align": 3.5, "gemm": 50.0}, 50.0)
    assert noisy.parts_us["align"] == 0.0 and noisy.parts_us["gemm"] == pytest.approx(46.0)


@pytest.mark.parametrize("name", shipped_spec_names())
def test_paths_at_follows_the_default_limits(name: str) -> None:
    spec = load_spec(name)
    grouped = ["grouped"] if grouped_supported(spec) else []
    stream = ["stream"] if stream_supported(spec) else []
    fused_up_to = fused_moe.max_tokens(spec)
    for T in (1, 2, 3):
        fused = ["fused"] if T <= fused_up_to else []
        assert bench.paths_at(T, spec, bench.PATHS) == ["auto", "decode", *grouped, *fused]
    assert bench.paths_at(8, spec, bench.PATHS) == ["auto", "decode", *grouped, "prefill", *stream]
    assert bench.paths_at(64, spec, bench.PATHS) == ["auto", "decode", *grouped, "prefill", *stream]
    assert bench.paths_at(128, spec, bench.PATHS) == ["auto", "prefill", *stream]
    # beyond the grid limit the decode path is never timed, whatever --decode-up-to says
    too_many = bench.DECODE_MAX_PAIRS // spec.top_k + 1
    assert "decode" not in bench.paths_at(too_many, spec, ["decode"], decode_up_to=10**6)
    assert bench.paths_at(too_many - 1, spec, ["decode"], decode_up_to=10**6) == ["decode"]


@pytest.mark.parametrize("name", shipped_spec_names())
def test_skewed_routing_loads_one_expert_more_than_uniform(name: str) -> None:
    spec = load_spec(name)
    T = 256
    stats = {}
    for routing in bench.ROUTINGS:
        rng = np.random.default_rng(1)
        sets = [bench.make_logits(spec, T, rng, routing) for _ in range(4)]
        stats[routing] = bench.routing_stats(spec, sets, routing)
    uni, skew = stats["uniform"], stats["skewed"]
    assert skew.max_tokens_per_expert > uni.max_tokens_per_expert
    assert skew.distinct_experts <= uni.distinct_experts
    for s in (uni, skew):
        assert s.real_rows == T * spec.top_k
        assert s.padded_rows >= s.real_rows
        assert set(s.block_sizes) <= set(spec.prefill.block_sizes) and len(s.block_sizes) == 4


def test_a_case_draws_its_inputs_from_its_own_seed_token_count_and_routing() -> None:
    """A case's routing does not depend on the other token counts of the run (--compare of runs with
    different --tokens compares the same inputs): one stream per (seed, T, routing)."""
    spec = load_spec("qwen3moe")

    def logits(seed, T, routing):
        return bench.make_logits(spec, T, bench.case_rng(seed, T, routing), routing, skew_seed=seed)

    first = logits(0, 8, "skewed")
    for T in (5, 12):  # other cases drawn in between
        logits(0, T, "skewed")
    np.testing.assert_array_equal(logits(0, 8, "skewed"), first)
    for other in ((1, 8, "skewed"), (0, 8, "uniform")):
        assert not np.array_equal(logits(*other), first)
    assert not np.array_equal(logits(0, 9, "skewed")[:8], first)


def test_routing_stats_match_a_hand_made_routing() -> None:
    spec = load_spec("tiny")
    E, k = spec.num_experts, spec.top_k
    logits = np.full((3, E), -5.0, dtype=np.float32)
    logits[:, :k] = 5.0  # every token picks experts 0..k-1
    s = bench.routing_stats(spec, [logits], "uniform", block_size_override=min(spec.prefill.block_sizes))
    bs = min(spec.prefill.block_sizes)
    assert (s.distinct_experts, s.max_tokens_per_expert, s.real_rows) == (k, 3, 3 * k)
    assert s.padded_rows == k * bs and s.block_sizes == [bs]


def test_skew_is_a_fixed_zipf_permutation() -> None:
    a, b = bench.popularity_bias(128, seed=3), bench.popularity_bias(128, seed=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.sort(a)[::-1], -bench.ZIPF_EXPONENT * np.log(np.arange(1, 129)), rtol=1e-6)
    assert not np.array_equal(a, bench.popularity_bias(128, seed=4))
    with pytest.raises(bench.BenchError, match="routing"):
        bench.make_logits(load_spec("tiny"), 4, np.random.default_rng(0), "zipf")


def test_set_overrides_a_spec_key_and_names_a_bad_one() -> None:
    spec = load_spec("qwen3moe")
    changed = bench.apply_overrides(spec, ["decode_max_tokens=32"])
    assert changed.decode_max_tokens == 32 and changed.spec_hash() != spec.spec_hash()
    assert bench.apply_overrides(spec, []) is spec
    with pytest.raises(bench.BenchError, match="KEY=VALUE"):
        bench.apply_overrides(spec, ["decode_max_tokens"])
    with pytest.raises(bench.BenchError, match="not a section"):
        bench.apply_overrides(spec, ["nosuch.key=1"])
    with pytest.raises(SpecError):
        bench.apply_overrides(spec, ["hidden_size=500"])


# --- report and plot -----------------------------------------------------------------------------------

def test_report_ends_with_the_short_table_and_marks_failures() -> None:
    split = bench.make_split({"route": 3.0, "gate_up_silu": 15.0, "down_combine": 20.0}, 27.7)
    result = make_result(BASE).model_copy(update={"cases": [make_case(1, "decode", "uniform", 27.7, split=split),
                                                            make_case(8, "auto", "skewed", 150.0, rel_err=0.5)]})
    report = bench.full_report(result)
    last = report.split("\n\n")[-1].splitlines()
    assert "median" in last[1] and len(last) == 2 + len(result.cases)
    assert "!" in last[-1]  # the failed accuracy check
    assert "DIFFERS BY 28%" in report  # 20 us of parts against 27.7 us whole


def test_report_says_whether_the_grouped_path_ran_with_dependent_launches(tmp_path) -> None:
    plain = make_result(BASE)
    assert "dependent launch" not in bench.full_report(plain)  # an older result: not recorded
    off = plain.model_copy(update={"dependent_launch": "FERRUM_MOE_PDL=0"})
    assert "programmatic dependent launch (grouped and stream paths): FERRUM_MOE_PDL=0" in bench.full_report(off)
    bench.save_result(off, tmp_path / "r.json")
    assert bench.load_result(tmp_path / "r.json").dependent_launch == "FERRUM_MOE_PDL=0"


def test_plot_writes_a_png_from_a_saved_json(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is in the dev extra")
    saved = _save(tmp_path, "r.json", BASE)
    png = tmp_path / "bench.png"
    assert main(["bench", "--from-json", saved, "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "median" in capsys.readouterr().out


# --- the clocks under load -------------------------------------------------------------------------

def test_clock_samples_give_the_median_clock_the_peak_power_and_the_power_capped_share() -> None:
    lines = ["1980, 650.20, 0x0000000000000000", "1710, 699.80, 0x0000000000000004", "1365, 702.10, 0x0000000000000004",
             "1725, [N/A], 0x0000000000000004", "[N/A], 600.0, 0x0", "17"]  # no draw; no clock; a cut last line
    clocks = bench.parse_clock_samples(lines)
    assert clocks == bench.LoadClocks(samples=4, sm_mhz_median=1717.5, sm_mhz_min=1365, power_w_max=702.1,
                                      power_capped=0.75)
    assert bench.parse_clock_samples(["garbage", ""]) is None


def test_the_sampler_keeps_what_nvidia_smi_read_while_its_block_ran(tmp_path, monkeypatch) -> None:
    # a stand-in for nvidia-smi: its first query answers an idle card, every later one a power-capped card
    tool, first = tmp_path / "nvidia-smi", tmp_path / "answered"
    tool.write_text(f"#!/bin/sh\nif [ -e {first} ]; then echo '1650, 701.0, 0x0000000000000004'; "
                    f"else touch {first}; echo '1980, 400.0, 0x0000000000000000'; fi\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with bench.ClockSampler("0") as sampler:
        time.sleep(0.5)
    # the sample from before the block is left out
    assert sampler.result is not None and sampler.result.samples >= 2
    got = sampler.result
    assert (got.sm_mhz_median, got.power_capped, got.power_w_max) == (1650.0, 1.0, 701.0)


def test_the_clock_samples_name_the_card_by_its_uuid(tmp_path, monkeypatch) -> None:
    """nvidia-smi numbers the cards its own way: with CUDA_VISIBLE_DEVICES=1, CUDA's card 0 is nvidia-smi's 1. So the
    card is named by its UUID, which both share, and by the CUDA index only where no UUID is known."""
    uuid = bytes(range(16))
    assert bench.card_id(uuid, 0) == "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert bench.card_id(None, 3) == "3" and bench.card_id(b"", 1) == "1"
    tool, asked = tmp_path / "nvidia-smi", tmp_path / "asked"
    tool.write_text(f"#!/bin/sh\necho \"$@\" >> {asked}\necho '1700, 650.0, 0x0'\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with bench.ClockSampler(bench.card_id(uuid, 0)):
        time.sleep(0.2)
    assert all(line.endswith("-i GPU-00010203-0405-0607-0809-0a0b0c0d0e0f") for line in asked.read_text().splitlines())


def test_the_sampler_gives_nothing_without_nvidia_smi(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with bench.ClockSampler("0") as sampler:
        pass
    assert sampler.result is None


def test_the_table_shows_each_cases_clock_and_compare_names_a_fallen_clock() -> None:
    capped = bench.LoadClocks(samples=8, sm_mhz_median=1650.0, sm_mhz_min=1365, power_w_max=703.0, power_capped=1.0)
    free = bench.LoadClocks(samples=8, sm_mhz_median=1980.0, sm_mhz_min=1965, power_w_max=610.0, power_capped=0.0)
    key = (4096, "prefill", "uniform")
    old = make_result(BASE)
    old = old.model_copy(update={"cases": [c.model_copy(update={"clocks": free}) if c.key == key else c
                                           for c in old.cases]})
    new = make_result({**BASE, key: 4996.0 * 1.1})
    new = new.model_copy(update={"cases": [c.model_copy(update={"clocks": capped}) if c.key == key else c
                                           for c in new.cases]})
    table = bench.summary_table(new)
    assert "SM MHz" in table and " 1650*" in table and "power cap" in table
    plain = bench.summary_table(make_result(BASE))  # no clocks recorded (no --clocks): no column, no legend
    assert "SM MHz" not in plain and "power cap" not in plain
    comparison = bench.compare(old, new)
    assert comparison.regressed
    assert any("T=4096 prefill uniform: the SM clock fell from 1980 to 1650 MHz" in n for n in comparison.notes)
    # a slower case at the same clock, or a faster one at a lower clock, gets no such note
    assert not any("SM clock" in n for n in bench.compare(new, new).notes)
    assert not any("SM clock" in n for n in bench.compare(new, old).notes)


def test_peers_are_recorded_for_the_issue_token_counts() -> None:
    for name, points in bench.PEERS_US.items():
        assert sorted(points) == [1, 8, 64, 512, 4096], name
    assert "H200" in bench.PEERS_SOURCE and bench.PEERS_SPEC in shipped_spec_names()


# --- one short run on the GPU ------------------------------------------------------------------------------

@pytest.mark.gpu
def test_bench_runs_on_the_gpu_for_the_tiny_spec(tmp_path) -> None:
    why = bench.gpu_unavailable_reason()
    if why is not None:
        pytest.skip(f"GPU run skipped: {why}")
    spec = load_spec("tiny")
    options = bench.BenchOptions(tokens=(1, 8, 64), rotations=2, command="test")  # clocks sampled by default
    result = bench.run_bench(spec, options)
    if shutil.which("nvidia-smi"):
        # this card's clocks, asked for by its UUID; the tiny spec's cases replay too briefly for a sample of their own
        assert result.environment.clocks is not None
        with bench.ClockSampler(bench._current_card_id()) as sampler:
            time.sleep(0.5)
        assert sampler.result is not None and sampler.result.samples > 0 and sampler.result.sm_mhz_median > 0
    keys = {c.key for c in result.cases}
    assert keys == {(T, p, r) for r in bench.ROUTINGS for T in (1, 8, 64) for p in bench.paths_at(T, spec, bench.PATHS)}
    for c in result.cases:
        assert c.accuracy.ok, (c.key, c.accuracy)
        assert 0 < c.min_us <= c.median_us and c.launches > 0 and c.kernels
        timed_at_t = {p for T, p, r in keys if T == c.tokens}
        assert (c.split is None) == (c.path == "auto" and c.resolved_path in timed_at_t)
        if c.split is not None:
            assert list(c.split.parts_us) == list(c.split.cumulative_us)
    assert result.card.copy_bandwidth_gbps > 0 and result.card.matmul_tflops > 0
    path = tmp_path / "r.json"
    bench.save_result(result, path)
    assert not bench.compare(bench.load_result(path), result).regressed


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_result_names_its_commit_and_whether_the_tree_differed_from_it(tmp_path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    assert bench.git_commit(tmp_path) is None  # not a checkout
    git("init", "-q")
    (tmp_path / "kernel.cu").write_text("a\n")
    git("add", "kernel.cu")
    git("commit", "-q", "-m", "one")
    clean = bench.git_commit(tmp_path)
    assert clean is not None and len(clean) == 12 and not clean.endswith("-dirty")
    (tmp_path / "notes.txt").write_text("untracked files do not count\n")
    assert bench.git_commit(tmp_path) == clean
    (tmp_path / "kernel.cu").write_text("b\n")
    assert bench.git_commit(tmp_path) == clean + "-dirty"
