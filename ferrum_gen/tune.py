"""`ferrum-gen tune`: time every kernel variant per token-count bucket on this GPU and write
the winners into <bundle>/tuning/<gpu>.json, which the runtime then follows (ferrum_gen/tuning.py).

For each bucket (powers of two from 1 to 4096) the tuner times both edges of the bucket
(ferrum_gen.tuning.bucket_edges; with midpoints also the count between them, tuning.timed_counts), under
uniform and skewed routing, for every candidate: each path that can serve the bucket
(decode only up to DECODE_TUNE_MAX tokens and grouped up to GROUPED_TUNE_MAX, where they can still win; a
path the bundle has no kernels for is skipped) with every combination of
its families' variants usable on this card. A candidate must first pass the reference check
(bench.quick_check) at the bucket's largest count; one that fails can never win. One candidate
serves both routings and every timed count, so the winner (pick_winner) is the one whose worst run,
relative to the fastest candidate of that run, is least slow; among those within
WORST_CASE_SLACK of it, the smallest sum of the medians, a mixed stream variant's by more than MIXED_MIN_GAIN. A mixed
variant whose align would pick the same member on every input set of the bucket is not timed (one_sided_mixed).
(Summing alone let a bucket trade one edge's large loss for smaller gains at the others: a tile 59 % slower at
one edge won.) When the time budget runs out, the buckets not yet tuned get the default rule's choice and the
table says it is incomplete. Where the pick is more than SPLIT_HINT_LOSS slower than another candidate at one of the
bucket's runs, the log and the table's meta.split_hints say so (split_hints): a bucket between the edges may
give each side its own choice. tune_with_splits adds those buckets and re-tunes, for a given number of rounds.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import reference, tuning
from .families.align import unpack_pair_arg
from .families.stream import variant_parts
from .spec import MoeSpec

log = logging.getLogger("ferrum_gen")

DECODE_TUNE_MAX = 64
"""The decode path re-reads an expert per (token, expert) pair: past this it cannot win, so it is not timed."""
GROUPED_TUNE_MAX = 256
"""The grouped path is timed up to here: past it every expert has many tokens and prefill's GEMMs win."""
STREAM_TUNE_MIN = 5
"""The stream path is timed in the buckets from here up (T = 5 and more: bucket 6 after 4, or a bucket of its
own at 5): below it align and combine cost more than its kernels save. Timed from 16 before, it never served
T = 9-12, where on an H200 it beat the grouped path; timed from 8, it could not serve T = 5-6 on its own,
which it won on olmoe once it ran as programmatic dependents; timed from 6, a bucket at 5 split off bucket 6
was tuned without the stream path that had served T = 5 (docs/perf-notes.md)."""

WORST_CASE_SLACK = 0.03
"""Candidates whose worst run is within this fraction of the least-slow worst run tie on it; the
smallest sum of the medians wins among them (timing noise is about 1 %)."""

MIXED_MIN_GAIN = 0.03
"""Among the candidates tied on the worst run, a mixed stream variant (families/stream.py MIXED_PAIRS) wins only
where its sum of medians is more than this fraction below the best tied candidate without one: it launches both
members' kernels (those of the size align did not pick exit at once), which cost it ~2 % under uniform routing in
an A/B on an H200, so a smaller lead is noise. There, three tuner picks of b32x2+w64 by 0.2-2.3 % (olmoe T = 385-480,
qwen3moe T = 641-768) were 1.1-3.9 % slower than w64 alone under both routings, and two (qwen3moe_235b
T = 769-960) -0.4 to +1.1 % (align picked their w64 member on every input set) (docs/perf-notes.md, sixty-third session)."""

SPLIT_HINT_LOSS = 0.03
"""A bucket whose pick is more than this much slower than another candidate at one of its timed runs (a
count and a routing) is reported (split_hints): its counts may want different variants, which a bucket
between its edges lets the table give. On an H200 two picks of qwen3moe's tuner were 5.2 % and 3.7 %
slower at one edge under uniform routing and were split and pinned by hand (docs/perf-notes.md)."""

