"""nvcc compiles every shipped spec's generated CUDA: sm_90 for every spec, every target arch
for qwen3moe. CI has nvcc 13.0 and no GPU; without nvcc these tests fail and say why
(FERRUM_SKIP_NVCC=1 turns that into a visible skip, for machines known to lack it). On sm_90 the
machine code (cuobjdump, from the dev extras) is read for what the source cannot show: which loads
ptxas issues before a kernel's griddepcontrol.wait."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from ferrum_gen.compile import ARCH_SPECIFIC
from ferrum_gen.families.base import SMEM_LIMIT, Arg
from ferrum_gen.families.stream import SMEM_RESERVED_PER_CTA
from ferrum_gen.render import render_spec, write_bundle
from ferrum_gen.spec import Arch, MoeSpec, load_spec, shipped_spec_names

pytestmark = pytest.mark.nvcc

ALL_ARCHS_SPEC = "qwen3moe"
CASES = [(name, Arch.SM_90.value) for name in shipped_spec_names()] + [
    (ALL_ARCHS_SPEC, arch.value) for arch in load_spec(ALL_ARCHS_SPEC).target_archs if arch is not Arch.SM_90
]


def _toolkit_binary(name: str) -> str | None:
    """A CUDA toolkit program on PATH, else in /usr/local/cuda/bin."""
    return shutil.which(name) or next((p for p in (f"/usr/local/cuda/bin/{name}",) if os.path.exists(p)), None)


def _nvcc() -> str:
    nvcc = _toolkit_binary("nvcc")
    if nvcc is None:
        if os.environ.get("FERRUM_SKIP_NVCC") == "1":
            pytest.skip("nvcc not found and FERRUM_SKIP_NVCC=1: generated CUDA NOT compiled")
        pytest.fail("nvcc not found on PATH: the generated CUDA cannot be compile-checked. Install the CUDA "
                    "toolkit (CI has nvcc 13.0), or set FERRUM_SKIP_NVCC=1 to skip this check explicitly")
    return nvcc


def _compile(nvcc: str, source: Path, arch: str, out_dir: Path) -> tuple[Path, int, str]:
    # the target the bundle compiles for (sm_90a on Hopper): -gencode, as nvcc 13.0's -arch=sm_90a
    # also runs a plain sm_90 pass
    target = ARCH_SPECIFIC.get(arch, arch)
    gencode = f"-gencode=arch=compute_{target[3:]},code={target}"
    cmd = [nvcc, gencode, "-cubin", "--Werror", "all-warnings", "-o", str(out_dir / (source.stem + ".cubin")),
           str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return source, proc.returncode, proc.stdout + proc.stderr


@dataclass(frozen=True)
class Compiled:
    spec: MoeSpec
    arch: str
    out_dir: Path
    sources: list[Path]
    failures: list[str]


@pytest.fixture(scope="module", params=CASES, ids=[f"{s}-{a}" for s, a in CASES])
def compiled(request, tmp_path_factory) -> Compiled:
    """A spec's bundle written and compiled once for both tests of its case."""
    spec_name, arch = request.param
    nvcc = _nvcc()
    spec = load_spec(spec_name)
    assert arch in {a.value for a in spec.target_archs}
    out_dir = tmp_path_factory.mktemp(f"{spec_name}-{arch}")
    bundle = write_bundle(spec, out_dir)
    sources = sorted(bundle.glob("*.cu"))
    assert sources
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(lambda s: _compile(nvcc, s, arch, out_dir), sources))
    failures = [f"{src.name} ({arch}): exit {rc}\n{log}" for src, rc, log in results if rc != 0]
    return Compiled(spec, arch, out_dir, sources, failures)


def test_generated_cuda_compiles_with_nvcc(compiled: Compiled) -> None:
    assert not compiled.failures, "\n\n".join(compiled.failures)
    for src in compiled.sources:
        assert (compiled.out_dir / (src.stem + ".cubin")).stat().st_size > 0


