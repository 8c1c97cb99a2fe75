"""`ferrum-gen bench`: the MoE layer's speed on the GPU at hand, against that card's own floors.

How a number is taken. For each token count T, path and routing, R forward calls (R = 8 by
default), each on its own random input set (so each reads its own experts and the weights
are not served from L2; under skewed routing each set also ranks the experts' popularity its
own way, SKEW_PER_SET), are captured into one CUDA graph. The graph is replayed a few times
to warm up, then timed replay by replay with CUDA events; each replay gives a per-forward
time (replay time / R), and the median, p10, p90 and min are taken over the replays. The token
counts run in the order given (DEFAULT_TOKENS ascends), each count's routings one after the other.

The floors are measured in the same run: the memory floor is the bytes of the distinct
experts an input set routes to (GGUF bytes of gate, up and down), over the copy bandwidth of
a large device-to-device copy (bytes read + written per second); the compute floor is
2*3*T*k*H*I FLOPs over the dense bf16 matmul rate (torch.matmul on 8192^3; CuPy f16 when
torch is missing). Each is reported on its own; "x floor" is the median over the larger.

Everything that needs no GPU (the result schema, floors arithmetic, routing statistics,
comparison of two results, the plot) lives here too and is tested on the CPU.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import math
import operator
import shlex
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from . import __version__, reference
from .families.fused_moe import max_tokens as fused_max_tokens
from .families.grouped import supported as grouped_supported
from .families.stream import supported as stream_supported
from .quant import dequantize, random_matrix_bytes, row_bytes
from .spec import ActivationDtype, MoeSpec, spec_from_dict

SCHEMA_VERSION = 1
"""Bumped whenever a field of BenchResult changes meaning or is removed; --compare refuses other versions."""

DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
PATHS = ("auto", "decode", "grouped", "fused", "prefill", "stream")
ROUTINGS = ("uniform", "skewed")
DEFAULT_ROTATIONS = 8
DECODE_UP_TO = 64
"""The decode path (one GEMV per token and expert) grows linearly in T: past this it only burns bench time."""
PREFILL_FROM = 8
DECODE_MAX_PAIRS = 65535
"""The runtime refuses the decode path when T*k exceeds the CUDA grid's y limit."""
ZIPF_EXPONENT = 1.1
"""Skewed routing: expert popularity ~ 1/rank^s, close to what trained routers show."""
SKEW_PER_SET = "per set"
"""BenchResult.skew: under skewed routing each input set ranks the experts' popularity its own way, as a
model's every layer has its own experts and no layer finds its popular experts' weights in L2 from the call
before. Results written before it was recorded (skew "") gave every set one ranking, so the popular experts'
weights stayed in L2 from one forward of the graph to the next (qwen3moe T = 2 skewed: 20.4 against 21.7 us):
compare() sets their skewed cases apart."""
ACCURACY_TOKENS = 32
"""The layer is per-token independent, so checking the first tokens of a set checks the configuration."""
LAYER_TOLERANCE = {ActivationDtype.F32: 2e-3, ActivationDtype.F16: 2e-3, ActivationDtype.BF16: 1e-2}
"""||out - ref|| / ||ref|| bounds from the design brief."""
SPLIT_TOLERANCE = 0.10
"""The per-phase parts must add up to within this fraction of the separately timed whole."""
COMPARE_THRESHOLD = 0.05
SAME_INPUTS_TOLERANCE = 0.005
"""compare: a case whose distinct expert bytes differ by more than this between two results had other
inputs (its routing picked other experts), and the comparison says so."""
WARMUP_REPLAYS = 3
MIN_REPLAYS = 10
MAX_REPLAYS = 50
GRAPH_BUDGET_S = 0.3
"""Replays of one graph stop after about this much GPU time (never fewer than MIN_REPLAYS)."""
MATMUL_SIZE = 8192
CLOCK_SAMPLE_MS = 50
"""The pause between two nvidia-smi queries while a case's graph replays (ClockSampler). With a query's own ~20-50
ms, a case that replays for less than ~100 ms (MAX_REPLAYS caps it: on an H200, qwen3moe T <= 256) records no sample."""
SW_POWER_CAP = 0x4
"""The software power cap's bit of nvidia-smi's clocks_throttle_reasons.active (NVML's clock event reasons)."""
POWER_CAPPED_SHARE = 0.5
"""A case ran power-capped when at least this share of its samples had SW_POWER_CAP set (the table's '*')."""
CLOCK_NOTE_DROP = 0.03
"""compare: a slower case whose median SM clock fell by more than this fraction is noted as such."""


class BenchError(ValueError):
    """A bench run or comparison that cannot go ahead; the message says why and what to do."""


# --- the peers' recorded numbers ----------------------------------------------------------

PEERS_SPEC = "qwen3moe"
PEERS_SOURCE = (
    "Recorded on an NVIDIA H200 (copy bandwidth 4.27 TB/s, dense bf16 matmul 686 TFLOP/s) for the "
    "qwen3moe layer (H 2048, I 768, E 128, k 8), routing to output, in microseconds, as filed in the "
    "project's issue 6. llama.cpp: ggml's `test-backend-ops -o MUL_MAT_ID` (CUDA, Q4_K) with n_mats = 128, "
    "n_used = 8, summing m = 1536, k = 2048 (gate+up) and m = 2048, k = 768 (down). vLLM: the Triton "
    "fused_moe kernels in bf16, without CUDA graphs. transformers: Qwen3MoeSparseMoeBlock in bf16 with "
    "its fastest experts implementation."
)
PEERS_US: dict[str, dict[int, float]] = {
    "llama.cpp CUDA Q4_K": {1: 20.3, 8: 83.0, 64: 608.0, 512: 1042.0, 4096: 3546.0},
    "vLLM fused_moe bf16": {1: 121.0, 8: 129.0, 64: 290.0, 512: 317.0, 4096: 757.0},
    "transformers bf16": {1: 235.0, 8: 509.0, 64: 575.0, 512: 670.0, 4096: 1971.0},
}


# --- the result schema ----------------------------------------------------------------------

_FROZEN = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")


class Clocks(BaseModel):
    model_config = _FROZEN
    sm_mhz: int | None = None
    memory_mhz: int | None = None
    sm_max_mhz: int | None = None
    memory_max_mhz: int | None = None


class Environment(BaseModel):
    model_config = _FROZEN
    date: str
    command: str
    device: str
    driver: str | None = None
    cuda_runtime: str | None = None
    cupy: str | None = None
    torch: str | None = None
    ferrum_gen: str = __version__
    git_commit: str | None = None
    clocks: Clocks | None = None


class Card(BaseModel):
    """The card's own ceilings, measured in the same run."""

    model_config = _FROZEN
    copy_bandwidth_gbps: float  # bytes read + written per second / 1e9
    matmul_tflops: float
    matmul_source: str


class RoutingStats(BaseModel):
    """How one routing spreads T tokens over the experts, over the R input sets."""

    model_config = _FROZEN
    tokens: int
    routing: str
    distinct_experts: float  # mean over the sets
    max_tokens_per_expert: int  # the most pairs any expert got, in any set
    real_rows: int  # T*k
    padded_rows: float  # mean over the sets, at the block size the padding rule picks
    block_sizes: list[int]  # the block size picked for each set


