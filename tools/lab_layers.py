"""An import-linter contract over the whole lab: ``lint-imports`` (pyproject.toml's [tool.importlinter]) runs it.

import-linter's own contracts see packages only (raclora, engine, fed, theory); the design card's files (main.py,
config.py, models.py, lora.py, data.py, train.py, ...) are top-level modules, which grimp cannot build a graph of.
This contract reads every lab module's imports itself (engine/provenance.py), puts them in a grimp graph, and
checks it with import-linter's layers contract, so that a broken layer is reported the usual way. It also fails on
- a cycle of imports anywhere (within a layer too),
- a project import inside a function (a cycle in hiding; lazy imports are for heavy optional libraries only),
- a lab module that no layer names (a new file must take its place in the picture).
"""
from __future__ import annotations

import grimp
from importlinter.application import output
from importlinter.contracts.layers import LayersContract
from importlinter.domain.contract import ContractCheck

from engine.provenance import imports, lab_modules


def lab_graph() -> grimp.ImportGraph:
    graph = grimp.ImportGraph()
    for name in lab_modules():
        graph.add_module(name)
    for i in imports():
        graph.add_import(importer=i.importer, imported=i.imported, line_number=i.line, line_contents="import")
    return graph


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The import loops of ``graph``: its strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.find_modules_directly_imported_by(v)):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph.modules):
        if v not in index:
            visit(v)
    return out


class LabLayersContract(LayersContract):
    type_name = "lab_layers"

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        lab = lab_graph()
        check = super().check(lab, verbose)
        listed = {tail.name for layer in self.layers for tail in layer.module_tails}
        packages = {m for m in lab.modules if any(other.startswith(m + ".") for other in lab.modules)}
        unlisted = sorted(m for m in lab.modules - listed - packages
                          if not any(m.startswith(p + ".") for p in listed))
        hidden = [i for i in imports() if i.in_function]
        loops = cycles(lab)
        check.metadata.update(unlisted=unlisted, hidden=hidden, cycles=loops)
        check.kept = check.kept and not (unlisted or hidden or loops)
        return check

    def render_broken_contract(self, check: ContractCheck) -> None:
        super().render_broken_contract(check)
        for loop in check.metadata["cycles"]:
            output.print_error(f"These modules import each other in a loop: {', '.join(loop)}", bold=False)
        for i in check.metadata["hidden"]:
            output.print_error(f"{i.importer} imports {i.imported} inside a function (line {i.line}): import it at "
                               f"the top, or move what both need to a lower layer", bold=False)
        for m in check.metadata["unlisted"]:
            output.print_error(f"{m} is in no layer: add it to a layer of this contract (pyproject.toml)", bold=False)