REPLAYS = 20
GRAPH_BUDGET_S = 0.15
"""GPU seconds one candidate's timing may take (fewer replays beyond it)."""


@dataclass(frozen=True)
class Candidate:
    path: str
    variants: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return tuning.candidate_name(self.path, self.variants)

    @property
    def is_mixed(self) -> bool:
        """Whether a family runs a mixed stream variant (both sizes' kernels launched, align picking one)."""
        return any(len(variant_parts(variant)) > 1 for _, variant in self.variants)


def candidates(layer, bucket: int, counts: tuple[int, ...] | None = None,
               paths: tuple[str, ...] = tuning.PATHS) -> list[Candidate]:
    """Every (path, variant combination) of `paths` that may serve the bucket on this card: each variant
    serves every count of the bucket, so every count timed there, its edges among them (tuning.timed_counts;
    the bucket alone by default).
    A fused kernel serves exactly one count, so it is a candidate only in a bucket of one count."""
    spec = layer.spec
    counts = counts or (bucket,)
    out = []
    for path in tuning.PATHS:
        if path not in paths or not tuning.path_available(path, layer.variants):
            continue
        if path == "decode" and (bucket > DECODE_TUNE_MAX or not tuning.decode_possible(spec, bucket)):
            continue
        if path == "grouped" and bucket > GROUPED_TUNE_MAX:
            continue
        if path == "stream" and bucket < STREAM_TUNE_MIN:
            continue
        families = tuning.PATH_FAMILIES[path]
        serving = [sorted(v for v in layer.variants[f] if all(layer.variant_refusal(f, v, t) is None for t in counts))
                   for f in families]
        for combo in itertools.product(*serving):
            if path in tuning.LOCKSTEP_PATHS and len(set(combo)) > 1:
                continue
            out.append(Candidate(path, tuple(zip(families, combo))))
    return out


def one_sided_mixed(cands: Iterable[Candidate], spec: MoeSpec,
                    routed_counts: Iterable[np.ndarray]) -> dict[Candidate, int]:
    """The mixed candidates whose align picks the same block size on every input set of the bucket (routed_counts:
    each set's pairs per expert), each with that size. Such a candidate runs that member's kernels plus the other
    member's launches, which exit at once: it cannot beat the member alone, and a lead on the sum would be noise. On
    an H200 the tuner picked b32x2+w64 by 0.2-2.3 % where align chose w64 on every set, and each was up to 3.9 %
    slower than w64 alone (docs/perf-notes.md, sixty-third session)."""
    from .runtime import block_pairs

    pairs, routed_counts = block_pairs(spec), list(routed_counts)
    one_sided = {}
    for cand in cands:
        mixed = next((v for _, v in cand.variants if len(variant_parts(v)) > 1), None)
        if mixed is None:
            continue
        picks = {reference.pick_block_size(c, (), 1.0, pair=unpack_pair_arg(pairs[mixed])) for c in routed_counts}
        if len(picks) == 1:
            one_sided[cand] = picks.pop()
    return one_sided


def _routed_counts(spec: MoeSpec, input_sets: Iterable[list], stream) -> list[np.ndarray]:
    """Each input set's pairs per expert, as the GPU router selects them (reference.route_f32). The logits are
    read back on `stream`, which uploaded them: the copy must not overtake the upload."""
    import cupy as cp

    with stream:
        return [reference.expert_counts(reference.route_f32(cp.asnumpy(logits), spec.top_k, spec.norm_topk_prob)[0],
                                        spec.num_experts) for sets in input_sets for _, logits in sets]


def _candidate(path: str, variants: dict[str, str]) -> Candidate:
    """The candidate of a table entry, its families in the path's order (as candidates() names them)."""
    return Candidate(path, tuple(sorted(variants.items(), key=lambda fv: tuning.PATH_FAMILIES[path].index(fv[0]))))