def test_every_kernels_ring_fits_the_sm_beside_its_static_shared_memory(compiled: Compiled) -> None:
    """The families size a kernel's dynamic shared memory (its ring) from an estimate of the static shared memory
    ptxas gives it (families/stream.py static_smem); a wrong estimate shows only at launch, as a kernel that cannot
    start. So each kernel's static shared memory, read from its cubin, plus its dynamic shared memory on this arch
    fits the SM at its CTAs an SM."""
    assert not compiled.failures, "the bundle does not compile (test_generated_cuda_compiles_with_nvcc)"
    cuobjdump = _cuobjdump()
    arch = Arch(compiled.arch)
    checked, over = 0, []
    for rendered in render_spec(compiled.spec):
        kern = rendered.kernel
        dynamic = kern.launch.get("smem_bytes")
        if not isinstance(dynamic, dict) or arch.value not in dynamic:
            continue
        usage = subprocess.run([cuobjdump, "-res-usage", str(compiled.out_dir / f"{kern.uri}.cubin")],
                               capture_output=True, text=True, check=True).stdout
        static = int(re.search(r"SHARED:(\d+)", usage).group(1))
        ctas = kern.launch.get("ctas_per_sm", 1)
        per_cta = static + dynamic[arch.value] + SMEM_RESERVED_PER_CTA
        if ctas * per_cta > SMEM_LIMIT[arch] + SMEM_RESERVED_PER_CTA:
            over.append(f"{kern.uri}: {ctas} x ({static} static + {dynamic[arch.value]} dynamic + reserved)")
        checked += 1
    assert checked, "no kernel with dynamic shared memory checked"
    assert not over, "shared memory over the SM's:\n" + "\n".join(over)


ALIGN_OUTPUTS = frozenset({"sorted_ids", "block_expert", "block_a_row", "plan"})
READ_BEFORE_WAIT = {"stream_down": ALIGN_OUTPUTS, "gemm_down": ALIGN_OUTPUTS,
                    "grouped_down_combine": frozenset({"ids", "weights"})}
"""What a family may load before its wait on purpose: the downs start only once the gate+up kernel ahead of
them has passed its own wait, so align (and the router) are done by then."""
STARTS_BEFORE_ALIGN_ENDS = frozenset({"gather_x", "stream_gate_up_silu", "gemm_gate_up_silu"})


def test_kernels_load_what_a_kernel_ahead_hands_them_only_after_the_wait(compiled: Compiled) -> None:
    """A kernel launched as a programmatic dependent may start while the kernels ahead of it still write what they
    hand it (align lets its dependents launch before it writes the plan, gather_x before its own wait, the router
    before it writes ids). Through a const __restrict__ pointer the loads are ld.global.nc, which ptxas may issue
    before griddepcontrol.wait (it did for gather_x's plan loads, and graph replays read the last call's plan).
    So the machine code of every sm_90 kernel that waits is checked for loads, ahead of its first wait, through
    an argument another kernel of the bundle writes or an address computed from one (READ_BEFORE_WAIT excepted);
    and align's outputs, in the kernels that may start before align ends, are declared written ahead (plain
    pointers, whose loads ptxas keeps behind the wait)."""
    if compiled.arch != Arch.SM_90.value:
        pytest.skip("griddepcontrol.wait is sm_90's: no dependent launches on the other archs")
    assert not compiled.failures, "the bundle does not compile (test_generated_cuda_compiles_with_nvcc)"
    cuobjdump = _cuobjdump()
    rendered_all = render_spec(compiled.spec)
    written = {a.name for r in rendered_all for a in r.kernel.args
               if a.ctype.endswith("*") and not a.ctype.startswith("const ")}
    checked, early = [], []
    for rendered in rendered_all:
        kern = rendered.kernel
        handed = frozenset(a.name for a in kern.args if a.ctype.startswith("const ") and a.name in written)
        handed -= READ_BEFORE_WAIT.get(kern.family, frozenset())
        if any(a.name == "plan_ready" for a in kern.args):  # a mixed variant's gate+up: where set, the plan is done
            handed -= {"plan"}
        if kern.family in STARTS_BEFORE_ALIGN_ENDS:
            restricted = [a.name for a in kern.args if a.name in handed & ALIGN_OUTPUTS and not a.written_ahead]
            assert not restricted, f"{kern.uri}: {restricted} not declared written ahead (families/base.py Arg)"
        if not handed:
            continue
        sass = subprocess.run([cuobjdump, "-sass", str(compiled.out_dir / f"{kern.uri}.cubin")],
                              capture_output=True, text=True, check=True).stdout
        if "ACQBULK" not in sass:  # launched plainly (no wait): the stream order already holds
            continue
        checked.append(kern.family)
        early += [f"{kern.uri}: {load}" for load in loads_before_wait(sass, param_offsets(kern.args, handed))]
    assert not early, "loads of a kernel ahead's output before griddepcontrol.wait:\n" + "\n".join(early)
    for family in ("gather_x", "stream_gate_up_silu", "align"):
        if any(r.kernel.family == family for r in rendered_all):
            assert family in checked, f"no {family} kernel waits: nothing checked there"


