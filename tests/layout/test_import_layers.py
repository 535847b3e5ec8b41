"""Layers depend one way: every server module may import only its own layer or lower ones,
and the units of one layer import each other without cycles.

Imports are read with `ast` (nothing is imported), including imports inside functions and
"package.module:attribute" strings that registries import later. The layer order is the data
below; a module belongs to the entry with the longest matching prefix. A new package or
module must be given a place here, and an entry that matches nothing must go.
"""
from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: lowest first: (layer, module prefixes). Kernels <- layers <- moe <- model <- worker <- core <- front end <- rpc.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("server", "server.config", "server.registry")),  # frozen config, the generic Registry
    ("kernels", ("server.kernels",)),  # non-MoE kernels and the plumbing every kernel shares
    ("layers", ("server.layers",)),  # RMSNorm, activations, gated MLP, RoPE, paged attention
    ("moe kernels", ("server.moe.kernels",)),  # MoE and routing kernels
    ("routing", ("server.moe.routing",)),  # routing policies and their registry
    ("moe", ("server.moe",)),  # router rules, experts, dispatch, load counters, the MoE block
    ("eplb", ("server.moe.eplb",)),  # expert placement, replicas, rebalancing
    ("model", ("server.model",)),  # families, checkpoints, the decoder, decode CUDA graphs
    ("setup", ("server.routing_setup", "server.eplb_setup", "server.dispatch_setup",
               "server.launch_plan", "server.startup_checks")),  # config -> policy / placement / dispatch -> the launch plan
    ("engine api", ("server.engine",)),  # the engine's vocabulary, shared by every process
    ("rank worker", ("server.worker",)),  # one EP rank: model runner, buffers, sampler, rank start-up
    ("engine core", ("server.core",)),  # the engine-core process: CoreLoop, EngineCore, scheduler, executor
    ("front end", ("server.frontend",)),  # the front end's client of the core: requests, text, streams
    ("rpc", ("server.rpc",)),
    ("http front end", ("server.http",)),  # the OpenAI-compatible HTTP front end, on the rpc service
    ("entry points and tools", ("server.__main__", "server.cli", "server.launch", "server.dry_run",
                                "server.bench", "server.eval", "server.loadtest",
                                "server.moe.eplb.build_stats")),  # build_stats: a CLI that loads model configs
]

_TARGET = re.compile(r"^(server(?:\.\w+)+):\w+$")  # "server.pkg.module:attr" registry targets


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def server_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / "server").rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of dotted `name` that is a server module (None: not ours)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Server modules that `module` imports (anywhere in the file), by dotted name."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                head = ".".join(base + ([node.module] if node.module else []))
            else:
                head = node.module or ""
            names = [f"{head}.{alias.name}" for alias in node.names] or [head]
            names.append(head)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _TARGET.match(node.value)
            if match:
                names = [match.group(1)]
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def unit_of(module: str) -> tuple[int, str] | None:
    """(layer index, the LAYERS prefix it falls under), longest prefix first."""
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (index, prefix)
    return best


def import_graph() -> dict[str, set[str]]:
    modules = server_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def test_every_module_has_a_layer_and_every_entry_a_module() -> None:
    modules = server_modules()
    unplaced = sorted(m for m in modules if unit_of(m) is None)
    assert not unplaced, f"give these modules a layer in LAYERS: {unplaced}"
    prefixes = [p for _, group in LAYERS for p in group]
    stale = [p for p in prefixes if not any(m == p or m.startswith(p + ".") for m in modules)]
    assert not stale, f"LAYERS entries that match no module (remove them): {stale}"


def test_no_module_imports_a_higher_layer() -> None:
    bad = []
    for module, targets in import_graph().items():
        layer, _ = unit_of(module)
        for target in sorted(targets):
            other, _ = unit_of(target)
            if other > layer:
                bad.append(f"{module} ({LAYERS[layer][0]}) imports {target} ({LAYERS[other][0]})")
    assert not bad, "imports against the layer order:\n  " + "\n  ".join(bad)


def test_no_import_cycle_between_units() -> None:
    edges: dict[str, set[str]] = defaultdict(set)
    for module, targets in import_graph().items():
        src = unit_of(module)[1]
        for target in targets:
            dst = unit_of(target)[1]
            if dst != src:
                edges[src].add(dst)
    cycles = _cycles(edges)
    assert not cycles, "import cycles between packages: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_what_it_must(tmp_path: Path) -> None:
    """Controls: relative, lazy (in a function) and registry-string imports are all found, and
    an upward import or a cycle is reported."""
    modules = server_modules()
    graph = import_graph()
    assert "server.moe.kernels.ops" in graph["server.moe.experts"]  # from .kernels import ops
    assert "server.moe.kernels.greedy_route" in graph["server.moe.routing.greedy"]  # inside a function
    assert "server.moe.kernels.fused_moe" in graph["server.moe.kernels.ops"]  # "module:function" target
    assert _resolve("server.moe.routing.RoutingPolicy", modules) == "server.moe.routing"
    fake = tmp_path / "fake.py"
    fake.write_text("def f():\n    from ..model.causal_lm import MoECausalLM\n")
    found = imports_of("server.layers.fake", fake, modules)
    assert found == {"server.model.causal_lm"}
    assert unit_of("server.layers.fake")[0] < unit_of("server.model.causal_lm")[0]
    assert unit_of("server.moe.eplb.build_stats")[0] == len(LAYERS) - 1
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