def pick_winner(runs: dict[Candidate, list[float]]) -> Candidate:
    """The candidate whose slowest run relative to that run's fastest candidate is the least slow
    (within WORST_CASE_SLACK), then the smallest sum. runs: candidate -> median us per run, every
    candidate timed on the same runs in the same order."""
    count = {len(r) for r in runs.values()}
    if len(count) != 1:
        raise ValueError(f"candidates were timed on different numbers of runs: {sorted(count)}")
    fastest = [min(col) for col in zip(*runs.values())]
    worst = {c: max(t / f for t, f in zip(r, fastest)) for c, r in runs.items()}
    bound = min(worst.values()) * (1 + WORST_CASE_SLACK)
    tied = sorted((c for c in runs if worst[c] <= bound), key=lambda c: sum(runs[c]))
    plain = [c for c in tied if not c.is_mixed]
    if tied[0].is_mixed and plain and sum(runs[tied[0]]) >= sum(runs[plain[0]]) * (1 - MIXED_MIN_GAIN):
        return plain[0]
    return tied[0]


def split_point(edges: tuple[int, ...]) -> int | None:
    """The bucket that splits a bucket of these edges (its smallest and largest count) in two, if any."""
    return (edges[0] + edges[-1]) // 2 if edges[-1] > edges[0] else None


def split_hints(runs: dict[Candidate, list[float]], labels: list[tuple[str, int]], winner: Candidate,
                counts: tuple[int, ...]) -> list[str]:
    """One line per timed run (labels: its routing and count, in the runs' order) where `winner` is more than
    SPLIT_HINT_LOSS slower than that run's fastest candidate, naming it and where a bucket between the
    bucket's edges (the first and last of its timed counts) would split them."""
    hints = []
    middle = split_point(counts)
    for i, (routing, tokens) in enumerate(labels):
        fastest = min(runs, key=lambda c: runs[c][i])
        loss = runs[winner][i] / runs[fastest][i] - 1
        if loss > SPLIT_HINT_LOSS:
            between = f" (a bucket at {middle}, tune --update --buckets {middle}, would time the two halves apart)" \
                if middle is not None else ""
            hints.append(f"T = {tokens} {routing}: {fastest.name} is {loss:.1%} faster than the pick{between}")
    return hints


def _default_entry(layer, bucket: int) -> tuning.TuningEntry:
    choice = tuning.choose(layer.spec, bucket, layer.variants, layer._default_variants, None)
    return tuning.TuningEntry(bucket, choice.path, dict(choice.variants))


def merge_update(table: tuning.TuningTable, new: tuning.TuningTable) -> tuning.TuningTable:
    """`table` with the buckets `new` tuned replaced by `new`'s entries (the others kept), their
    default-rule candidates, rejections, untimed one-sided mixed candidates and split hints in its meta (a
    re-tuned bucket's old records dropped), and the update recorded there (the buckets, date and elapsed time of
    each update, in order).
    A bucket pinned by hand in the table's meta.overrides keeps its choice (_honour_override). A table the budget left incomplete
    (its untimed buckets hold the default rule's choice) is complete once updates have timed them all."""
    tuned = {e.bucket for e in new.entries}
    overrides = dict(table.meta.get("overrides", {}))
    kept = {e.bucket: e for e in table.entries}
    new_entries = [_honour_override(e, kept.get(e.bucket), overrides) for e in new.entries]
    updates = [*table.meta.get("updates", []), {"buckets": sorted(tuned), "date": new.meta.get("date"),
                                                 "elapsed_s": new.meta.get("elapsed_s"),
                                                 "complete": new.meta.get("complete"),
                                                 "midpoints": new.meta.get("midpoints", False),
                                                 **({"paths": new.meta["paths"]} if "paths" in new.meta else {})}]
    entries = sorted([e for e in table.entries if e.bucket not in tuned] + new_entries, key=lambda e: e.bucket)
    # a re-tuned bucket's records are the new run's only (keys "bucket" or "bucket:candidate"): its last tune's no
    # longer hold
    per_bucket = {key: {**{k: v for k, v in table.meta.get(key, {}).items() if int(k.split(":")[0]) not in tuned},
                        **new.meta.get(key, {})}
                  for key in ("default_rule_candidates", "rejected", "one_sided_mixed", "split_hints")}
    complete = bool(table.meta.get("complete")) or all(e.timings_us for e in entries)
    meta = {**table.meta, **per_bucket, "updates": updates, "complete": complete}
    if overrides:
        meta["overrides"] = overrides
    else:
        meta.pop("overrides", None)
    return tuning.TuningTable(table.spec_name, table.spec_hash, table.generator_version, table.gpu, entries, meta,
                              table.source)


