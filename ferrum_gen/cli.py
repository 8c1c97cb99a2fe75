"""The `ferrum-gen` command line."""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path

from . import __version__
from .compile import CompileError
from .spec import load_spec, shipped_spec_names, spec_to_yaml

DESCRIPTION = """\
Generates CUDA kernels specialised to one model's Mixture-of-Experts layer (hidden size,
expert size, expert count, top-k, the Q4_K/Q6_K type of each projection) from a YAML
spec, and runs that layer on GGUF weights on NVIDIA GPUs (sm_80-sm_90) through CuPy."""

EPILOG = """\
a first session:
  ferrum-gen doctor                                   what this machine has, and what to fix
  ferrum-gen spec-from-gguf model.gguf > model.yaml   a spec for your model's MoE layer
  ferrum-gen generate --spec model.yaml               its kernels, in generated/<name>/
  ferrum-gen demo                                     a small model end to end
docs: README.md, docs/getting-started.md"""

DEFAULT_OUT = "generated"


def _out_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise OSError(f"--out {args.out} is not a directory: give the directory that holds (or will hold) the bundles")
    return out


def _cmd_generate(args: argparse.Namespace) -> int:
    from .render import previous_bundle_files, write_bundle

    out = _out_dir(args)
    specs = [load_spec(name) for name in (shipped_spec_names() if args.all else [args.spec])]
    for spec in specs:  # every directory is checked before any is written
        previous_bundle_files(spec, out, args.force)
    for spec in specs:
        bundle = write_bundle(spec, out, force=args.force)
        count = len(list(bundle.glob("*.cu")))
        print(f"{spec.name}: {count} kernels -> {bundle}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    """Exit 1 when a bundle on disk differs from what the generator renders now."""
    from .doctor import stale_files

    names = shipped_spec_names() if args.all else [args.spec]
    stale = 0
    for name in names:
        spec = load_spec(name)
        bundle = Path(args.out) / spec.name
        if not bundle.is_dir():
            print(f"{bundle}: no bundle there")
            stale += 1
            continue
        for path, what in stale_files(spec, bundle):
            print(f"{path}: {what}")
            stale += 1
    if stale:
        print(f"{stale} file(s) out of date: {_regenerate_hint(args)}")
        return 1
    print("generated files are up to date")
    return 0


def _in_repository() -> bool:
    """Whether the working directory is a ferrum-gen checkout (where `make generate-all` exists)."""
    return (Path("ferrum_gen") / "spec.py").is_file() and Path("Makefile").is_file()


def _regenerate_hint(args: argparse.Namespace) -> str:
    target = "--all" if args.all else f"--spec {shlex.quote(args.spec)}"
    out = "" if args.out == DEFAULT_OUT else f" --out {shlex.quote(args.out)}"
    command = f"ferrum-gen generate {target}{out}"
    if args.all and not out and _in_repository():
        return f"run `make generate-all` (or `{command}`) and review the diff"
    if not Path(args.out).is_dir():
        return f"{args.out} does not exist: pass the bundle root you generated into with --out, or run `{command}`"
    return f"run `{command}`"


def _cmd_spec_from_gguf(args: argparse.Namespace) -> int:
    from .gguf_io import check_spec_name, describe_quant_layers, quant_types_by_layer, spec_from_gguf

    if args.name is not None:
        check_spec_name(args.name, "--name")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = spec_from_gguf(args.file, layer=args.layer, name=args.name, activation_dtype=args.activation_dtype)
    for w in caught:
        print(f"# note: {w.message}", file=sys.stderr)
    if caught:
        print("# quant types by layer: " + describe_quant_layers(quant_types_by_layer(args.file)), file=sys.stderr)
    sys.stdout.write(spec_to_yaml(spec))
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from .bundle import build_bundle

    spec = load_spec(args.spec)
    out = build_bundle(spec, _out_dir(args), args.arch, force=args.force)
    print(f"{spec.name}: cubins for {args.arch} -> {out}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from .tune import check_options, describe, last_run, tune_with_splits
    from .tuning import BUCKETS, PATHS, TuningError

    spec = load_spec(args.spec)
    buckets = tuple(args.buckets) if args.buckets else None
    if args.update and not buckets:
        print("ferrum-gen: error: tune --update re-tunes the buckets given with --buckets: name them", file=sys.stderr)
        return 2
    kwargs = {"buckets": buckets} if buckets else {}
    routings = ("uniform", "skewed") if args.routing == "both" else (args.routing,)
    # TuningError: options it cannot run with (checked before the GPU is looked for), or tune's own, e.g.
    # --update with no table for this card, or one of another spec version
    try:
        paths = tuple(args.paths) if args.paths else PATHS
        check_options(buckets or BUCKETS, args.budget_s, args.rotations, args.split_rounds, paths)
        try:
            import cupy

            cupy.cuda.runtime.getDeviceCount()
        except Exception as err:  # noqa: BLE001 - any failure here means: no usable GPU
            print(f"ferrum-gen: error: tune times kernels on a CUDA GPU with CuPy, and none is usable here ({err})",
                  file=sys.stderr)
            return 2
        table, path, rounds = tune_with_splits(spec, args.split_rounds, Path(args.out), budget_s=args.budget_s,
                                               rotations=args.rotations, routings=routings, update=args.update,
                                               midpoints=args.midpoints, paths=paths, **kwargs)
    except TuningError as err:
        print(f"ferrum-gen: error: {err}", file=sys.stderr)
        return 2
    print(describe(table))
    updated = args.update or bool(rounds)
    run = last_run(table, updated)
    done = "complete" if run.get("complete") else "INCOMPLETE (budget ran out: later buckets use the default rule)"
    what = f"buckets {', '.join(map(str, run['buckets']))} updated in the" if updated else "the"
    for i, added in enumerate(rounds, 1):
        print(f"{spec.name}: split round {i} added buckets {', '.join(map(str, added))}")
    print(f"{spec.name}: {what} tuning table for {table.gpu} -> {path} ({done}, {run.get('elapsed_s')} s)")
    return 0
def _cmd_bench(args: argparse.Namespace) -> int:
    """Time the layer on the GPU, or (--against, --from-json) work on saved results without one."""
    from . import bench

    try:
        if args.against is not None and args.compare is None:
            raise bench.BenchError("--against NEW.json is compared with --compare OLD.json: give both")
        if args.against is not None and args.from_json is not None:
            raise bench.BenchError("--against and --from-json both name a saved result: give one of them")
        if args.plot:
            bench.check_plot_support()  # before a run of minutes, not after it
        bench.check_threshold(args.threshold)  # before a run of minutes, not after it
        old = bench.load_result(args.compare) if args.compare is not None else None
        saved = args.against or args.from_json
        if saved is not None:
            result = bench.load_result(saved)
            if args.from_json is not None:
                print(bench.full_report(result))
        else:
            spec = bench.apply_overrides(load_spec(args.spec), args.set)
            options = bench.BenchOptions(
                tokens=tuple(args.tokens), paths=tuple(args.paths),
                routings=bench.ROUTINGS if args.routing == "both" else (args.routing,),
                rotations=args.rotations, seed=args.seed, torch_baseline=not args.no_torch, split=not args.no_split,
                decode_up_to=args.decode_up_to, prefill_from=args.prefill_from, default_rule=args.default_rule,
                clocks=args.clocks, command=bench.command_line(None))
            why = bench.gpu_unavailable_reason()
            if why is not None:
                print(f"ferrum-gen bench: error: it needs a CUDA GPU with CuPy ({why})", file=sys.stderr)
                return 2
            result = bench.run_bench(spec, options)
            json_path = args.json or bench.default_json_path(spec.name)
            bench.save_result(result, json_path)
            print(bench.full_report(result))
            print(f"wrote {json_path}")
        if args.plot:
            bench.plot(result, args.plot)
            print(f"wrote {args.plot}")
        status = 0
        if saved is None and any(not c.accuracy.ok for c in result.cases):
            print("ferrum-gen bench: a timed configuration failed its accuracy check (rel err marked '!')",
                  file=sys.stderr)
            status = 1
        if old is not None:
            comparison = bench.compare(old, result, args.threshold)
            print(comparison.table())
            if comparison.regressed:
                status = 1
        return status
    except bench.BenchError as err:
        print(f"ferrum-gen bench: error: {err}", file=sys.stderr)
        return 2


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import format_report, run_checks

    findings = run_checks(Path(args.out))
    print(format_report(findings))
    return 0 if all(f.ok for f in findings) else 1


def _cmd_cache(args: argparse.Namespace) -> int:
    from .doctor import cache_entries, clear_cache, format_size
    from .settings import Settings

    root = Settings.from_env().cache_dir
    if args.cache_command == "clear":
        count, freed = clear_cache(root)
        print(f"{root}: removed {count} cache entries ({format_size(freed)})")
    else:
        entries = cache_entries(root)
        print(f"{root}: {len(entries)} entries, {format_size(sum(p.stat().st_size for p in entries))}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.workdir) if args.workdir else None, gpu=args.gpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ferrum-gen", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def spec_args(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument("--spec", help="a spec YAML file, or the name of a shipped spec (e.g. qwen3moe)")
        group.add_argument("--all", action="store_true", help="every shipped spec")
        p.add_argument("--out", default=DEFAULT_OUT, help=f"bundle root directory (default: {DEFAULT_OUT})")

    force_help = "replace a bundle directory that holds another spec's bundle (by spec hash)"
    p = sub.add_parser("generate", help="render a spec's kernels into <out>/<spec>/")
    spec_args(p)
    p.add_argument("--force", action="store_true", help=force_help)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("check", help="fail if the bundles on disk differ from a fresh generation")
    spec_args(p)
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("spec-from-gguf", help="print a spec YAML for a qwen3moe/olmoe/mixtral GGUF file")
    p.add_argument("file", help="a GGUF model file (qwen3moe, olmoe, or mixtral, which GGUF calls llama)")
    p.add_argument("--layer", type=int, default=None, help="layer whose quant types to use (default: first MoE layer)")
    p.add_argument("--name", default=None,
                   help="spec name (default: architecture, shape and quant mix, e.g. "
                        "qwen3moe_h2048_i768_e128_k8_q4_k_q4_k_q6_k)")
    p.add_argument("--activation-dtype", default="bf16", choices=["f32", "f16", "bf16"],
                   help="dtype of the layer's input and output (default: bf16)")
    p.set_defaults(func=_cmd_spec_from_gguf)

    p = sub.add_parser("build", help="compile a generated bundle ahead of time for one GPU arch (needs CuPy)")
    p.add_argument("--spec", required=True, help="a spec YAML file or shipped spec name")
    p.add_argument("--arch", required=True, help="the GPU arch to compile for: sm_80, sm_86, sm_89 or sm_90")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"bundle root directory (default: {DEFAULT_OUT})")
    p.add_argument("--force", action="store_true", help=force_help)
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("tune", help="time every kernel variant per token-count bucket on this GPU and write "
                                     "<out>/<spec>/tuning/<gpu>.json, which the runtime then follows (needs a GPU)")
    p.add_argument("--spec", required=True, help="a spec YAML file or shipped spec name")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="time budget in seconds; buckets not reached keep the default rule (default: 300)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"bundle root directory (default: {DEFAULT_OUT})")
    p.add_argument("--rotations", type=int, default=8,
                   help="distinct input sets per timed graph, so weights are not served from L2 (default: 8)")
    p.add_argument("--buckets", type=int, nargs="+", default=None,
                   help="token-count buckets to tune; each covers the counts above the next smaller one, so "
                        "adding e.g. 192 gives 129-192 and 193-256 their own choice (default: powers of two "
                        "from 1 to 4096)")
    p.add_argument("--routing", default="both", choices=["uniform", "skewed", "both"],
                   help="routings each candidate is timed under; the score sums them (default: both)")
    p.add_argument("--update", action="store_true",
                   help="re-tune only --buckets in the card's existing table and keep its other buckets (after "
                        "adding a variant, say); a bucket new to the table narrows the next larger one, which is "
                        "re-tuned too")
    p.add_argument("--midpoints", action="store_true",
                   help="also time each bucket's middle count, not only its edges (a variant's gain inside a "
                        "bucket can be even at both edges); half again the timings")
    p.add_argument("--paths", nargs="+", default=None, metavar="PATH",
                   help="time only these paths' candidates (decode, grouped, fused, prefill, stream), e.g. "
                        "--paths stream to re-tune large buckets without the prefill GEMMs, which take longest "
                        "to time; each re-tuned bucket's pick is then the best of these (default: every path)")
    p.add_argument("--split-rounds", type=int, default=0,
                   help="then, this many times, split each bucket whose pick is more than 3%% slower than another "
                        "candidate at one of its runs (the table's split hints) and re-tune the halves, within "
                        "the same budget (default: 0)")
    p.set_defaults(func=_cmd_tune)
    from . import bench

    p = sub.add_parser(
        "bench", help="time the layer on this GPU against its memory/compute floors; compare saved results",
        description="Times the MoE layer on the GPU (CUDA-graph replay of R forwards on distinct inputs) for each "
                    "token count, path and routing, with the card's copy bandwidth and matmul rate measured in the "
                    "same run, a per-phase split, an accuracy check and a torch bf16 baseline. Needs CuPy and a "
                    "CUDA GPU, except with --compare OLD --against NEW or --from-json FILE. Exit status: 0 ok; 1 a "
                    "case more than --threshold slower than --compare's, or a failed accuracy check; 2 unusable input "
                    "or no GPU.")
    p.add_argument("--spec", default="qwen3moe", help="a spec YAML file or shipped spec name (default: qwen3moe)")
    p.add_argument("--tokens", type=int, nargs="+", default=list(bench.DEFAULT_TOKENS), metavar="T",
                   help="token counts (default: powers of two 1..4096)")
    p.add_argument("--paths", nargs="+", default=list(bench.PATHS), choices=list(bench.PATHS),
                   help="paths to time; auto is what the runtime picks (default: all of them)")
    p.add_argument("--routing", default="both", choices=["uniform", "skewed", "both"],
                   help="uniform: standard-normal logits; skewed: Zipf-like expert popularity (default: both)")
    p.add_argument("--rotations", type=int, default=bench.DEFAULT_ROTATIONS, metavar="R",
                   help="forwards per CUDA graph, each on its own input set (default: 8)")
    p.add_argument("--decode-up-to", type=int, default=bench.DECODE_UP_TO, metavar="T",
                   help="time the decode path only up to this T (default: 64)")
    p.add_argument("--prefill-from", type=int, default=bench.PREFILL_FROM, metavar="T",
                   help="time the prefill path only from this T (default: 8)")
    p.add_argument("--json", default=None, metavar="PATH", help="where to write the result (default: bench-<spec>.json)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw us against T, log-log (needs matplotlib)")
    p.add_argument("--compare", default=None, metavar="OLD.json",
                   help="after the run, compare every case with this saved result; exit 1 if one is slower")
    p.add_argument("--against", default=None, metavar="NEW.json",
                   help="with --compare: compare two saved results instead of running (no GPU needed)")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="print (and with --plot, draw) a saved result instead of running (no GPU needed)")
    p.add_argument("--threshold", type=float, default=bench.COMPARE_THRESHOLD, metavar="FRACTION",
                   help="slowdown that fails --compare, as a fraction (default: 0.05, i.e. 5 %%)")
    p.add_argument("--no-torch", action="store_true", help="skip the torch bf16 baseline")
    p.add_argument("--no-split", action="store_true", help="skip the per-phase split")
    p.add_argument("--default-rule", action="store_true",
                   help="ignore the card's tuning table and time the default rule's kernel choices")
    p.add_argument("--clocks", action=argparse.BooleanOptionalAction, default=True,
                   help="sample the SM clock, board power and power-cap throttling with nvidia-smi while each case's "
                        "graph replays (recorded per case; --compare notes a slower case whose clock fell); "
                        "on by default")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the weights, the inputs (each T and routing a stream of its own) and the skewed "
                        "popularity")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key for an experiment, e.g. prefill.gate_up_tile_n=64 (repeatable)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("doctor", help="report the GPU, CUDA, CuPy, NVRTC, nvcc, cache and bundles; exit 1 on a problem")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"bundle root directory to check (default: {DEFAULT_OUT})")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("cache", help="show or clear the compiled-kernel cache (FERRUM_GEN_CACHE)")
    p.add_argument("cache_command", choices=["info", "clear"], metavar="{info,clear}",
                   help="info: entries and size; clear: remove ferrum-gen's entries (nothing else in the directory)")
    p.set_defaults(func=_cmd_cache)

    p = sub.add_parser("demo", help="a small qwen3moe-shaped model end to end: GGUF, bundles, every layer checked")
    p.add_argument("--workdir", default=None, help="where to write the demo's GGUF and bundles (default: a temporary "
                   "directory, removed afterwards)")
    p.add_argument("--gpu", choices=["auto", "require", "skip"], default="auto",
                   help="auto: run on the GPU when one is usable; require: fail without one; skip: CPU checks only")
    p.set_defaults(func=_cmd_demo)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, CompileError) as err:
        # SpecError, GgufError, SettingsError, BundleError and OutputDirError are ValueErrors with messages for people
        print(f"ferrum-gen: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"ferrum-gen: error: {_os_error_text(err)}", file=sys.stderr)
        return 2


def _os_error_text(err: OSError) -> str:
    if err.strerror is None:  # raised here with a message of our own
        return str(err)
    where = " -> ".join(repr(str(f)) for f in (err.filename, err.filename2) if f is not None)
    return (
        f"{where + ': ' if where else ''}{err.strerror}: check that the path exists, is a directory where one "
        "is needed, and that you may write there"
    )


if __name__ == "__main__":
    sys.exit(main())
