"""Which path and which kernel variants serve a token count: the default rule and tuning tables.

The runtime asks `choose()` for every forward call. Without a tuning table for the card,
the **default rule** applies: for T <= spec.decode_max_tokens the grouped path (the
expert-grouped tensor-core kernels) where the spec has it, else the decode path (GEMVs);
above it the stream path (weight-streaming tensor-core kernels) where the spec and the card
have it, else prefill. The stream path's variant follows the pairs an expert gets on average
(families/stream.py RULE_BY_PAIRS_PER_EXPERT) where the card runs it; every other family takes its
default variant (the kernel the spec's own keys describe).
A tuning table (`ferrum-gen tune` writes one per GPU into <bundle>/tuning/<gpu>.json)
records, per token-count bucket, the path and the variant of each tuned family that won on
that card (the least worst case over the bucket's edges and routings, then the fastest: see
ferrum_gen.tune); T uses the bucket of the smallest tuned token count >= T (the largest
bucket above the last one). A table is used only for the spec hash, generator version and
GPU name it was made for.

Nothing here needs a GPU: the tests exercise the choice on CPU.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .families import stream
from .spec import MoeSpec

log = logging.getLogger("ferrum_gen")

SCHEMA_VERSION = 2
"""2: the grouped path joined the tuned paths; a version-1 table never timed it."""
PATHS = ("decode", "grouped", "fused", "prefill", "stream")
PATH_FAMILIES: dict[str, tuple[str, ...]] = {
    "decode": ("gemv_gate_up_silu", "gemv_down_combine"),
    "grouped": ("grouped_gate_up_silu", "grouped_down_combine"),
    "fused": ("fused_moe",),
    "prefill": ("gemm_gate_up_silu", "gemm_down"),
    "stream": ("stream_gate_up_silu", "stream_down"),
}
"""The families of each path that come in variants (router, align and combine have one kernel)."""
ALIGNED_PATHS = ("prefill", "stream")
"""The paths that sort the pairs by expert into blocks (align) and combine afterwards."""
LOCKSTEP_PATHS = frozenset({"stream"})
"""Paths whose families take one variant together: the stream kernels' variant is the block size
align uses, which both must share."""
TUNED_FAMILIES = frozenset(f for families in PATH_FAMILIES.values() for f in families)

BUCKETS = tuple(2**i for i in range(13))
"""Token-count buckets the tuner times: powers of two from 1 to 4096."""

MAX_DECODE_PAIRS = 65535
"""The decode GEMV puts one (token, expert) pair per grid row: CUDA caps grid.y at 65535."""

DEFAULT_RULE = "default rule"


class TuningError(ValueError):
    """A tuning table that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Choice:
    """A path and the variant of each of its tuned families."""

    path: str
    variants: Mapping[str, str]
    source: str = DEFAULT_RULE


def bucket_edges(bucket: int, buckets: Iterable[int] = BUCKETS) -> tuple[int, ...]:
    """The token counts the tuner times for a bucket: its smallest and largest member.

    A bucket covers the counts above the next smaller of `buckets` up to itself, as the table's
    lookup assigns them: (b/2, b] for the default powers of two, where b = 1 and 2 hold one count
    each; with 192 between 128 and 256, bucket 192 covers 129 .. 192 and bucket 256 193 .. 256.
    """
    if bucket not in buckets:
        raise ValueError(f"bucket {bucket} is not one of the buckets {sorted(buckets)}")
    low = max((b for b in buckets if b < bucket), default=0) + 1
    return (bucket,) if low >= bucket else (low, bucket)