PARAM_BASE = 0x210
"""Where sm_90 kernels' parameters start in constant bank 0."""


def param_offsets(args: tuple[Arg, ...], names: frozenset[str]) -> dict[int, str]:
    """Constant-bank offsets of the named arguments (pointers 8 bytes, ints 4, each aligned to its size)."""
    offsets, at = {}, PARAM_BASE
    for arg in args:
        size = 8 if arg.ctype.endswith("*") else 4
        assert arg.ctype.endswith("*") or arg.ctype == "int", f"{arg}: size unknown here"
        at = -(-at // size) * size
        if arg.name in names:
            offsets[at] = arg.name
        at += size
    return offsets


_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][\w.]*)\s*([^;]*);")
_REGISTER = re.compile(r"\bU?R\d+\b")
_PARAM = re.compile(r"c\[0x0\]\[(0x[0-9a-f]+)\]")


def loads_before_wait(sass: str, params: dict[int, str]) -> list[str]:
    """Global loads, before the first ACQBULK (griddepcontrol.wait) in program order, whose address derives from
    one of `params` (by constant-bank offset): registers loaded from those parameters taint every register
    an instruction writes from them."""
    tainted: dict[str, str] = {}
    found = []
    for op, operands in ((m.group(2), m.group(3)) for m in _INSTRUCTION.finditer(sass)):
        if op == "ACQBULK":
            return found
        regs = _REGISTER.findall(operands)
        if op.startswith("LDG") and not op.startswith(("LDGSTS", "LDGDEPBAR")):
            address = operands[operands.index("["):] if "[" in operands else ""
            sources = {tainted[r] for r in _REGISTER.findall(address) if r in tainted}
            if sources:
                found.append(f"{op} {operands}  (from {', '.join(sorted(sources))})")
        first = operands.split(",")[0].strip()
        if not _REGISTER.fullmatch(first):  # no register written (a predicate, a store's address)
            continue
        dst, srcs = first, regs[1:]
        param = _PARAM.search(operands)
        names = {tainted[r] for r in srcs if r in tainted}
        if param and int(param.group(1), 16) in params:
            names.add(params[int(param.group(1), 16)])
        wide = ".64" in op or "WIDE" in op  # a register pair: dst and the next one
        for reg in [dst, re.sub(r"\d+$", lambda n: str(int(n.group()) + 1), dst)] if wide else [dst]:
            if names:
                tainted[reg] = ", ".join(sorted(names))
            else:
                tainted.pop(reg, None)
    return found


def _cuobjdump() -> str:
    """cuobjdump from the nvidia-cuda-cuobjdump wheel (the dev extras; it runs nvdisasm, from its wheel, beside
    it), else the CUDA toolkit's."""
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations if spec else []):
        for candidate in sorted(Path(root).glob("cu*/bin/cuobjdump")):
            return str(candidate)
    found = _toolkit_binary("cuobjdump")
    if found is None:
        pytest.fail("cuobjdump not found: install the dev extras (pip install -e '.[dev]' brings "
                    "nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm)")
    return found
