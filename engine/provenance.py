"""What explains a result row: the code that made it and the machine it ran on.

``code_fingerprint(study_module)``: a hash of the source of the study's module and of every project module it
imports, directly or through others, found by reading their imports (so a study's fingerprint can miss no module
it runs, and no list of modules is kept by hand). ``provenance(device)``: the hardware (CPU model or GPU name),
the torch version, the threads and the BLAS/oneDNN backend, recorded in every runs row (PROVENANCE_COLUMNS).
The same reading of the imports gives tools/lab_layers.py its picture of the layers.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent  # the lab's folder: the design card's files and the packages
SKIP = {"tests", "bench", "tools", "docs", "data", "plots", "results", "shared"}  # not lab modules (or not code)
PROVENANCE_COLUMNS = {"hardware": str, "torch_version": str, "threads": int, "blas": str}  # provenance()'s


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name, e.g. "engine.stack"
    imported: str  # the project module it names (a package's __init__ for "from fed import x")
    line: int
    in_function: bool  # inside a def: hidden from a reader of the module's head


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def lab_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every project module: the top-level .py files and the packages beside them, tests and scripts' folders left out."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in SKIP or rel.parts[0].startswith(".") or any(p.startswith(".") for p in rel.parts):
            continue
        if len(rel.parts) > 1 and not (root / rel.parts[0] / "__init__.py").exists():
            continue
        found[module_name(path, root)] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module that ``name`` (or its longest known prefix) is; None for an outside library."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def file_imports(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """The imports of the module ``name`` (source ``path``) that name one of ``modules``, in source order."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - child.level + 1] if package else []
                    base = ".".join([*up, base] if base else up)
                targets = [f"{base}.{a.name}" if base else a.name for a in child.names]
            for t in targets:
                hit = _resolve(t, modules)
                if hit and hit != name:
                    found.append(Import(name, hit, child.lineno, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def imports(root: Path = ROOT) -> list[Import]:
    """Every import of one lab module by another (lab_modules)."""
    modules = lab_modules(root)
    return [i for name, path in modules.items() for i in file_imports(name, path, modules)]


def imported_closure(module: str, root: Path = ROOT) -> dict[str, Path]:
    """``module`` (a lab module, "__main__" for the script being run, or any importable one, e.g. a test's) and
    every lab module it imports, directly or through others: {name: source file}, sorted by name."""
    modules = lab_modules(root)
    if module == "__main__":  # a study run as a script (python glue.py): its module's own name
        module = module_name(Path(sys.modules["__main__"].__file__).resolve(), root)
    if module in modules:
        start = modules[module]
    else:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ValueError(f"no source file for module {module!r}")
        start = Path(spec.origin)
    out, todo = {module: start}, [module]
    while todo:
        name = todo.pop()
        for i in file_imports(name, out[name], modules):
            if i.imported not in out:
                out[i.imported] = modules[i.imported]
                todo.append(i.imported)
    return dict(sorted(out.items()))


def code_fingerprint(module: str, root: Path = ROOT) -> str:
    """First 12 hex digits of the SHA-256 of the sources of imported_closure(module) (names as imported, e.g.
    "engine.stack"), in name order: what identifies the code that determines a study's numbers. Reading the
    imports takes milliseconds; it is done afresh at each call, so an edited file is always seen."""
    h = hashlib.sha256()
    for name, path in imported_closure(module, root).items():
        h.update(name.encode() + b"\0" + path.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return h.hexdigest()[:12]


def provenance(device: str) -> dict:
    """The machine a run was trained on, for its row: ``device`` is the run's device type ("cpu", "cuda", ...)."""
    if device == "cuda":
        hardware = torch.cuda.get_device_name()
    elif device == "mps":
        hardware = f"Apple {platform.machine()} (mps)"
    else:
        hardware = cpu_model()
    return dict(hardware=hardware, torch_version=torch.__version__, threads=torch.get_num_threads(), blas=blas())


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@functools.cache
def blas() -> str:
    """torch's BLAS, its oneDNN (mkldnn) version and the CPU kernels it dispatches to, from its build
    configuration: e.g. "mkl; oneDNN 3.12.0; AVX512"."""
    config = torch.__config__.show()
    info = re.search(r"BLAS_INFO=(\w+)", config)
    onednn = re.search(r"(?:MKL-DNN|oneDNN) v?([\d.]+)", config)
    kernels = re.search(r"CPU capability usage: (\w+)", config)
    parts = [info.group(1) if info else "unknown BLAS",
             f"oneDNN {onednn.group(1)}" if onednn and torch.backends.mkldnn.is_available() else "no oneDNN"]
    return "; ".join(parts + ([kernels.group(1)] if kernels else []))
