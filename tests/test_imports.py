"""The package's import graph (every import statement, top-level or inside a function) has no
cycles, so each module can be read and tested after the ones it depends on."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "linnaeus_jax"


def _modules() -> dict[str, str]:
  """{dotted module name: path} of every module in the package (packages by their __init__)."""
  out = {}
  for folder, _, files in os.walk(os.path.join(ROOT, PKG)):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
        out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(folder, f)
  return out


def import_graph() -> dict[str, set[str]]:
  """{module: package modules it imports}; `from a import b` counts as a.b when that is a module."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    deps = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
      if isinstance(node, ast.Import):
        deps.update(a.name for a in node.names if a.name in modules)
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        for a in node.names:
          full = f"{node.module}.{a.name}"
          deps.add(full if full in modules else node.module)
    graph[name] = {d for d in deps if d in modules and d != name}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle as [a, b, ..., a], or None (depth-first search with three colours)."""
  colour, stack = {}, []

  def visit(n):
    colour[n] = 1
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      if colour.get(m) == 1:
        return stack[stack.index(m):] + [m]
      if m not in colour and (cycle := visit(m)):
        return cycle
    colour[n] = 2
    stack.pop()
    return None

  for n in sorted(graph):
    if n not in colour and (cycle := visit(n)):
      return cycle
  return None


def test_find_cycle_finds_a_hand_made_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None


def test_the_package_has_no_import_cycles():
  graph = import_graph()
  assert {"linnaeus_jax.train", "linnaeus_jax.state", "linnaeus_jax.evaluate"} <= set(graph)
  assert "linnaeus_jax.state" in graph["linnaeus_jax.train"]  # the graph sees real imports
  cycle = find_cycle(graph)
  assert cycle is None, " -> ".join(cycle)
  assert "linnaeus_jax.train" not in graph["linnaeus_jax.evaluate"]