class LoadClocks(BaseModel):
    """What nvidia-smi read while a case's graph replayed (ClockSampler). On an H200 the layer at
    T >= 512 holds the board at its 700 W cap, and the SM clock falls from 1980 MHz to ~1700 (1365 at worst):
    the same kernels on x = 0 ran 6.5 % (T = 512) to 14 % (T = 4096) faster at 1980 MHz (docs/perf-notes.md,
    sixty-fifth session), so two runs of one kernel can differ by their clocks alone."""

    model_config = _FROZEN
    samples: int
    sm_mhz_median: float
    sm_mhz_min: int
    power_w_max: float | None = None
    power_capped: float
    """The share of the samples with the software power cap holding the clocks (SW_POWER_CAP)."""


class KernelInfo(BaseModel):
    model_config = _FROZEN
    uri: str
    registers: int | None = None
    smem_bytes: int | None = None


class Split(BaseModel):
    """Graph replay cut after each phase; a part is the growth of the cumulative time."""

    model_config = _FROZEN
    cumulative_us: dict[str, float]
    parts_us: dict[str, float]  # differences of the cumulative medians, negatives (noise) shown as 0
    sum_us: float
    whole_us: float
    mismatch: float  # |sum - whole| / whole
    flagged: bool  # mismatch > SPLIT_TOLERANCE


class Accuracy(BaseModel):
    model_config = _FROZEN
    rel_err: float
    tolerance: float
    ok: bool
    tokens_checked: int


class Case(BaseModel):
    """One (T, path, routing) measurement."""

    model_config = _FROZEN
    tokens: int
    path: str  # as asked: auto or one of the paths
    routing: str
    resolved_path: str  # the path that ran (what "auto" chose)
    median_us: float
    p10_us: float
    p90_us: float
    min_us: float
    replays: int
    distinct_expert_bytes: float
    flops: float
    memory_floor_us: float
    compute_floor_us: float
    x_floor: float
    gbps: float
    tflops: float
    launches: int
    kernels: dict[str, KernelInfo]
    split: Split | None = None
    accuracy: Accuracy
    clocks: LoadClocks | None = None
    """While the timed graph replayed; None where nvidia-smi gave nothing (and in results written before)."""

    @property
    def key(self) -> tuple[int, str, str]:
        return (self.tokens, self.path, self.routing)


class TorchRow(BaseModel):
    model_config = _FROZEN
    tokens: int
    routing: str
    median_us: float
    rel_err: float
    ok: bool


class TorchBaseline(BaseModel):
    model_config = _FROZEN
    available: bool
    note: str  # why it is missing, or how it ran
    implementation: str | None = None
    rows: list[TorchRow] = []


class BenchResult(BaseModel):
    model_config = _FROZEN
    schema_version: int = SCHEMA_VERSION
    spec_name: str
    spec_hash: str
    environment: Environment
    card: Card
    choice: str = ""
    """Where the runtime's kernel choices came from: the card's tuning table or the default rule."""
    dependent_launch: str = ""
    """"on" when the grouped and stream paths launched their kernels as programmatic dependents, else why not
    (MoeLayer.pdl_off_reason); empty in results written before it was recorded."""
    rotations: int
    seed: int
    skew: str = ""
    """SKEW_PER_SET when each input set had its own popularity ranking under skewed routing; "" in results
    written before, whose sets shared one."""
    routing_stats: list[RoutingStats]
    cases: list[Case]
    torch: TorchBaseline

    def case_map(self) -> dict[tuple[int, str, str], Case]:
        return {c.key: c for c in self.cases}


def save_result(result: BenchResult, path: str | Path) -> None:
    Path(path).write_text(result.model_dump_json(indent=2) + "\n")


def load_result(path: str | Path) -> BenchResult:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise BenchError(f"cannot read bench result {path}: {err.strerror or err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise BenchError(f"{path} is not JSON ({err}): give a file written by `ferrum-gen bench --json`") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise BenchError(
            f"{path} has schema_version {version!r}, this ferrum-gen reads {SCHEMA_VERSION}: "
            "re-run the bench with this version to get a comparable file"
        )
    try:
        return BenchResult.model_validate(data)
    except ValidationError as err:
        raise BenchError(f"{path} is not a bench result of schema {SCHEMA_VERSION}:\n{err}") from None


# --- arithmetic that needs no GPU --------------------------------------------------------------

def expert_bytes(spec: MoeSpec) -> int:
    """Bytes of one expert's gate, up and down weights as stored (GGUF blocks)."""
    H, I, q = spec.hidden_size, spec.intermediate_size, spec.quant
    return I * (row_bytes(q.gate, H) + row_bytes(q.up, H)) + H * row_bytes(q.down, I)


def layer_flops(spec: MoeSpec, tokens: int) -> float:
    """Multiply-adds x 2 of gate, up and down over the T*k pairs."""
    return 2.0 * 3 * tokens * spec.top_k * spec.hidden_size * spec.intermediate_size


@dataclass(frozen=True)
class Figures:
    memory_floor_us: float
    compute_floor_us: float
    x_floor: float
    gbps: float
    tflops: float


def figures(median_us: float, distinct_bytes: float, flops: float, card: Card) -> Figures:
    """Floors and achieved rates of one measurement."""
    memory_floor = distinct_bytes / (card.copy_bandwidth_gbps * 1e9) * 1e6
    compute_floor = flops / (card.matmul_tflops * 1e12) * 1e6
    seconds = median_us * 1e-6
    return Figures(
        memory_floor_us=memory_floor,
        compute_floor_us=compute_floor,
        x_floor=median_us / max(memory_floor, compute_floor),
        gbps=distinct_bytes / seconds / 1e9,
        tflops=flops / seconds / 1e12,
    )


def timing_summary(per_forward_us: np.ndarray) -> dict[str, float]:
    t = np.asarray(per_forward_us, dtype=np.float64)
    return {"median_us": float(np.median(t)), "p10_us": float(np.percentile(t, 10)),
            "p90_us": float(np.percentile(t, 90)), "min_us": float(t.min())}


def make_split(cumulative_us: dict[str, float], whole_us: float, tolerance: float = SPLIT_TOLERANCE) -> Split:
    """Parts from the cumulative medians (in phase order), checked against the whole."""
    parts, before = {}, 0.0
    for phase, upto in cumulative_us.items():
        parts[phase] = max(0.0, upto - before)
        before = max(before, upto)
    total = sum(parts.values())
    mismatch = abs(total - whole_us) / whole_us
    return Split(cumulative_us=dict(cumulative_us), parts_us=parts, sum_us=total, whole_us=whole_us,
                 mismatch=mismatch, flagged=mismatch > tolerance)


def paths_at(tokens: int, spec: MoeSpec, paths: Sequence[str], decode_up_to: int = DECODE_UP_TO,
             prefill_from: int = PREFILL_FROM) -> list[str]:
    """The paths timed at T: auto always, decode and grouped up to decode_up_to (decode also within
    the grid limit), fused up to its kernels' largest token count, prefill and stream from
    prefill_from. A spec without grouped, fused or stream kernels skips that path."""
    out = []
    for path in paths:
        if path == "decode" and (tokens > decode_up_to or tokens * spec.top_k > DECODE_MAX_PAIRS):
            continue
        if path == "grouped" and (tokens > decode_up_to or not grouped_supported(spec)):
            continue
        if path == "fused" and tokens > fused_max_tokens(spec):
            continue
        if path in ("prefill", "stream") and tokens < prefill_from:
            continue
        if path == "stream" and not stream_supported(spec):
            continue
        out.append(path)
    return out


def popularity_bias(num_experts: int, seed: int | Sequence[int], exponent: float = ZIPF_EXPONENT) -> np.ndarray:
    """Per-expert logit bias log(1/rank^s), ranks given to the experts by a permutation fixed by seed."""
    ranks = np.random.default_rng(seed).permutation(num_experts) + 1
    return (-exponent * np.log(ranks)).astype(np.float32)


