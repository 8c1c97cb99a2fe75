"""The `ferrum-gen` command line."""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path

from . import __version__
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


def _cmd_generate(args: argparse.Namespace) -> int:
    from .render import write_bundle

    names = shipped_spec_names() if args.all else [args.spec]
    for name in names:
        spec = load_spec(name)
        bundle = write_bundle(spec, Path(args.out))
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
    out = build_bundle(spec, Path(args.out), args.arch)
    print(f"{spec.name}: cubins for {args.arch} -> {out}")
    return 0


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

    p = sub.add_parser("generate", help="render a spec's kernels into <out>/<spec>/")
    spec_args(p)
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
    p.set_defaults(func=_cmd_build)

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
    except ValueError as err:
        # SpecError, GgufError, SettingsError and BundleError are all ValueErrors with messages for people
        print(f"ferrum-gen: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
