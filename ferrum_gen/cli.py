"""The `ferrum-gen` command line."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .compile import CompileError
from .spec import load_spec, shipped_spec_names, spec_to_yaml


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
    from .render import MANIFEST, bundle_files

    names = shipped_spec_names() if args.all else [args.spec]
    stale = 0
    for name in names:
        spec = load_spec(name)
        bundle = Path(args.out) / spec.name
        want = bundle_files(spec)
        have = {p.name for p in bundle.glob("*.cu")} | ({MANIFEST} if (bundle / MANIFEST).exists() else set())
        for fname in sorted(set(want) | have):
            path = bundle / fname
            if fname not in want:
                print(f"{path}: not generated any more")
            elif not path.exists():
                print(f"{path}: missing")
            elif path.read_text() != want[fname]:
                print(f"{path}: differs from the generator's output")
            else:
                continue
            stale += 1
    if stale:
        print(f"{stale} file(s) out of date: run `make generate-all` (or `ferrum-gen generate --all`)")
        return 1
    print("generated files are up to date")
    return 0


def _cmd_spec_from_gguf(args: argparse.Namespace) -> int:
    from .gguf_io import describe_quant_layers, quant_types_by_layer, spec_from_gguf

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ferrum-gen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def spec_args(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument("--spec", help="a spec YAML file, or the name of a shipped spec (e.g. qwen3moe)")
        group.add_argument("--all", action="store_true", help="every shipped spec")
        p.add_argument("--out", default="generated", help="bundle root directory (default: generated)")

    force_help = "replace a bundle directory that holds another spec's bundle (by spec hash)"
    p = sub.add_parser("generate", help="render a spec's kernels into <out>/<spec>/")
    spec_args(p)
    p.add_argument("--force", action="store_true", help=force_help)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("check", help="fail if the bundles on disk differ from a fresh generation")
    spec_args(p)
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("spec-from-gguf", help="print a spec YAML for a qwen3moe/olmoe/mixtral GGUF file")
    p.add_argument("file")
    p.add_argument("--layer", type=int, default=None, help="layer whose quant types to use (default: first MoE layer)")
    p.add_argument("--name", default=None, help="spec name (default: the architecture)")
    p.add_argument("--activation-dtype", default="bf16", choices=["f32", "f16", "bf16"])
    p.set_defaults(func=_cmd_spec_from_gguf)

    p = sub.add_parser("build", help="compile a generated bundle ahead of time for one GPU arch (needs CuPy)")
    p.add_argument("--spec", required=True, help="a spec YAML file or shipped spec name")
    p.add_argument("--arch", required=True, help="e.g. sm_90")
    p.add_argument("--out", default="generated", help="bundle root directory (default: generated)")
    p.add_argument("--force", action="store_true", help=force_help)
    p.set_defaults(func=_cmd_build)

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