def make_logits(spec: MoeSpec, tokens: int, rng: np.random.Generator, routing: str, skew_seed: int = 0,
                input_set: int = 0) -> np.ndarray:
    """Router logits [T, E] float32: standard normal (uniform routing), plus the popularity bias (skewed) of
    ranking (skew_seed, input_set): each input set of a case has its own (SKEW_PER_SET)."""
    if routing not in ROUTINGS:
        raise BenchError(f"routing {routing!r}: use one of {', '.join(ROUTINGS)}")
    logits = rng.standard_normal((tokens, spec.num_experts), dtype=np.float32)
    if routing == "skewed":
        logits += popularity_bias(spec.num_experts, [skew_seed, input_set])
    return logits


def routing_stats(spec: MoeSpec, logits_sets: Iterable[np.ndarray], routing: str,
                  block_size_override: int | None = None) -> RoutingStats:
    """Distinct experts, the busiest expert and padded rows of the sets, by the runtime's own rules."""
    distinct, busiest, padded, sizes = [], 0, [], []
    tokens = 0
    for logits in logits_sets:
        tokens = logits.shape[0]
        ids, _ = reference.route_f32(logits, spec.top_k, spec.norm_topk_prob)
        counts = reference.expert_counts(ids, spec.num_experts)
        bs = reference.pick_block_size(counts, spec.prefill.block_sizes, spec.prefill.padding_budget,
                                       block_size_override)
        distinct.append(int((counts > 0).sum()))
        busiest = max(busiest, int(counts.max()) if counts.size else 0)
        padded.append(reference.align(ids, spec.num_experts, bs).num_padded)
        sizes.append(bs)
    if not sizes:
        raise BenchError("routing_stats needs at least one input set")
    return RoutingStats(tokens=tokens, routing=routing, distinct_experts=float(np.mean(distinct)),
                        max_tokens_per_expert=busiest, real_rows=tokens * spec.top_k,
                        padded_rows=float(np.mean(padded)), block_sizes=sizes)


def apply_overrides(spec: MoeSpec, items: Sequence[str]) -> MoeSpec:
    """`--set a.b=VALUE` overrides (VALUE read as YAML), validated like a spec file."""
    if not items:
        return spec
    data = spec.model_dump(mode="json")
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BenchError(f"--set {item!r}: write KEY=VALUE, e.g. --set prefill.gate_up_tile_n=64")
        *parents, leaf = key.split(".")
        node = data
        for depth, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                raise BenchError(f"--set {item!r}: {'.'.join(parents[:depth + 1])} is not a section of the spec")
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    return spec_from_dict(data, "--set " + " ".join(items))


# --- comparing two results ------------------------------------------------------------------

@dataclass(frozen=True)
class CaseChange:
    key: tuple[int, str, str]
    old_us: float
    new_us: float

    @property
    def ratio(self) -> float:
        return self.new_us / self.old_us


@dataclass(frozen=True)
class Comparison:
    threshold: float
    changes: list[CaseChange]
    only_old: list[tuple[int, str, str]] = field(default_factory=list)
    only_new: list[tuple[int, str, str]] = field(default_factory=list)
    other_skew: list[tuple[int, str, str]] = field(default_factory=list)
    """Skewed cases of two results whose input sets drew their popularity rankings differently (BenchResult.skew)."""
    notes: list[str] = field(default_factory=list)

    @property
    def slower(self) -> list[CaseChange]:
        return [c for c in self.changes if c.ratio > 1.0 + self.threshold]

    @property
    def regressed(self) -> bool:
        return bool(self.slower)

    def table(self) -> str:
        rows = [f"{'T':>5} {'path':<8} {'routing':<8} {'old us':>10} {'new us':>10} {'change':>8}  status"]
        for c in sorted(self.changes, key=lambda c: c.key):
            T, path, routing = c.key
            status = "SLOWER" if c.ratio > 1.0 + self.threshold else ("faster" if c.ratio < 1.0 - self.threshold else "same")
            rows.append(f"{T:>5} {path:<8} {routing:<8} {c.old_us:>10.1f} {c.new_us:>10.1f} "
                        f"{(c.ratio - 1.0) * 100:>+7.1f}%  {status}")
        for label, keys in (("only in the old result", self.only_old), ("only in the new result", self.only_new),
                            ("skewed inputs drawn another way", self.other_skew)):
            if keys:
                rows.append(f"{label} (not compared): " + ", ".join(f"T={t} {p} {r}" for t, p, r in sorted(keys)))
        rows.extend(f"note: {n}" for n in self.notes)
        verdict = (f"{len(self.slower)} case(s) more than {self.threshold:.0%} slower" if self.regressed
                   else f"no case more than {self.threshold:.0%} slower ({len(self.changes)} compared)")
        rows.append(verdict)
        return "\n".join(rows)


def check_threshold(threshold: float) -> None:
    """Refuse a --compare threshold that is not a finite fraction >= 0 (NaN included): the CLI asks before a
    run of minutes, compare() before it compares."""
    if not 0 <= threshold < math.inf:
        raise BenchError(f"--threshold {threshold}: give the slowdown that fails --compare as a fraction of at "
                         "least 0, e.g. 0.05 for 5 %")


def compare(old: BenchResult, new: BenchResult, threshold: float = COMPARE_THRESHOLD) -> Comparison:
    """Median against median for every (T, path, routing) in both results, with a note for each case
    whose inputs routed to other experts (results saved before inputs were drawn per case, or with
    another seed): there the medians alone do not compare like with like."""
    check_threshold(threshold)
    old_cases, new_cases = old.case_map(), new.case_map()
    other_skew = sorted(k for k in old_cases if k in new_cases and k[2] == "skewed" and old.skew != new.skew)
    compared = [k for k in old_cases if k in new_cases and k not in other_skew]
    changes = [CaseChange(k, old_cases[k].median_us, new_cases[k].median_us) for k in compared]
    notes = []
    if other_skew:
        notes.append(f"skewed inputs: {old.skew or 'one popularity ranking for all sets'} (old) vs "
                     f"{new.skew or 'one popularity ranking for all sets'} (new); skewed cases not compared")
    if old.environment.device != new.environment.device:
        notes.append(f"different cards: {old.environment.device} (old) vs {new.environment.device} (new)")
    if old.spec_hash != new.spec_hash:
        notes.append(f"different specs: {old.spec_name} {old.spec_hash[:12]} (old) vs "
                     f"{new.spec_name} {new.spec_hash[:12]} (new)")
    for k in sorted(compared):
        o, n = old_cases[k], new_cases[k]
        T, path, routing = k
        if (n.median_us > o.median_us * (1.0 + threshold) and o.clocks is not None and n.clocks is not None
                and n.clocks.sm_mhz_median < o.clocks.sm_mhz_median * (1.0 - CLOCK_NOTE_DROP)):
            notes.append(f"T={T} {path} {routing}: the SM clock fell from {o.clocks.sm_mhz_median:.0f} to "
                         f"{n.clocks.sm_mhz_median:.0f} MHz (power-capped {o.clocks.power_capped:.0%} -> "
                         f"{n.clocks.power_capped:.0%} of the samples), so part of the slowdown may be the card's")
        if abs(n.distinct_expert_bytes / o.distinct_expert_bytes - 1.0) > SAME_INPUTS_TOLERANCE:
            notes.append(f"T={T} {path} {routing}: other inputs (memory floor {o.memory_floor_us:.1f} -> "
                         f"{n.memory_floor_us:.1f} us), so compare x floor too: {o.x_floor:.2f} -> {n.x_floor:.2f}")
    return Comparison(threshold=threshold, changes=changes,
                      only_old=sorted(k for k in old_cases if k not in new_cases),
                      only_new=sorted(k for k in new_cases if k not in old_cases), other_skew=other_skew, notes=notes)


