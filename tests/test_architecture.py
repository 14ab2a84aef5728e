"""The package's layering, read from its source (no imports run): every module's `import` statements,
at module level and inside functions, form a graph that must have no cycle and no edge pointing up
the layer map of docs/ARCHITECTURE.md:

    math (pro_jax.pro)  <  models / data / configs / sharding  <  engine (pro_jax.train, model sources)
                        <  stages (pro_jax.stages)  <  CLI (pro_jax.cli, the lazy public API)

The math layer imports only jax, numpy and the standard library; imports of pro_jax modules sit at the
top of their module (so the graph a reader sees is the graph Python runs); no import is renamed to a
single letter (`from pro_jax.pro import ops as o`), so a reader sees which module a name comes from.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pro_jax"

# module-name prefix -> layer (the longest matching prefix wins); lower layers never import higher ones
LAYERS = {
    "pro_jax.pro": 0,  # the PRO math: pure functions over arrays
    "pro_jax._lazy": 1,
    "pro_jax.configs": 1,
    "pro_jax.sharding": 1,
    "pro_jax.data": 1,
    "pro_jax.models": 1,
    "pro_jax.models.sources": 2,  # model sources load pro-jax checkpoints: engine level
    "pro_jax.train": 2,
    "pro_jax.stages": 3,
    "pro_jax.cli": 4,
    "pro_jax": 4,  # the package itself: the lazy public API over every layer
}
LAYER_NAMES = {0: "math", 1: "models/data", 2: "engine", 3: "stages", 4: "CLI"}
# pro_jax modules that may be imported inside a function: they pull in a heavy optional dependency
LAZY_OK = {"pro_jax.data.sources": "tensorflow_datasets, needed for real data sets only"}
MATH_THIRD_PARTY = {"jax", "numpy"}
# one-letter import aliases that are a convention, not an abbreviation of a module
ONE_LETTER_OK = {("jax.sharding", "PartitionSpec", "P")}


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def all_modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
  best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
  return LAYERS[best]


def imports(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> list[tuple[str, int, bool]]:
  """(imported name, line, at module top) for every import statement of the file; pro_jax names are
  resolved to the module they load (`from pro_jax.stages import rm` -> pro_jax.stages.rm)."""
  tree = ast.parse(path.read_text(), str(path))
  top = {id(n) for n in tree.body}
  for node in tree.body:  # `if TYPE_CHECKING:` / try blocks at module level count as top
    if isinstance(node, (ast.If, ast.Try)):
      top.update(id(n) for n in ast.walk(node))
  package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(a.name, node.lineno, id(node) in top) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
      for a in node.names:
        full = f"{base}.{a.name}"
        out.append((full if full in modules else base, node.lineno, id(node) in top))
  return out


def graph() -> dict[str, list[tuple[str, int, bool]]]:
  modules = all_modules()
  return {name: [(m, line, at_top) for m, line, at_top in imports(path, modules) if m in modules]
          for name, path in modules.items()}


def test_the_layer_map_covers_every_module():
  for name in all_modules():
    assert layer(name) in LAYER_NAMES, name


def test_no_module_imports_a_higher_layer():
  bad = sorted({f"{src} ({LAYER_NAMES[layer(src)]}) line {line} imports {dst} ({LAYER_NAMES[layer(dst)]})"
                for src, edges in graph().items() for dst, line, _ in edges if layer(dst) > layer(src)})
  assert not bad, "upward imports:\n  " + "\n  ".join(bad)


def test_no_import_cycles():
  edges = {src: sorted({dst for dst, _, _ in out if dst != src}) for src, out in graph().items()}
  index, low, on_stack, stack, cycles = {}, {}, set(), [], []

  def visit(v):  # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in edges[v]:
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
        cycles.append(sorted(component))

  sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
  for v in edges:
    if v not in index:
      visit(v)
  assert not cycles, f"import cycles: {cycles}"


def test_package_imports_sit_at_module_top():
  bad = sorted({f"{src} line {line}: {dst}" for src, edges in graph().items() for dst, line, at_top in edges
                if not at_top and dst not in LAZY_OK})
  assert not bad, "pro_jax imports inside functions (move them to the module's top):\n  " + "\n  ".join(bad)


def test_the_math_layer_imports_only_jax_numpy_and_the_standard_library():
  modules = all_modules()
  bad = []
  for name, path in modules.items():
    if layer(name) != 0:
      continue
    for imported, line, _ in imports(path, modules):
      root = imported.split(".")[0]
      if imported.startswith("pro_jax"):
        ok = layer(imported) == 0
      else:
        ok = root in MATH_THIRD_PARTY or root in sys.stdlib_module_names or root == "__future__"
      if not ok:
        bad.append(f"{name} line {line}: {imported}")
  assert not bad, "the math layer imports more than jax / numpy / stdlib:\n  " + "\n  ".join(bad)


def test_no_one_letter_import_aliases():
  bad = []
  for name, path in all_modules().items():
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        for a in node.names:
          key = (getattr(node, "module", None) or "", a.name, a.asname)
          if a.asname is not None and len(a.asname) == 1 and key not in ONE_LETTER_OK:
            bad.append(f"{name} line {node.lineno}: {a.name} as {a.asname}")
  assert not bad, "one-letter import aliases (use the module's name):\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("planted", ["upward", "cycle", "alias"])
def test_the_check_can_fail(planted, tmp_path, monkeypatch):
  """The checks see a planted violation (a lower layer importing a stage; a two-module circle; a
  one-letter alias)."""
  global PACKAGE, ROOT
  pkg = tmp_path / "pro_jax"
  (pkg / "pro").mkdir(parents=True)
  (pkg / "stages").mkdir()
  for d in (pkg, pkg / "pro", pkg / "stages"):
    (d / "__init__.py").write_text("")
  if planted == "upward":
    (pkg / "pro" / "ops.py").write_text("def f():\n  from pro_jax.stages import pipeline\n")
    (pkg / "stages" / "pipeline.py").write_text("")
    check = test_no_module_imports_a_higher_layer
  elif planted == "alias":
    (pkg / "pro" / "ops.py").write_text("")
    (pkg / "stages" / "a.py").write_text("from pro_jax.pro import ops as o\n")
    check = test_no_one_letter_import_aliases
  else:
    (pkg / "stages" / "a.py").write_text("from pro_jax.stages import b\n")
    (pkg / "stages" / "b.py").write_text("def g():\n  import pro_jax.stages.a\n")
    check = test_no_import_cycles
  monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
  monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
  with pytest.raises(AssertionError):
    check()