def _honour_override(tuned: tuning.TuningEntry, before: tuning.TuningEntry | None,
                     overrides: dict[str, str]) -> tuning.TuningEntry:
    """A re-tuned bucket that the table's meta.overrides pins by hand (bucket -> why) keeps its choice, with
    the new timings, as long as the tuner timed that choice (it passed the reference check and still serves
    the bucket); else the pin is removed from `overrides` and the tuner's pick stands. Either way the log says
    so, since the tuner's own pick was set aside or a hand decision was dropped."""
    reason = overrides.get(str(tuned.bucket))
    if reason is None or before is None:
        return tuned
    pinned, picked = _candidate(before.path, before.variants).name, _candidate(tuned.path, tuned.variants).name
    if pinned in tuned.timings_us:
        if pinned != picked:
            log.warning("tune --update: bucket %d keeps %s, pinned by hand in the table's meta.overrides (%s); "
                        "the tuner picked %s. To take the pick, delete that override and run tune --update on the "
                        "bucket again.",
                        tuned.bucket, pinned, reason, picked)
        return dataclasses.replace(tuned, path=before.path, variants=dict(before.variants))
    del overrides[str(tuned.bucket)]
    log.warning("tune --update: bucket %d's hand pin %s (meta.overrides: %s) was not timed this time (it failed "
                "the reference check, no longer serves the bucket, or is a mixed variant whose align picked one "
                "member on every input set: meta.one_sided_mixed), so the pin is dropped and %s is taken.",
                tuned.bucket, pinned, reason, picked)
    return tuned


def _warn_of_dropped_overrides(path: Path) -> None:
    """A full tune writes a new table: say which hand pins of the one it replaces are lost."""
    try:
        pins = tuning.TuningTable.load(path).meta.get("overrides", {}) if path.is_file() else {}
    except tuning.TuningError:
        return
    if pins:
        log.warning("tune: the table at %s pins buckets %s by hand (meta.overrides); a full tune replaces it and "
                    "drops them. Use --update to re-time buckets and keep the pins.", path, sorted(pins, key=int))