# --- tables -------------------------------------------------------------------------------

def _path_label(case: Case) -> str:
    return f"auto>{case.resolved_path[:3]}" if case.path == "auto" else case.path


def summary_table(result: BenchResult) -> str:
    """One row per T/path/routing: timings, floors, rates, launches, accuracy, split check, torch."""
    torch_us = {(r.tokens, r.routing): r.median_us for r in result.torch.rows}
    clocked = any(c.clocks is not None for c in result.cases)  # bench --clocks
    head = (f"{'T':>5} {'path':<9} {'routing':<8} {'median':>8} {'p10':>8} {'p90':>8} {'min':>8} "
            f"{'mem fl':>7} {'cmp fl':>7} {'xfloor':>6} {'GB/s':>6} {'TF/s':>6} {'lnch':>4} "
            f"{'rel err':>8} {'split':>6} {'torch':>8}" + (f" {'SM MHz':>7}" if clocked else ""))
    rows = [f"{result.spec_name} on {result.environment.device}: us per forward; copy "
            f"{result.card.copy_bandwidth_gbps / 1e3:.2f} TB/s, matmul {result.card.matmul_tflops:.0f} TFLOP/s "
            f"({result.card.matmul_source})", head]
    for c in sorted(result.cases, key=lambda c: (c.routing != "uniform", c.routing, c.tokens, PATHS.index(c.path))):
        split = "-" if c.split is None else (f"!{c.split.mismatch:.0%}" if c.split.flagged else "ok")
        err = f"{c.accuracy.rel_err:.1e}" + ("" if c.accuracy.ok else "!")
        t_us = torch_us.get((c.tokens, c.routing))
        rows.append(f"{c.tokens:>5} {_path_label(c):<9} {c.routing:<8} {c.median_us:>8.1f} {c.p10_us:>8.1f} "
                    f"{c.p90_us:>8.1f} {c.min_us:>8.1f} {c.memory_floor_us:>7.1f} {c.compute_floor_us:>7.1f} "
                    f"{c.x_floor:>6.2f} {c.gbps:>6.0f} {c.tflops:>6.1f} {c.launches:>4} {err:>8} {split:>6} "
                    f"{'-' if t_us is None else f'{t_us:.1f}':>8}"
                    + (f" {_clock_label(c.clocks):>7}" if clocked else ""))
    if not result.torch.available:
        rows.append(f"torch baseline: not run ({result.torch.note})")
    if any(c.clocks is not None and c.clocks.power_capped >= POWER_CAPPED_SHARE for c in result.cases):
        rows.append("SM MHz: the median SM clock while the graph replayed; * at the board's power cap "
                    f"in {POWER_CAPPED_SHARE:.0%} of the samples or more")
    return "\n".join(rows)


def _clock_label(clocks: LoadClocks | None) -> str:
    if clocks is None:
        return "-"
    return f"{clocks.sm_mhz_median:.0f}" + ("*" if clocks.power_capped >= POWER_CAPPED_SHARE else "")


def split_table(result: BenchResult) -> str:
    rows = ["per-phase split (graph replay cut after each phase; us per forward)"]
    for c in sorted(result.cases, key=lambda c: (c.routing, c.path, c.tokens)):
        if c.split is None:
            continue
        parts = "  ".join(f"{p} {us:.1f}" for p, us in c.split.parts_us.items())
        flag = f"  DIFFERS BY {c.split.mismatch:.0%}" if c.split.flagged else ""
        rows.append(f"{c.tokens:>5} {c.path:<8} {c.routing:<8} {parts}  | sum {c.split.sum_us:.1f} vs whole "
                    f"{c.split.whole_us:.1f}{flag}")
    return "\n".join(rows)


def routing_table(result: BenchResult) -> str:
    rows = [f"{'T':>5} {'routing':<8} {'experts':>8} {'max tok/exp':>11} {'real rows':>10} {'padded rows':>11} bs"]
    for s in sorted(result.routing_stats, key=lambda s: (s.routing, s.tokens)):
        rows.append(f"{s.tokens:>5} {s.routing:<8} {s.distinct_experts:>8.1f} {s.max_tokens_per_expert:>11} "
                    f"{s.real_rows:>10} {s.padded_rows:>11.1f} {sorted(set(s.block_sizes))}")
    return "\n".join(rows)


def torch_table(result: BenchResult) -> str:
    if not result.torch.available:
        return f"torch baseline: not run ({result.torch.note})"
    rows = [f"torch baseline ({result.torch.implementation}): {result.torch.note}",
            f"{'T':>5} {'routing':<8} {'median us':>10} {'rel err':>8}"]
    for r in sorted(result.torch.rows, key=lambda r: (r.routing, r.tokens)):
        rows.append(f"{r.tokens:>5} {r.routing:<8} {r.median_us:>10.1f} {r.rel_err:>8.1e}{'' if r.ok else '!'}")
    return "\n".join(rows)


def full_report(result: BenchResult) -> str:
    """Everything, with the short summary table last."""
    env = result.environment
    clocks = env.clocks
    head = [f"device {env.device}, driver {env.driver}, CUDA runtime {env.cuda_runtime}, CuPy {env.cupy}, "
            f"torch {env.torch or 'missing'}, ferrum-gen {env.ferrum_gen} ({env.git_commit or 'no git commit'})"]
    if clocks is not None:
        head.append(f"clocks: SM {clocks.sm_mhz} MHz (max {clocks.sm_max_mhz}), memory {clocks.memory_mhz} MHz "
                    f"(max {clocks.memory_max_mhz})")
    if result.dependent_launch:
        head.append(f"programmatic dependent launch (grouped and stream paths): {result.dependent_launch}")
    parts = ["\n".join(head), routing_table(result), torch_table(result)]
    if any(c.split is not None for c in result.cases):
        parts.append(split_table(result))
    parts.append(summary_table(result))
    return "\n\n".join(parts)


# --- the plot -----------------------------------------------------------------------------

def check_plot_support() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'ferrum-gen[bench]' (or write the JSON here and "
                         "plot it elsewhere with `ferrum-gen bench --from-json FILE --plot PNG`)") from None


