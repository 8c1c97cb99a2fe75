"""Render a spec's kernels into CUDA sources and write the bundle: <out>/<spec>/*.cu + manifest.json."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import jinja2
from jinja2 import meta

from . import __version__
from .compile import write_atomic
from .enumerate import enumerate_kernels
from .families.base import KernelSpec
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


def write_bundle(spec: MoeSpec, out_root: Path) -> Path:
    """Write <out_root>/<spec.name>/; stale .cu files from an earlier generation are removed."""
    bundle = Path(out_root) / spec.name
    bundle.mkdir(parents=True, exist_ok=True)
    files = bundle_files(spec)
    for stale in bundle.glob("*.cu"):
        if stale.name not in files:
            stale.unlink()
    for name, text in files.items():
        path = bundle / name
        if not path.exists() or path.read_text() != text:
            write_atomic(path, text.encode())
    return bundle