def update_plan(table_buckets: Iterable[int], buckets: Iterable[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(buckets to tune, buckets whose edges they follow) for an update of a table with
    `table_buckets` asked to re-tune `buckets`: a bucket new to the table narrows the next larger
    one (12 takes 9 .. 12 from 16), so that one is re-tuned as well."""
    have, asked = set(table_buckets), set(buckets)
    every = have | asked
    narrowed = {min((b for b in have if b > new), default=None) for new in asked - have} - {None}
    return tuple(sorted(asked | narrowed)), tuple(sorted(every))


def check_options(buckets: Iterable[int], budget_s: float, rotations: int, split_rounds: int = 0,
                  paths: Iterable[str] = tuning.PATHS) -> None:
    """Refuse options a tune cannot run with (tuning.TuningError naming the option and the fix), before
    anything touches the GPU."""
    paths = list(paths)
    unknown = [p for p in paths if p not in tuning.PATHS]
    if not paths or unknown or len(set(paths)) != len(paths):
        raise tuning.TuningError(f"paths (--paths) {paths}: name each once, from {', '.join(tuning.PATHS)} "
                                 "(default: all of them)")
    buckets = list(buckets)
    if not buckets or min(buckets) < 1:
        raise tuning.TuningError(f"buckets (--buckets) {buckets}: each is a token count of at least 1, "
                                 "e.g. --buckets 1 2 4 8")
    if len(set(buckets)) != len(buckets):
        raise tuning.TuningError(f"buckets (--buckets) {buckets} repeat a count: list each once, e.g. "
                                 f"{sorted(set(buckets))}")
    if not budget_s > 0:  # also NaN
        raise tuning.TuningError(f"budget (--budget-s) {budget_s}: give a positive number of seconds (default 300)")
    if rotations < 1:
        raise tuning.TuningError(f"rotations (--rotations) {rotations}: give at least 1 (default 8)")
    if split_rounds < 0:
        raise tuning.TuningError(f"split rounds (--split-rounds) {split_rounds}: give 0 or more (default 0)")


def tune(spec: MoeSpec, out_root: Path = Path("generated"), budget_s: float = 300.0, rotations: int = 8,
         buckets: tuple[int, ...] = tuning.BUCKETS, seed: int = 0, progress: bool = True,
         routings: tuple[str, ...] = ("uniform", "skewed"), update: bool = False,
         midpoints: bool = False, paths: tuple[str, ...] = tuning.PATHS) -> tuple[tuning.TuningTable, Path]:
    """Tune `buckets` and write the card's table. update: re-tune only these buckets of the table
    already there (update_plan: their edges follow from its buckets and these together, and a new
    bucket's next larger one is re-tuned too) and keep its others, also those the budget does not
    reach. midpoints: time each bucket's middle count too (tuning.timed_counts). paths: time only these
    paths' candidates (a re-tune that need not time paths that cannot win, e.g. the prefill GEMMs at
    large T, in less device time); a bucket's pick is then the best of them."""
    check_options(buckets, budget_s, rotations, paths=paths)
    import cupy as cp
    from tqdm import tqdm

    from . import __version__
    from .bench import build_layer, make_input_sets, poisoned_like, quick_check, time_graph

    start = time.monotonic()
    deadline = start + budget_s
    rng = np.random.default_rng(seed)
    H = spec.hidden_size
    gpu_name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()  # as MoeLayer names it
    path = tuning.table_path(Path(out_root) / spec.name, gpu_name)
    old = None
    edges_of = buckets
    if update:
        if not path.is_file():
            raise tuning.TuningError(f"tune --update: there is no table at {path} to update; tune every bucket first")
        old = tuning.TuningTable.load(path)
        old.check_matches(spec, gpu_name)
        asked = buckets
        buckets, edges_of = update_plan((e.bucket for e in old.entries), asked)
        if set(buckets) != set(asked):
            log.info("tune --update: also re-tuning %s, whose edges the new buckets narrow",
                     sorted(set(buckets) - set(asked)))
    else:
        _warn_of_dropped_overrides(path)
    layer = build_layer(spec, max(buckets), seed=seed, tuning_table=None)
    stream = cp.cuda.Stream(non_blocking=True)
    timed = {b: tuning.timed_counts(b, edges_of, midpoints) for b in buckets}
    plan = [(b, candidates(layer, b, timed[b], paths)) for b in sorted(buckets)]
    if empty := [b for b, cands in plan if not cands]:
        raise tuning.TuningError(f"paths (--paths) {list(paths)}: no candidate serves bucket(s) {empty} on this "
                                 "card; add a path that does, or leave --paths out")
    total = sum(len(routings) * len(timed[b]) * len(c) for b, c in plan)
    entries: list[tuning.TuningEntry] = []
    rejected: dict[str, str] = {}
    split: dict[str, list[str]] = {}  # bucket -> split_hints
    skipped: dict[str, str] = {}  # "bucket:candidate" -> why it was not timed (one_sided_mixed)
    defaults: dict[str, str] = {}
    complete = True
    bar = tqdm(total=total, desc=f"tune {spec.name}", unit="timing", disable=not progress)
    for bucket, cands in plan:
        if time.monotonic() > deadline:
            complete = False
            if not update:  # an update keeps the table's own entry
                entries.append(_default_entry(layer, bucket))
            bar.update(len(routings) * len(timed[bucket]) * len(cands))
            continue
        rule = _default_entry(layer, bucket)
        defaults[str(bucket)] = _candidate(rule.path, rule.variants).name
        labels = [(r, T) for r in routings for T in sorted(timed[bucket], reverse=True)]
        with stream:  # one stream for every array and kernel: see bench.run_bench's note on CuPy's pool
            inputs = {(r, T): make_input_sets(spec, T, rng, r, rotations, skew_seed=seed) for r, T in labels}
        if any(c.is_mixed for c in cands):
            one_sided = one_sided_mixed(cands, spec, _routed_counts(spec, inputs.values(), stream))
            for cand, size in one_sided.items():
                skipped[f"{bucket}:{cand.name}"] = f"align picks block size {size} on every input set"
                log.info("tune: bucket %d: %s not timed: align picks block size %d on every input set, so it is "
                         "that member plus launches that exit at once", bucket, cand.name, size)
            cands = [c for c in cands if c not in one_sided]
            bar.update(len(labels) * len(one_sided))
        runs: dict[Candidate, list[float]] = {c: [] for c in cands}  # median us per (routing, T), in order
        for routing, T in labels:
            sets = inputs.pop((routing, T))
            with stream:
                out = cp.empty((T, H), dtype=sets[0][0].dtype)
            for cand in cands:
                if cand not in runs:
                    bar.update(1)
                    continue
                variants = dict(cand.variants)
                if T == bucket and routing == routings[0]:  # the reference check, once per candidate and bucket
                    with stream:
                        check_out = poisoned_like(out)
                        layer.forward(sets[0][0], sets[0][1], out=check_out, path=cand.path, variants=variants)
                        err, ok = quick_check(layer, sets[0][0], sets[0][1], check_out)
                    if not ok:
                        rejected[f"{bucket}:{cand.name}"] = f"rel err {err:.3g}"
                        log.warning("tune: %s at T=%d fails the reference check (rel err %.3g)", cand.name, T, err)
                        del runs[cand]
                        bar.update(1)
                        continue

                def calls(cand=cand, variants=variants):
                    for x, logits in sets:
                        layer.forward(x, logits, out=out, path=cand.path, variants=variants)

                runs[cand].append(float(np.median(time_graph(calls, len(sets), stream, REPLAYS,
                                                             budget_s=GRAPH_BUDGET_S))))
                bar.update(1)
        if not runs:
            raise RuntimeError(f"tune: no candidate passed the reference check at bucket {bucket}: {rejected}")
        best = pick_winner(runs)
        if hints := split_hints(runs, labels, best, timed[bucket]):
            split[str(bucket)] = hints
            log.warning("tune: bucket %d picks %s, which loses where another candidate wins: %s", bucket, best.name,
                        "; ".join(hints))
        entries.append(tuning.TuningEntry(bucket, best.path, dict(best.variants),
                                          {c.name: sum(r) for c, r in runs.items()},
                                          [f"{routing} {T}" for routing, T in labels],
                                          {c.name: r for c, r in runs.items()}))
    bar.close()
    counted = "edges and middle count" if midpoints else "edges"
    table = tuning.TuningTable(
        spec_name=spec.name, spec_hash=spec.spec_hash(), generator_version=__version__, gpu=layer.gpu_name,
        entries=entries,
        meta={
            "complete": complete,
            "budget_s": budget_s,
            "elapsed_s": round(time.monotonic() - start, 1),
            "rotations": rotations,
            "replays": REPLAYS,
            "routings": list(routings),
            "midpoints": midpoints,
            **({"paths": list(paths)} if tuple(paths) != tuning.PATHS else {}),
            "score": f"timings_us: sum over the routings and the bucket's {counted} of the median microseconds per "
                     "forward (CUDA-graph replay); winner: least worst run relative to that run's fastest "
                     f"candidate (ties within {WORST_CASE_SLACK:.0%}), then least sum",
            "rejected": rejected,
            "one_sided_mixed": skipped,
            "split_hints": split,
            "default_rule_candidates": defaults,
            "date": time.strftime("%Y-%m-%d"),
            "arch": layer.bundle.arch,
            "cupy": cp.__version__,
            "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
            "driver": cp.cuda.runtime.driverGetVersion(),
            "dependent_launch": layer.pdl_status,
        },
    )
    if old is not None:
        table = merge_update(old, table)
    return table, table.save(path)


def last_run(table: tuning.TuningTable, updated: bool) -> dict:
    """The meta of the run that last changed the table: its last update's where it was updated (tune
    --update, or a split round), else the table's own."""
    return table.meta["updates"][-1] if updated and "updates" in table.meta else table.meta


def hinted_buckets(table: tuning.TuningTable, tuned: Iterable[int]) -> tuple[int, ...]:
    """The buckets that would split those of `tuned` whose pick the table's split hints say loses somewhere."""
    buckets = [e.bucket for e in table.entries]
    hinted = {str(b) for b in tuned} & set(table.meta.get("split_hints", {}))
    points = (split_point(tuning.bucket_edges(int(b), buckets)) for b in hinted)
    return tuple(sorted({p for p in points if p is not None}))


def tune_with_splits(spec: MoeSpec, split_rounds: int, out_root: Path = Path("generated"), budget_s: float = 300.0,
                     buckets: tuple[int, ...] = tuning.BUCKETS, update: bool = False,
                     **options) -> tuple[tuning.TuningTable, Path, list[tuple[int, ...]]]:
    """tune, then up to split_rounds times: add the buckets the last round's split hints name (hinted_buckets)
    and re-tune them with tune --update (which re-tunes the buckets they narrow too), all within budget_s.
    Returns the table, its path, and the buckets added in each round that ran."""
    start = time.monotonic()
    table, path = tune(spec, out_root, budget_s=budget_s, buckets=buckets, update=update, **options)
    rounds: list[tuple[int, ...]] = []
    for _ in range(split_rounds):
        run = last_run(table, update or bool(rounds))
        added = hinted_buckets(table, run.get("buckets", buckets))
        left = budget_s - (time.monotonic() - start)
        if not added or left <= 0 or not run.get("complete", True):
            break
        log.info("tune: splitting where the picks lose, with buckets %s", list(added))
        table, path = tune(spec, out_root, budget_s=left, buckets=added, update=True, **options)
        rounds.append(added)
    return table, path, rounds


def describe(table: tuning.TuningTable) -> str:
    """The table as rows: bucket, path, variants, the winner's time, the least summed time and the default's."""
    rows = ["microseconds summed over the timed runs of each bucket (its edges, each routing)",
            f"{'bucket':>6} {'path':<8} {'variants':<40} {'chosen us':>9} {'least us':>9} {'default us':>10}"]
    for e in sorted(table.entries, key=lambda e: e.bucket):
        variants = ",".join(f"{v}" for _, v in sorted(e.variants.items()))
        chosen = e.timings_us.get(_candidate(e.path, e.variants).name, float("nan"))
        least = min(e.timings_us.values()) if e.timings_us else float("nan")
        default = e.timings_us.get(table.meta.get("default_rule_candidates", {}).get(str(e.bucket), ""), float("nan"))
        rows.append(f"{e.bucket:>6} {e.path:<8} {variants:<40} {chosen:>9.1f} {least:>9.1f} {default:>10.1f}")
    return "\n".join(rows)