def timed_counts(bucket: int, buckets: Iterable[int] = BUCKETS, midpoint: bool = False) -> tuple[int, ...]:
    """The token counts the tuner times for a bucket: its edges (bucket_edges), and with midpoint also the
    count halfway between them where there is one. The edges alone can hide a variant's gain inside a
    bucket: mixtral's w128 was 17-20 % faster at T = 320-448 but even with b64 at 257 (docs/perf-notes.md)."""
    edges = bucket_edges(bucket, buckets)
    if not midpoint or len(edges) == 1 or edges[1] - edges[0] < 2:
        return edges
    return (edges[0], (edges[0] + edges[1]) // 2, edges[1])


def decode_possible(spec: MoeSpec, tokens: int) -> bool:
    return tokens * spec.top_k <= MAX_DECODE_PAIRS


def path_available(path: str, available: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether this card has a usable variant of every family of the path (the grouped
    kernels exist only for specs whose gate and up share a quant type; a lockstep path needs
    one variant that all of its families have)."""
    if path in LOCKSTEP_PATHS:
        return bool(_shared_variants(path, available))
    return all(available.get(family) for family in PATH_FAMILIES[path])


def _shared_variants(path: str, available: Mapping[str, Mapping[str, Any]]) -> list[str]:
    families = PATH_FAMILIES[path]
    return sorted(set.intersection(*(set(available.get(f, {})) for f in families)))


def default_path(spec: MoeSpec, tokens: int, available: Mapping[str, Mapping[str, Any]]) -> str:
    """grouped (else decode) up to spec.decode_max_tokens; above it stream (else prefill), which
    was faster than prefill at every T from 32 to 4096 on an H200 (docs/perf-notes.md)."""
    if tokens > spec.decode_max_tokens:
        return "stream" if path_available("stream", available) else "prefill"
    return "grouped" if path_available("grouped", available) else "decode"


def gpu_slug(gpu_name: str) -> str:
    """A file-name form of a GPU's name: 'NVIDIA H200' -> 'nvidia_h200'."""
    slug = re.sub(r"[^a-z0-9]+", "_", gpu_name.lower()).strip("_")
    return slug or "unknown_gpu"


def table_path(bundle_dir: Path, gpu_name: str) -> Path:
    return Path(bundle_dir) / "tuning" / f"{gpu_slug(gpu_name)}.json"


@dataclass
class TuningEntry:
    bucket: int
    path: str
    variants: dict[str, str]
    timings_us: dict[str, float] = field(default_factory=dict)
    """Median microseconds per forward of each candidate at the bucket's edges (summed), for the record."""
    run_labels: list[str] = field(default_factory=list)
    """The timed runs, "<routing> <T>", in runs_us's order (tables tuned before the sixty-fourth session have none)."""
    runs_us: dict[str, list[float]] = field(default_factory=dict)
    """Each candidate's median microseconds per forward in each run: the sum hides a loss at one edge (an 18 % one
    at qwen3moe_235b T = 128 skewed, docs/perf-notes.md, sixty-fourth session), these show it."""

    def as_json(self) -> dict[str, Any]:
        runs = {"run_labels": self.run_labels,
                "runs_us": {k: [round(t, 2) for t in v] for k, v in sorted(self.runs_us.items())}} \
            if self.run_labels else {}
        return {"bucket": self.bucket, "path": self.path, "variants": dict(sorted(self.variants.items())),
                "timings_us": {k: round(v, 2) for k, v in sorted(self.timings_us.items())}, **runs}


@dataclass
class TuningTable:
    spec_name: str
    spec_hash: str
    generator_version: str
    gpu: str
    entries: list[TuningEntry]
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"

    def lookup(self, tokens: int) -> TuningEntry | None:
        if not self.entries:
            return None
        ordered = sorted(self.entries, key=lambda e: e.bucket)
        return next((e for e in ordered if e.bucket >= tokens), ordered[-1])

    def as_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "spec_name": self.spec_name,
            "spec_hash": self.spec_hash,
            "generator_version": self.generator_version,
            "gpu": self.gpu,
            "meta": self.meta,
            "buckets": [e.as_json() for e in sorted(self.entries, key=lambda e: e.bucket)],
        }

    def save(self, path: Path) -> Path:
        from .compile import write_atomic

        write_atomic(Path(path), (json.dumps(self.as_json(), indent=2) + "\n").encode())
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> "TuningTable":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise TuningError(f"tuning table {path} cannot be read ({err}): delete it or run `ferrum-gen tune` again")
        try:
            if data["schema_version"] != SCHEMA_VERSION:
                raise TuningError(
                    f"tuning table {path} has schema version {data['schema_version']}, this ferrum-gen reads "
                    f"{SCHEMA_VERSION}: run `ferrum-gen tune` again"
                )
            entries = [
                TuningEntry(int(b["bucket"]), str(b["path"]), {str(k): str(v) for k, v in b["variants"].items()},
                            {str(k): float(v) for k, v in b.get("timings_us", {}).items()},
                            [str(label) for label in b.get("run_labels", [])],
                            {str(k): [float(t) for t in v] for k, v in b.get("runs_us", {}).items()})
                for b in data["buckets"]
            ]
            table = cls(str(data["spec_name"]), str(data["spec_hash"]), str(data["generator_version"]),
                        str(data["gpu"]), entries, dict(data.get("meta", {})), str(path))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            if isinstance(err, TuningError):
                raise
            raise TuningError(f"tuning table {path} is malformed ({err!r}): run `ferrum-gen tune` again") from None
        for e in table.entries:
            if e.path not in PATHS:
                raise TuningError(f"tuning table {path}: bucket {e.bucket} names path {e.path!r}, not one of {PATHS}")
            if any(len(runs) != len(e.run_labels) for runs in e.runs_us.values()):
                raise TuningError(f"tuning table {path}: bucket {e.bucket}'s runs_us must give each candidate one "
                                  f"time per run of run_labels ({len(e.run_labels)}); run `ferrum-gen tune` again")
        pins = table.meta.get("overrides", {})
        buckets = {str(e.bucket) for e in table.entries}
        if not isinstance(pins, dict) or not all(isinstance(why, str) and why.strip() for why in pins.values()):
            raise TuningError(f"tuning table {path}: meta.overrides must map a bucket to the reason it is pinned by "
                              'hand, e.g. {"640": "why"}')
        if unknown := sorted(set(pins) - buckets):
            raise TuningError(f"tuning table {path}: meta.overrides pins bucket(s) {', '.join(unknown)}, which the "
                              f"table has not (its buckets: {', '.join(sorted(buckets, key=int))}); remove them")
        return table

    def check_matches(self, spec: MoeSpec, gpu_name: str) -> None:
        """Raise TuningError unless this table was made for this spec, generator version and GPU."""
        for what, have, want in (
            ("spec hash", self.spec_hash, spec.spec_hash()),
            ("generator version", self.generator_version, __version__),
            ("GPU", self.gpu, gpu_name),
        ):
            if have != want:
                raise TuningError(
                    f"tuning table {self.source} was made for {what} {have!r}, not {want!r}: "
                    f"run `ferrum-gen tune --spec {spec.name}` on this card"
                )


_told: set[tuple[str, str]] = set()


def say_once(key: tuple[str, str], message: str, level: int = logging.WARNING) -> None:
    """Log a message about a (spec, GPU) pair once per process."""
    if key not in _told:
        _told.add(key)
        log.log(level, message)


def find_table(spec: MoeSpec, gpu_name: str, search: Iterable[Path]) -> TuningTable | None:
    """The first usable table for this spec and GPU among the bundle directories `search`.

    A missing table is said once through logging; a table for another spec, version or GPU is
    skipped with a warning (never used).
    """
    looked = []
    for bundle_dir in search:
        path = table_path(bundle_dir, gpu_name)
        looked.append(str(path))
        if not path.is_file():
            continue
        try:
            table = TuningTable.load(path)
            table.check_matches(spec, gpu_name)
        except TuningError as err:
            say_once((spec.spec_hash(), gpu_name + str(path)), f"ignoring a tuning table: {err}")
            continue
        return table
    say_once(
        (spec.spec_hash(), gpu_name),
        f"no tuning table for spec {spec.name} on {gpu_name} (looked for {', '.join(looked) or 'none'}); "
        f"using the default rule. Run `ferrum-gen tune --spec {spec.name}` to make one.",
        logging.INFO,
    )
    return None


def choose(spec: MoeSpec, tokens: int, available: Mapping[str, Mapping[str, Any]],
           defaults: Mapping[str, str], table: TuningTable | None = None, path: str = "auto") -> Choice:
    """The path and variants for `tokens`.

    available: family -> {variant: kernels} usable on this card; defaults: family -> default
    variant. path: "auto" (table, else the default rule) or one of PATHS (forced path, variants
    still from the table: its bucket's choice when that is the path, else the path's candidate
    the tuner timed fastest in that bucket, else the defaults).
    """
    entry = table.lookup(tokens) if table is not None else None
    if entry is not None and not path_available(entry.path, available):
        entry = None  # a table from a bundle with other kernels: the default rule instead
    if path == "auto":
        path = entry.path if entry is not None else default_path(spec, tokens, available)
        if path == "decode" and not decode_possible(spec, tokens):
            path = "prefill"
    elif not path_available(path, available):
        raise ValueError(f"the {path} path has no kernels in this bundle (families {PATH_FAMILIES[path]})")
    variants = {}
    use_entry = entry is not None and entry.path == path
    timed = fastest_timed(entry, path, available) if entry is not None and not use_entry else None
    rule = stream.rule_variant(spec, tokens) if path == "stream" and not use_entry and not timed else None
    for family in PATH_FAMILIES[path]:
        want = entry.variants.get(family) if use_entry else timed.get(family) if timed else rule
        variants[family] = want if want in available.get(family, {}) else defaults[family]
    if path in LOCKSTEP_PATHS:
        variants = lockstep(path, variants[PATH_FAMILIES[path][0]], available, defaults)
    if use_entry:
        source = f"tuning table {table.source}, bucket {entry.bucket}"
    elif timed:
        source = f"tuning table {table.source}, bucket {entry.bucket}: the fastest {path} candidate timed there"
    else:
        source = DEFAULT_RULE
    return Choice(path, variants, source)


def candidate_name(path: str, variants: Iterable[tuple[str, str]]) -> str:
    """A timed candidate's key in a table's record (TuningEntry.timings_us): "path:family=variant,...",
    the families in the path's order."""
    return path + ":" + ",".join(f"{f}={v}" for f, v in variants)


def candidate_variants(name: str) -> tuple[str, dict[str, str]]:
    """(path, family -> variant) of a candidate_name."""
    path, _, rest = name.partition(":")
    return path, dict(pair.split("=", 1) for pair in rest.split(",") if "=" in pair)


def fastest_timed(entry: TuningEntry, path: str, available: Mapping[str, Mapping[str, Any]]) -> dict[str, str] | None:
    """family -> variant of the `path` candidate with the least time in the entry's record (the tuner's
    sum over its runs) among those this card can run; None where the record has none."""
    best: tuple[float, dict[str, str]] | None = None
    for name, us in entry.timings_us.items():
        cand_path, variants = candidate_variants(name)
        if cand_path != path:
            continue
        if set(variants) != set(PATH_FAMILIES[path]) or any(v not in available.get(f, {}) for f, v in variants.items()):
            continue
        if best is None or us < best[0]:
            best = (us, variants)
    return best[1] if best else None


def lockstep(path: str, variant: str, available: Mapping[str, Mapping[str, Any]],
             defaults: Mapping[str, str]) -> dict[str, str]:
    """A lockstep path's families all on `variant` where each has it usable, else on their
    (shared) default, else on the first variant they all have."""
    families = PATH_FAMILIES[path]
    shared = _shared_variants(path, available)
    default = defaults[families[0]]
    pick = variant if variant in shared else default if default in shared else shared[0]
    return {f: pick for f in families}
