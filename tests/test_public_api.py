"""The public names users' code imports (a contract: README "Python API"), and the package's import graph."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

PUBLIC = {
    "nfvi": ["__version__", "load_model"],
    "nfvi.flows": ["build_flow", "FLOW_KINDS", "Flow", "FlowDistribution", "rsample_and_log_prob"],
    "nfvi.transforms": ["PlanarTransform", "RadialTransform", "AdditiveCouplingTransform", "planar_u_hat"],
    "nfvi.distributions": ["FlowDistribution"],
    "nfvi.energies": ["ENERGIES"],
    "nfvi.evaluate": ["log_marginal_likelihood", "elbo", "nats_to_bits_per_dim"],
    "nfvi.estimators": ["log_marginal_likelihood", "elbo", "nats_to_bits_per_dim"],
    "nfvi.errors": ["NfviError"],
    "nfvi.data": ["load_dataset"],
    "nfvi.records": ["export_record", "redraw"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_import(module):
    mod = importlib.import_module(module)
    missing = [name for name in PUBLIC[module] if not hasattr(mod, name)]
    assert not missing, f"{module} lost {missing}"


def test_nfvi_error_is_a_value_error():
    from nfvi.errors import NfviError

    assert issubclass(NfviError, ValueError)


def test_load_model_passes_which_and_device_on():
    import nfvi

    params = inspect.signature(nfvi.load_model).parameters
    assert list(params) == ["run_dir", "which", "device"]
    assert params["which"].default == "best" and params["device"].default == "cpu"


def _imports(path: Path) -> set[str]:
    """The ``nfvi.*`` modules a file imports, deferred imports inside functions included (not the type hints'
    ``if TYPE_CHECKING:`` imports, which never run)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("nfvi"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("nfvi"))
    return found


def test_no_import_cycles():
    root = Path(__file__).resolve().parents[1] / "nfvi"
    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}
    for name, deps in graph.items():  # a package's __init__ re-exporting its own modules is not a cycle
        if modules[name].name == "__init__.py":
            deps.difference_update({m for m in deps if m.startswith(name + ".")})

    def visit(node, stack, seen):
        if node in stack:
            return stack[stack.index(node) :] + [node]
        if node in seen:
            return None
        seen.add(node)
        for dep in sorted(graph[node]):
            cycle = visit(dep, [*stack, node], seen)
            if cycle:
                return cycle
        return None

    seen: set[str] = set()
    for name in sorted(graph):
        cycle = visit(name, [], seen)
        assert cycle is None, " -> ".join(cycle)


def test_config_is_torch_free():
    """The data layer and the reports import nfvi.config without dragging in torch or the flows."""
    tree = ast.parse((Path(__file__).resolve().parents[1] / "nfvi" / "config.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {"torch", "nfvi.flows", "nfvi.training"} & names
