"""Render a spec's kernels into CUDA sources and write the bundle: <out>/<spec>/*.cu + manifest.json."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import jinja2
from jinja2 import meta

from . import __version__
from .compile import write_atomic
from .enumerate import enumerate_kernels
from .families.base import KernelSpec
from .quant import WEIGHT_TILE_ROWS
from .spec import MoeSpec

TEMPLATES_DIR = Path(__file__).parent / "templates"
MANIFEST = "manifest.json"

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,
)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _template_closure(name: str, seen: set[str] | None = None) -> list[str]:
    """The template and every template it includes, recursively, in a fixed order."""
    seen = set() if seen is None else seen
    if name in seen:
        return []
    seen.add(name)
    source = (TEMPLATES_DIR / name).read_text()
    names = [name]
    for child in sorted(meta.find_referenced_templates(_ENV.parse(source))):
        if child is None:
            raise ValueError(f"template {name} includes a template by a computed name")
        names += _template_closure(child, seen)
    return names


def template_hash(name: str) -> str:
    """sha256 over the template and everything it includes: changes to shared code show up too."""
    h = hashlib.sha256()
    for n in _template_closure(name):
        h.update(n.encode() + b"\0" + (TEMPLATES_DIR / n).read_bytes() + b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class RenderedKernel:
    kernel: KernelSpec
    source: str
    template_sha256: str

    @property
    def filename(self) -> str:
        return f"{self.kernel.uri}.cu"

    @property
    def source_sha256(self) -> str:
        return _sha256(self.source)


def render_kernel(spec: MoeSpec, kernel: KernelSpec) -> RenderedKernel:
    t_hash = template_hash(kernel.template)
    context = dict(kernel.values)
    context.update(
        uri=kernel.uri,
        SIGNATURE=kernel.signature,
        generator_version=__version__,
        spec_name=spec.name,
        spec_hash=spec.spec_hash(),
        template_name=kernel.template,
        template_hash=t_hash,
        WEIGHT_TILE_ROWS=WEIGHT_TILE_ROWS,
    )
    source = _ENV.get_template(kernel.template).render(**context)
    return RenderedKernel(kernel, source, t_hash)


def render_spec(spec: MoeSpec) -> list[RenderedKernel]:
    return [render_kernel(spec, k) for k in enumerate_kernels(spec)]


def build_manifest(spec: MoeSpec, rendered: list[RenderedKernel]) -> dict:
    return {
        "generator": "ferrum-gen",
        "generator_version": __version__,
        "spec_name": spec.name,
        "spec_hash": spec.spec_hash(),
        "spec": spec.model_dump(mode="json"),
        "kernels": [r.kernel.manifest_entry(r.source_sha256, r.template_sha256) for r in rendered],
    }


def manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def bundle_files(spec: MoeSpec) -> dict[str, str]:
    """Every file of the bundle, name -> text: what `generate` writes, byte for byte."""
    rendered = render_spec(spec)
    files = {r.filename: r.source for r in rendered}
    files[MANIFEST] = manifest_text(build_manifest(spec, rendered))
    return files


class OutputDirError(ValueError):
    """A directory `generate` must not write into as asked; the message names it and the way out."""


def _is_plain_file_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def previous_bundle_files(spec: MoeSpec, out_root: Path, force: bool = False) -> set[str]:
    """The files an earlier generation wrote into <out_root>/<spec.name>/, which may be replaced or removed.

    Reads only; raises OutputDirError when the directory is not one `generate` may write:
    something other than a directory, a non-empty directory that no ferrum-gen manifest
    describes (its files are someone else's), or the bundle of another spec (unless `force`).
    """
    bundle = Path(out_root) / spec.name
    if not bundle.exists() and not bundle.is_symlink():
        return set()
    if not bundle.is_dir():
        raise OutputDirError(
            f"{bundle} exists and is not a directory: the bundle of spec {spec.name!r} goes there; "
            "move it away or give another --out"
        )
    manifest_path = bundle / MANIFEST
    if not manifest_path.exists():
        entries = sorted(p.name for p in bundle.iterdir())
        if not entries:
            return set()
        raise OutputDirError(
            f"{bundle} is not empty ({len(entries)} entries, e.g. {entries[0]!r}) and has no ferrum-gen "
            f"{MANIFEST}, so its files are not ferrum-gen's to replace: give another --out, or rename the spec "
            "so that its bundle gets a directory of its own"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        listed = [k["file"] for k in manifest["kernels"]] if manifest.get("generator") == "ferrum-gen" else None
        old_hash, old_name = str(manifest.get("spec_hash")), str(manifest.get("spec_name"))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError):
        listed = None
    if listed is None:
        raise OutputDirError(
            f"{manifest_path} is not a ferrum-gen manifest (unreadable, or not written by ferrum-gen), so the "
            f"files in {bundle} are not ferrum-gen's to replace: give another --out, or, if it is a damaged "
            "bundle, delete the directory and generate again"
        )
    if old_hash != spec.spec_hash() and not force:
        raise OutputDirError(
            f"{bundle} holds the bundle of spec {old_name[:80]!r} (spec hash {old_hash[:12]}), not of spec "
            f"{spec.name!r} (spec hash {spec.spec_hash()[:12]}): generating would replace its files. "
            "Give the spec another name or use another --out, or pass --force to replace that bundle"
        )
    return {MANIFEST} | {name for name in listed if _is_plain_file_name(name)}


def write_bundle(spec: MoeSpec, out_root: Path, force: bool = False) -> Path:
    """Write <out_root>/<spec.name>/.

    Only files that the directory's previous ferrum-gen manifest lists are ever replaced or
    removed (kernels that are no longer generated); a directory without one must be empty,
    and one holding another spec's bundle is replaced only with `force`.
    """
    bundle = Path(out_root) / spec.name
    files = bundle_files(spec)
    previous = previous_bundle_files(spec, out_root, force)
    created = not bundle.exists()
    bundle.mkdir(parents=True, exist_ok=True)
    try:
        for stale in sorted(previous - set(files)):
            (bundle / stale).unlink(missing_ok=True)
        for name, text in files.items():
            path = bundle / name
            if not path.is_file() or path.read_text() != text:
                write_atomic(path, text.encode())
    except BaseException:
        if created:  # a half-written new bundle is worse than none
            shutil.rmtree(bundle, ignore_errors=True)
        raise
    return bundle