def plot(result: BenchResult, path: str | Path) -> None:
    """Microseconds against T on log-log axes: each path and routing, the floor, torch and (qwen3moe) the peers."""
    check_plot_support()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    styles = {"uniform": "-", "skewed": "--"}  # the colour says the path, the line style the routing
    colours = {"auto": "tab:blue", "decode": "tab:orange", "grouped": "tab:red", "fused": "tab:brown",
               "prefill": "tab:green", "stream": "tab:purple"}
    for routing in sorted({c.routing for c in result.cases}, key=lambda r: r != "uniform"):
        for which in PATHS:
            cases = sorted((c for c in result.cases if c.routing == routing and c.path == which), key=lambda c: c.tokens)
            if cases:
                ax.plot([c.tokens for c in cases], [c.median_us for c in cases], styles.get(routing, "-"),
                        color=colours[which], marker="o", markersize=4, label=f"ferrum-gen {which} ({routing})")
    floor: dict[int, float] = {}
    for c in result.cases:
        if c.routing == "uniform" or c.tokens not in floor:
            floor[c.tokens] = max(c.memory_floor_us, c.compute_floor_us)
    if floor:
        ts = sorted(floor)
        ax.plot(ts, [floor[t] for t in ts], "k:", linewidth=2, label="floor (max of memory, compute)")
    for routing in sorted({r.routing for r in result.torch.rows}):
        rows = sorted((r for r in result.torch.rows if r.routing == routing), key=lambda r: r.tokens)
        ax.plot([r.tokens for r in rows], [r.median_us for r in rows], styles.get(routing, "-"), color="grey",
                marker="s", label=f"torch bf16 ({result.torch.implementation}, {routing})")
    if result.spec_name == PEERS_SPEC:
        for (name, points), marker, colour in zip(PEERS_US.items(), ("^", "v", "D"),
                                                  ("tab:red", "tab:purple", "tab:brown")):
            ts = sorted(points)
            ax.plot(ts, [points[t] for t in ts], linestyle="none", marker=marker, markersize=8, color=colour,
                    label=f"{name} (recorded, H200)")
    ax.set_xscale("log", base=2)
    ticks = sorted({c.tokens for c in result.cases})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_yscale("log")
    ax.set_xlabel("tokens T")
    ax.set_ylabel("microseconds per forward (median)")
    ax.set_title(f"{result.spec_name} MoE layer on {result.environment.device} ({result.environment.date[:10]})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- GPU: card figures -------------------------------------------------------------------------

def gpu_unavailable_reason() -> str | None:
    """None when CuPy sees a CUDA GPU, else why not (one line)."""
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # noqa: BLE001 - any failure means: no usable GPU here
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None if count else "CuPy sees no CUDA GPU"


def _torch():
    """torch with a usable CUDA device, or None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _event_times_ms(calls: Iterable[Callable[[], Any]], stream: Any = None) -> list[float]:
    """Milliseconds of each call, timed with CuPy events on `stream` (the current stream when None)."""
    import cupy as cp

    pairs = []
    for call in calls:
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        call()
        stop.record(stream)
        pairs.append((start, stop))
    pairs[-1][1].synchronize()
    return [cp.cuda.get_elapsed_time(a, b) for a, b in pairs]


def _torch_event_times_ms(torch: Any, calls: Iterable[Callable[[], Any]]) -> list[float]:
    """Milliseconds of each call, timed with torch CUDA events on torch's current stream."""
    pairs = []
    for call in calls:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        stop.record()
        pairs.append((start, stop))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in pairs]


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy (median of several)."""
    import cupy as cp

    free, _ = cp.cuda.runtime.memGetInfo()
    n = min(2 << 30, free // 8)
    src = cp.empty(n, dtype=cp.uint8)
    dst = cp.empty_like(src)
    dst[...] = src
    seconds = float(np.median(_event_times_ms([functools.partial(operator.setitem, dst, Ellipsis, src)] * 10))) / 1e3
    del src, dst
    return 2 * n / seconds


def matmul_rate(prefer_torch: bool = True) -> float:
    """FLOP/s of a dense 8192^3 matmul: torch bf16, or CuPy f16 (the same tensor-core rate) without torch."""
    torch = _torch() if prefer_torch else None
    n, reps = MATMUL_SIZE, 20
    if torch is not None:
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            torch.matmul(a, b)
        ms = float(np.median(_torch_event_times_ms(torch, [lambda: torch.matmul(a, b)] * reps)))
    else:
        import cupy as cp

        a = cp.random.standard_normal((n, n), dtype=cp.float32).astype(cp.float16)
        b = cp.random.standard_normal((n, n), dtype=cp.float32).astype(cp.float16)
        for _ in range(3):
            cp.matmul(a, b)
        ms = float(np.median(_event_times_ms([lambda: cp.matmul(a, b)] * reps)))
    return 2.0 * n**3 / (ms / 1e3)


def _nvidia_smi_query(query: str, card: str, timeout_s: float = 20) -> list[str] | None:
    """The answer of card `card` (nvidia-smi's -i: an index or a "GPU-..." UUID, card_id) to `nvidia-smi
    --query-gpu=<query>` (csv, no header, no units); None where nvidia-smi is missing or fails."""
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", card],
                              capture_output=True, text=True, timeout=timeout_s, check=True).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None


def card_id(uuid: bytes | None, index: int) -> str:
    """nvidia-smi's name (-i) of the card CuPy runs on: its UUID as nvidia-smi writes it ("GPU-" and 8-4-4-4-12 hex
    digits), which holds where CUDA_VISIBLE_DEVICES renumbers the cards; the CUDA index where no UUID is known."""
    if not uuid or len(uuid) != 16:
        return str(index)
    h = uuid.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _current_card_id() -> str:
    import cupy as cp

    index = cp.cuda.Device().id
    uuid = cp.cuda.runtime.getDeviceProperties(index).get("uuid")
    return card_id(uuid if isinstance(uuid, bytes) else None, index)


def _nvidia_smi_clocks(card: str) -> tuple[Clocks | None, str | None]:
    """(clocks, driver) from nvidia-smi, None where it cannot be read."""
    lines = _nvidia_smi_query("clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,driver_version", card)
    if not lines:
        return None, None
    fields = [f.strip() for f in lines[0].split(",")]

    def mhz(value: str) -> int | None:
        try:
            return int(float(value))
        except ValueError:  # "[N/A]" and the like
            return None

    return Clocks(sm_mhz=mhz(fields[0]), memory_mhz=mhz(fields[1]), sm_max_mhz=mhz(fields[2]),
                  memory_max_mhz=mhz(fields[3])), (fields[4] if len(fields) > 4 else None)


def parse_clock_samples(lines: Iterable[str]) -> LoadClocks | None:
    """LoadClocks from nvidia-smi's "clocks.sm, power.draw, clocks_throttle_reasons.active" lines (csv, no
    header, no units); lines it cannot read (a "[N/A]" clock, a cut last line) are left out, None if none is left."""
    rows = []
    for line in lines:
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3:
            continue
        try:
            sm, reasons = float(fields[0]), int(fields[2], 16)
        except ValueError:
            continue
        try:
            power = float(fields[1])
        except ValueError:  # boards that do not report their draw
            power = None
        rows.append((sm, power, bool(reasons & SW_POWER_CAP)))
    if not rows:
        return None
    clocks = [sm for sm, _, _ in rows]
    powers = [p for _, p, _ in rows if p is not None]
    return LoadClocks(samples=len(rows), sm_mhz_median=float(np.median(clocks)), sm_mhz_min=int(min(clocks)),
                      power_w_max=max(powers) if powers else None,
                      power_capped=sum(capped for _, _, capped in rows) / len(rows))


class ClockSampler:
    """Samples the SM clock, board power and throttle reasons of card `card` (nvidia-smi's -i: card_id) while the
    with-block runs, by one nvidia-smi query after another with CLOCK_SAMPLE_MS between them (each query takes ~20-50
    ms: on an H200, ~15 samples in 1.2 s); `.result` is then parse_clock_samples' reading, None without nvidia-smi.
    The block starts once the first sample is in. One query at a time, rather than `nvidia-smi -lms`, whose output
    through a pipe may sit in its buffer until it exits."""

    QUERY = "clocks.sm,power.draw,clocks_throttle_reasons.active"
    START_TIMEOUT_S = 5.0

    def __init__(self, card: str, period_ms: int = CLOCK_SAMPLE_MS) -> None:
        self.card = card
        self.period_ms = period_ms
        self.result: LoadClocks | None = None
        self._lines: list[str] = []
        self._first = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            lines = _nvidia_smi_query(self.QUERY, self.card, timeout_s=10)
            if lines is None:
                break  # no nvidia-smi, or it cannot read this card: no samples
            self._lines.extend(lines)
            self._first.set()
            self._stop.wait(self.period_ms / 1e3)
        self._first.set()

    def __enter__(self) -> ClockSampler:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._first.wait(self.START_TIMEOUT_S)
        self._lines.clear()  # the sample from before the block
        return self

    def __exit__(self, *exc: object) -> None:
        taken = list(self._lines)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        self.result = parse_clock_samples(taken)


def git_commit(where: Path = Path(__file__).resolve().parent) -> str | None:
    """The checkout's commit, with "-dirty" when tracked files differ from it (a copied tree, an
    uncommitted kernel): a result then names the commit it started from, not what ran."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=where)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short=12", "HEAD")
    if not commit:
        return None
    changes = git("status", "--porcelain", "--untracked-files=no")
    return commit + ("-dirty" if changes else "") if changes is not None else commit


def environment(command: str, card: str) -> Environment:
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])

    def cuda_version(v: int) -> str:
        return f"{v // 1000}.{v % 1000 // 10}"

    clocks, smi_driver = _nvidia_smi_clocks(card)
    torch = _torch()
    return Environment(
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=command,
        device=name,
        driver=smi_driver or f"CUDA driver API {cuda_version(cp.cuda.runtime.driverGetVersion())}",
        cuda_runtime=cuda_version(cp.cuda.runtime.runtimeGetVersion()),
        cupy=cp.__version__,
        torch=None if torch is None else torch.__version__,
        git_commit=git_commit(),
        clocks=clocks,
    )


# --- GPU: the layer, its inputs and its reference ------------------------------------------------

@dataclass
class _Weights:
    """GGUF bytes a bench layer was built from, and (lazily) their exact float32 dequantisation on the GPU."""

    spec: MoeSpec
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray
    dense: tuple[Any, Any, Any] | None = None

    def dense_gpu(self) -> tuple[Any, Any, Any]:
        if self.dense is None:
            import cupy as cp

            E, H, I, q = self.spec.num_experts, self.spec.hidden_size, self.spec.intermediate_size, self.spec.quant
            self.dense = (dequantize(q.gate, cp.asarray(self.gate), (E, I, H), xp=cp),
                          dequantize(q.up, cp.asarray(self.up), (E, I, H), xp=cp),
                          dequantize(q.down, cp.asarray(self.down), (E, H, I), xp=cp))
        return self.dense


_WEIGHTS: "weakref.WeakKeyDictionary[Any, _Weights]" = weakref.WeakKeyDictionary()


def register_weights(layer: Any, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> None:
    """Tell quick_check which GGUF bytes `layer` was built from (build_layer does this itself)."""
    _WEIGHTS[layer] = _Weights(layer.spec, gate, up, down)


def build_layer(spec: MoeSpec, max_tokens: int, seed: int = 0, settings: Any = None, tuning_table: Any = "auto") -> Any:
    """A MoeLayer on random valid blocks (the kernels do the same work on them as on real weights)."""
    from .bundle import KernelBundle
    from .runtime import MoeLayer
    from .settings import Settings

    rng = np.random.default_rng(seed)
    E, H, I, q = spec.num_experts, spec.hidden_size, spec.intermediate_size, spec.quant
    gate = random_matrix_bytes(q.gate, E * I, H, rng).reshape(E, I, -1)
    up = random_matrix_bytes(q.up, E * I, H, rng).reshape(E, I, -1)
    down = random_matrix_bytes(q.down, E * H, I, rng).reshape(E, H, -1)
    layer = MoeLayer(KernelBundle.load(spec), gate, up, down, max_tokens,
                     settings=settings or Settings.from_env({}), tuning_table=tuning_table)
    register_weights(layer, gate, up, down)
    return layer


def to_activation(x32: Any, dtype: ActivationDtype) -> Any:
    """float32 CuPy array -> the spec's activation dtype (bf16: uint16 bits, rounded to nearest even)."""
    import cupy as cp

    if dtype is ActivationDtype.F32:
        return x32.astype(cp.float32)
    if dtype is ActivationDtype.F16:
        return x32.astype(cp.float16)
    bits = x32.astype(cp.float32).view(cp.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(cp.uint16)


def activation_to_f64(x: Any, dtype: ActivationDtype) -> Any:
    import cupy as cp

    if dtype is ActivationDtype.BF16:
        return (x.view(cp.uint16).astype(cp.uint32) << 16).view(cp.float32).astype(cp.float64)
    return x.astype(cp.float64)


def case_rng(seed: int, tokens: int, routing: str) -> np.random.Generator:
    """The random stream of one (T, routing) case's inputs: a function of the seed, T and the routing
    alone, so a case gets the same inputs whichever other token counts a run has, and --compare
    compares like with like (with one stream a run, a run of T = 8, 12 and one of T = 5, 8, 12 drew
    different routings for T = 8: on mixtral 15 % more distinct expert bytes)."""
    return np.random.default_rng([seed, tokens, ROUTINGS.index(routing)])


def make_input_sets(spec: MoeSpec, tokens: int, rng: np.random.Generator, routing: str, count: int,
                    skew_seed: int = 0) -> list[tuple[Any, Any]]:
    """`count` independent (x, logits) pairs on the GPU: x [T,H] in the activation dtype, logits [T,E] float32
    (skewed: each with its own popularity ranking, SKEW_PER_SET)."""
    import cupy as cp

    sets = []
    for i in range(count):
        x32 = cp.asarray(rng.standard_normal((tokens, spec.hidden_size), dtype=np.float32))
        logits = cp.asarray(make_logits(spec, tokens, rng, routing, skew_seed, input_set=i))
        sets.append((to_activation(x32, spec.activation_dtype), logits))
    return sets


def reference_rows(layer: Any, x: Any, logits: Any) -> Any:
    """The float64 layer output [n, H] for these tokens (float64 routing as reference.route, exact weights)."""
    import cupy as cp

    weights = _WEIGHTS.get(layer)
    if weights is None:
        raise BenchError("quick_check needs the layer's GGUF bytes: build it with bench.build_layer or call "
                         "bench.register_weights(layer, gate, up, down)")
    wg, wu, wd = weights.dense_gpu()
    spec = layer.spec
    k = spec.top_k
    ids, w = reference.route(cp.asnumpy(logits), k, spec.norm_topk_prob)
    x64 = activation_to_f64(x, spec.activation_dtype)
    out = cp.zeros((x.shape[0], spec.hidden_size), dtype=cp.float64)
    flat, w_flat = ids.reshape(-1), w.reshape(-1)
    for e in np.unique(flat):
        pairs = np.nonzero(flat == e)[0]
        tok = cp.asarray(pairs // k)  # a token picks an expert at most once: no repeats here
        xe = x64[tok]
        g = xe @ wg[e].astype(cp.float64).T
        u = xe @ wu[e].astype(cp.float64).T
        y = (g / (1.0 + cp.exp(-g)) * u) @ wd[e].astype(cp.float64).T  # silu(g) * u, then down
        out[tok] += cp.asarray(w_flat[pairs])[:, None] * y
    return out


def relative_error(out: Any, ref: Any) -> float:
    """||out - ref|| / ||ref||; NaN anywhere in out gives NaN (a check that fails)."""
    import cupy as cp

    out64 = out.astype(cp.float64)
    return float(cp.linalg.norm(out64 - ref) / cp.linalg.norm(ref))


def poisoned_like(out: Any) -> Any:
    """A new array shaped like `out`, filled with NaN (bf16 NaN bits for uint16): a row a kernel skips stays NaN."""
    import cupy as cp

    return cp.full_like(out, 0x7FC0) if out.dtype == cp.uint16 else cp.full_like(out, np.nan)


def quick_check(layer: Any, x: Any, logits: Any, out: Any, ref: Any = None) -> tuple[float, bool]:
    """(rel err, within the design tolerance) of `out` = layer(x, logits) on its first ACCURACY_TOKENS tokens.

    `ref` may pass reference_rows(...) of those tokens when several outputs share one input.
    """
    n = min(ACCURACY_TOKENS, x.shape[0])
    if ref is None:
        ref = reference_rows(layer, x[:n], logits[:n])
    err = relative_error(activation_to_f64(out[:n], layer.spec.activation_dtype), ref)
    return err, bool(err <= LAYER_TOLERANCE[layer.spec.activation_dtype])


# --- GPU: timing ---------------------------------------------------------------------------------

def bench_steps(routings: Sequence[str], tokens: Sequence[int]) -> list[tuple[str, int]]:
    """The (routing, T) cases in the order they are timed: each token count's routings side by side. A case right
    after a heavy one reads slow for a few hundred ms (mixtral T = 1 right after T = 4096: +4.5-10 %, and as much with
    100 ms of warm-up replays; docs/perf-notes.md, fifty-eighth session); with every count of one routing and then the
    other's, T = 1 skewed had come right after T = 4096 uniform."""
    return [(r, T) for T in tokens for r in routings]


def time_graph(calls: Callable[[], Any], per_call_count: int, stream: Any, replays: int,
               budget_s: float | None = None) -> np.ndarray:
    """Per-forward microseconds of each timed replay of `calls()` captured as one CUDA graph.

    calls() runs once eagerly (warm-up, lazy allocations), is captured on `stream`, replayed
    WARMUP_REPLAYS times, then `replays` times with CUDA events (fewer, but at least
    MIN_REPLAYS, when budget_s of GPU time would be exceeded). Each value is a replay's time / per_call_count.
    """
    with stream:
        calls()
        stream.begin_capture()
        try:
            calls()
        finally:
            graph = stream.end_capture()
        for _ in range(WARMUP_REPLAYS):
            graph.launch(stream)
        if budget_s is not None:
            once_s = _event_times_ms([functools.partial(graph.launch, stream)], stream)[0] / 1e3
            replays = max(min(replays, MIN_REPLAYS), min(replays, int(budget_s / max(once_s, 1e-9))))
        times_ms = _event_times_ms([functools.partial(graph.launch, stream)] * replays, stream)
    return np.asarray(times_ms, dtype=np.float64) * 1e3 / per_call_count


def kernel_infos(layer: Any, tokens: int, path: str) -> dict[str, KernelInfo]:
    """The kernels the runtime picks for T, with registers and shared memory where the bundle has them."""
    bundle = layer.bundle
    infos = {}
    for family, uri in layer.selected_kernels(tokens, path).items():
        kern = bundle.kernels.get(uri)
        regs = smem = None
        if kern is not None:
            regs = getattr(kern.function, "num_regs", None)
            raw = kern.launch.get("smem_bytes")
            smem = raw.get(bundle.arch) if isinstance(raw, dict) else raw
        infos[family] = KernelInfo(uri=uri, registers=regs, smem_bytes=smem)
    return infos


# --- GPU: the torch bf16 baseline -------------------------------------------------------------------

class TorchMoe:
    """The layer in plain torch bf16 on the same dequantised weights: softmax/top-k, tokens sorted by
    expert, grouped GEMMs (torch._grouped_mm) for gate+up and down, or a loop over experts without it."""

    def __init__(self, spec: MoeSpec, dense: tuple[Any, Any, Any]):
        import torch

        self.torch = torch
        self.spec = spec
        wg, wu, wd = (torch.from_dlpack(w).to(torch.bfloat16) for w in dense)
        self.w_gate_up = torch.cat([wg, wu], dim=1).contiguous()  # [E, 2I, H]
        self.w_down = wd.contiguous()  # [E, H, I]
        del wg, wu
        self.implementation = "torch._grouped_mm" if self._grouped_mm_works() else "per-expert loop"

    def _grouped_mm_works(self) -> bool:
        torch = self.torch
        if not hasattr(torch, "_grouped_mm"):
            return False
        try:
            a = torch.randn(24, 64, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(3, 32, 64, device="cuda", dtype=torch.bfloat16)
            offs = torch.tensor([8, 8, 24], device="cuda", dtype=torch.int32)
            got = torch._grouped_mm(a, b.transpose(1, 2), offs=offs).float()
        except Exception:  # noqa: BLE001 - unsupported on this card or build: use the loop
            return False
        want = torch.cat([a[:8] @ b[0].T, a[8:24] @ b[2].T]).float()
        return bool(torch.allclose(got[:8], want[:8], rtol=2e-2, atol=2e-2)
                    and torch.allclose(got[8:], want[8:], rtol=2e-2, atol=2e-2))

    def _grouped(self, rows: Any, w: Any, offs: Any, counts: Any) -> Any:
        torch = self.torch
        if self.implementation == "torch._grouped_mm":
            return torch._grouped_mm(rows, w.transpose(1, 2), offs=offs)
        out = torch.empty((rows.shape[0], w.shape[1]), device=rows.device, dtype=rows.dtype)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                out[start:start + n] = rows[start:start + n] @ w[e].T
            start += n
        return out

    def forward(self, x: Any, logits: Any) -> Any:
        """x bf16 [T,H], logits float32 [T,E] -> bf16 [T,H]."""
        torch = self.torch
        spec = self.spec
        T, k, I = x.shape[0], spec.top_k, spec.intermediate_size
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        w, ids = torch.topk(probs, k, dim=-1)
        if spec.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(spec.num_experts, device=x.device, dtype=torch.int32)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))  # no host sync, unlike bincount
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        rows = x[order // k]
        gate_up = self._grouped(rows, self.w_gate_up, offs, counts)
        a = torch.nn.functional.silu(gate_up[:, :I]) * gate_up[:, I:]
        y_sorted = self._grouped(a, self.w_down, offs, counts)
        y = torch.empty_like(y_sorted)
        y[order] = y_sorted
        return (y.view(T, k, -1).float() * w.view(T, k, 1)).sum(dim=1).to(torch.bfloat16)


def torch_inputs(spec: MoeSpec, sets: Sequence[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """The same input sets as torch bf16 x and float32 logits (DLPack; bf16 bits are viewed, not converted)."""
    import cupy as cp
    import torch

    out = []
    for x, logits in sets:
        if spec.activation_dtype is ActivationDtype.BF16:
            xt = torch.from_dlpack(x.view(cp.int16)).view(torch.bfloat16)
        else:
            xt = torch.from_dlpack(x).to(torch.bfloat16)
        out.append((xt, torch.from_dlpack(logits)))
    return out


def time_torch(model: TorchMoe, inputs: Sequence[tuple[Any, Any]], runs: int = 20) -> float:
    """Median microseconds of event-timed eager forwards over the input sets, after warm-up."""
    torch = model.torch
    for xt, lt in inputs[:3]:
        model.forward(xt, lt)
    calls = [functools.partial(model.forward, *inputs[i % len(inputs)]) for i in range(max(runs, len(inputs)))]
    return float(np.median(_torch_event_times_ms(torch, calls))) * 1e3


# --- GPU: the run ------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchOptions:
    tokens: tuple[int, ...] = DEFAULT_TOKENS
    paths: tuple[str, ...] = PATHS
    routings: tuple[str, ...] = ROUTINGS
    rotations: int = DEFAULT_ROTATIONS
    seed: int = 0
    torch_baseline: bool = True
    split: bool = True
    decode_up_to: int = DECODE_UP_TO
    prefill_from: int = PREFILL_FROM
    default_rule: bool = False
    """Ignore the card's tuning table: time the default rule's choices (a baseline for the tuner)."""
    clocks: bool = True
    """Sample the clocks while each case's graph replays (ClockSampler). On an H200 the polling moved no case's
    median by more than run-to-run noise (docs/perf-notes.md, sixty-sixth session)."""
    command: str = ""

    def __post_init__(self) -> None:  # before the GPU is touched: the CLI builds these first
        if not self.tokens or min(self.tokens) < 1:
            raise BenchError(f"--tokens {list(self.tokens)}: give positive token counts")
        if self.rotations < 1:
            raise BenchError(f"--rotations {self.rotations}: give at least 1")


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_bench(spec: MoeSpec, options: BenchOptions) -> BenchResult:
    """Time every (T, path, routing) of `options` on the current GPU; needs CuPy and a CUDA GPU."""
    import cupy as cp

    smi_card = _current_card_id()  # nvidia-smi's name of this card, for its clocks
    env = environment(options.command, smi_card)
    _progress(f"bench {spec.name} on {env.device}: measuring the card")
    card = Card(copy_bandwidth_gbps=copy_bandwidth() / 1e9, matmul_tflops=matmul_rate() / 1e12,
                matmul_source=f"torch.matmul bf16 {MATMUL_SIZE}^3" if _torch() is not None
                else f"cupy.matmul f16 {MATMUL_SIZE}^3 (torch missing)")
    _progress(f"copy {card.copy_bandwidth_gbps:.0f} GB/s, matmul {card.matmul_tflops:.0f} TFLOP/s; building the layer")
    layer = build_layer(spec, max(options.tokens), seed=options.seed,
                        tuning_table=None if options.default_rule else "auto")
    choice_source = "default rule (--default-rule)" if options.default_rule else (
        f"tuning table {layer.tuning.source}" if layer.tuning else "default rule (no tuning table for this card)")
    _progress(f"kernel choice: {choice_source}")
    _progress(f"programmatic dependent launch: {layer.pdl_status}")
    torch_model, torch_note = None, ""
    if not options.torch_baseline:
        torch_note = "skipped (--no-torch)"
    elif _torch() is None:
        torch_note = "torch with CUDA is not installed here"
    else:
        cp.cuda.Device().synchronize()
        torch_model = TorchMoe(spec, _WEIGHTS[layer].dense_gpu())
        torch_note = "eager (no CUDA graphs), bf16 weights dequantised from the same blocks"
    torch_rows: list[TorchRow] = []
    stream = cp.cuda.Stream(non_blocking=True)
    tolerance = LAYER_TOLERANCE[spec.activation_dtype]
    ebytes = expert_bytes(spec)
    cases: list[Case] = []
    stats: list[RoutingStats] = []
    steps = bench_steps(options.routings, options.tokens)
    for step, (routing, T) in enumerate(steps, 1):
        # Every array is made on the timing stream: CuPy's pool hands a block freed on one stream
        # to the next allocation on that stream at once, so an array made on the default stream
        # while the reference still runs there would be written by the forward on another stream.
        with stream:
            sets = make_input_sets(spec, T, case_rng(options.seed, T, routing), routing, options.rotations,
                                   skew_seed=options.seed)
            host_logits = [cp.asnumpy(lg) for _, lg in sets]
            n_check = min(ACCURACY_TOKENS, T)
            x0, l0 = sets[0]
            ref = reference_rows(layer, x0[:n_check], l0[:n_check])
            out = cp.empty((T, spec.hidden_size), dtype=x0.dtype)
        stream.synchronize()
        stat = routing_stats(spec, host_logits, routing, layer.settings.block_size_override)
        stats.append(stat)
        distinct_bytes = stat.distinct_experts * ebytes
        flops = layer_flops(spec, T)
        line = []
        timed_paths = paths_at(T, spec, options.paths, options.decode_up_to, options.prefill_from)
        for path in timed_paths:
            resolved = layer.choose_path(T) if path == "auto" else path
            with stream:
                check_out = poisoned_like(out)
                layer.forward(x0, l0, out=check_out, path=path)
                err, ok = quick_check(layer, x0, l0, check_out, ref=ref)

            def forwards(path=path, stop_after=None, sets=sets, out=out):  # bound now: the step ends with del
                return lambda: [layer.forward(x, lg, out=out, path=path, stop_after=stop_after) for x, lg in sets]

            with ClockSampler(smi_card) if options.clocks else contextlib.nullcontext() as sampler:
                per_forward = time_graph(forwards(), len(sets), stream, MAX_REPLAYS, budget_s=GRAPH_BUDGET_S)
            timing = timing_summary(per_forward)
            split = None
            # auto's split is its resolved path's, taken from that path's own row where one is timed too
            if options.split and (path != "auto" or resolved not in timed_paths):
                cumulative = {}
                for phase in layer.phases(resolved):
                    cut = time_graph(forwards(stop_after=phase), len(sets), stream, MAX_REPLAYS,
                                     budget_s=GRAPH_BUDGET_S)
                    cumulative[phase] = float(np.median(cut))
                split = make_split(cumulative, timing["median_us"])
            fig = figures(timing["median_us"], distinct_bytes, flops, card)
            cases.append(Case(
                tokens=T, path=path, routing=routing, resolved_path=resolved, **timing, replays=len(per_forward),
                distinct_expert_bytes=distinct_bytes, flops=flops, memory_floor_us=fig.memory_floor_us,
                compute_floor_us=fig.compute_floor_us, x_floor=fig.x_floor, gbps=fig.gbps, tflops=fig.tflops,
                launches=layer.launch_count(T, resolved), kernels=kernel_infos(layer, T, resolved), split=split,
                accuracy=Accuracy(rel_err=err, tolerance=tolerance, ok=ok, tokens_checked=n_check),
                clocks=sampler.result if sampler is not None else None))
            line.append(f"{path} {timing['median_us']:.1f} us")
        if torch_model is not None:
            cp.cuda.Device().synchronize()
            inputs = torch_inputs(spec, sets)
            t_us = time_torch(torch_model, inputs)
            t_out = torch_model.forward(*inputs[0])[:n_check].float().contiguous()
            t_err = relative_error(cp.from_dlpack(t_out), ref)
            torch_rows.append(TorchRow(tokens=T, routing=routing, median_us=t_us, rel_err=t_err,
                                       ok=bool(t_err <= LAYER_TOLERANCE[ActivationDtype.BF16])))
            line.append(f"torch {t_us:.1f} us")
        _progress(f"[{step}/{len(steps)}] T={T} {routing}: " + ", ".join(line))
        del sets, out
    return BenchResult(
        spec_name=spec.name, spec_hash=spec.spec_hash(), environment=env, card=card, choice=choice_source,
        dependent_launch=layer.pdl_status,
        rotations=options.rotations,
        seed=options.seed, skew=SKEW_PER_SET, routing_stats=stats, cases=cases,
        torch=TorchBaseline(available=torch_model is not None, note=torch_note,
                            implementation=None if torch_model is None else torch_model.implementation,
                            rows=torch_rows))


def command_line(argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return "ferrum-gen " + " ".join(shlex.quote(a) for a in args)


def default_json_path(spec_name: str) -> str:
    return f"bench-{spec_name}.json"


__all__ = [
    "BenchError", "BenchOptions", "BenchResult", "Card", "Case", "ClockSampler", "Comparison", "LoadClocks",
    "apply_overrides", "build_layer", "compare", "copy_bandwidth", "expert_bytes", "figures", "full_report",
    "layer_flops", "load_result", "make_input_sets", "make_logits", "matmul_rate", "parse_clock_samples", "paths_at",
    "plot", "poisoned_like", "quick_check", "reference_rows", "register_weights", "routing_stats", "run_bench",
    "save_result", "summary_table", "time_graph",
]
