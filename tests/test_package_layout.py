"""The package's shape as a newcomer relies on it: imports run one way, the sharding rules and the layouts stay
below the model, no module grows past the size guideline, and `import tidar_jax` gives the public API."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tidar_jax"
MAX_LINES = 410  # the style guideline's ~400


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports (at any depth of its body, lazy imports included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tidar_jax"):
                for alias in node.names:  # `from pkg import module` names a module, else a symbol of node.module
                    found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                              else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("tidar_jax")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_between_modules():
    # The public face (tidar_jax/__init__.py) imports the top of the house; it is left out, as a user's import.
    graph = {k: v - {"tidar_jax"} for k, v in _imports().items() if k != "tidar_jax"}
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def test_lower_layers_do_not_import_upper_ones():
    graph = _imports()
    rules = {  # module prefix -> project prefixes it may never import
        "tidar_jax.layout": ("tidar_jax.",),
        "tidar_jax.sharding": ("tidar_jax.model", "tidar_jax.decoding", "tidar_jax.training"),
        "tidar_jax.ops": ("tidar_jax.model", "tidar_jax.decoding", "tidar_jax.training", "tidar_jax.evals"),
        "tidar_jax.config": ("tidar_jax.model", "tidar_jax.decoding", "tidar_jax.training", "tidar_jax.data"),
        "tidar_jax.model": ("tidar_jax.decoding", "tidar_jax.training", "tidar_jax.evals", "tidar_jax.interop"),
        "tidar_jax.decoding": ("tidar_jax.training", "tidar_jax.evals"),
        "tidar_jax.training": ("tidar_jax.evals",),
    }
    broken = [f"{mod} -> {dep}" for mod, deps in graph.items() for prefix, banned in rules.items()
              if mod.startswith(prefix) for dep in deps
              if dep.startswith(banned) and not dep.startswith(prefix)]
    assert not broken, broken


def test_modules_stay_under_the_size_guideline():
    long = {str(p.relative_to(ROOT)): n for p in [*PACKAGE.rglob("*.py"), *(ROOT / "infer").glob("*.py"),
                                                  *(ROOT / "train").glob("*.py")]
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_public_api_imports_cleanly():
    code = ("import tidar_jax; print(sorted(n for n in tidar_jax.__all__ if not hasattr(tidar_jax, n)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
