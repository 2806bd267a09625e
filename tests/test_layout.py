"""The package's imports point one way: tools -> training -> reports -> the run folder ->
pretrained -> inputs -> data and models. No cycles, no reaching into another module's
private names.

Walks every module's imports (function-level ones included) with `ast`, so it
needs neither the imports to run nor TensorFlow or JAX to load.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "vit_jax_ft"

# (group, rank, module prefixes). A module may import modules of a lower rank
# and of its own group; the first matching prefix (most specific first) wins.
LAYERS = (
    ("export", 4, ("vit_jax_ft.pretrained.hf_export", "vit_jax_ft.pretrained.__main__")),
    ("tools", 6, ("vit_jax_ft.main", "vit_jax_ft.evaluate", "vit_jax_ft.predict",
                  "vit_jax_ft.explain", "vit_jax_ft.sweep", "vit_jax_ft.probe", "vit_jax_ft.cli",
                  "vit_jax_ft.compare", "vit_jax_ft.cv")),
    ("training", 5, ("vit_jax_ft.training",)),
    ("reports", 4, ("vit_jax_ft.reports",)),
    ("run", 3, ("vit_jax_ft.workdir", "vit_jax_ft.checkpoints", "vit_jax_ft.base_config",
                "vit_jax_ft.config_ranges")),
    ("pretrained", 2, ("vit_jax_ft.pretrained",)),
    ("inputs", 1, ("vit_jax_ft.inputs",)),
    ("data", 0, ("vit_jax_ft.data",)),
    ("models", 0, ("vit_jax_ft.models",)),
    ("root", 0, ("vit_jax_ft",)),
)
# Command-line entry points may defer imports so that --help answers fast.
LAZY_OK = {"vit_jax_ft.main", "vit_jax_ft.sweep", "vit_jax_ft.data.prepare"}


def _modules() -> dict[str, pathlib.Path]:
  found = {}
  for path in PACKAGE.rglob("*.py"):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    found[".".join(parts)] = path
  return found


MODULES = _modules()


def _layer(module: str) -> tuple[str, int]:
  for group, rank, prefixes in LAYERS:
    if any(module == p or module.startswith(p + ".") for p in prefixes):
      return group, rank
  raise AssertionError(f"{module} is in no layer of tests/test_layout.py: add it there.")


def _imports(module: str) -> list[tuple[str, int, bool, str]]:
  """(imported module, line, at top level, imported name) for each of our imports."""
  path = MODULES[module]
  tree = ast.parse(path.read_text(), str(path))
  top = {id(node) for node in tree.body}
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [(a.name, "") for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      names = [(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base, a.name)
               for a in node.names]
    else:
      continue
    for name, imported in names:
      if name.split(".")[0] == "vit_jax_ft":
        found.append((name, node.lineno, id(node) in top, imported))
  return found


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_has_a_layer():
  for module in MODULES:
    _layer(module)


def test_imports_point_down_the_layers():
  bad = []
  for module, imports in GRAPH.items():
    group, rank = _layer(module)
    for target, line, _, _ in imports:
      target_group, target_rank = _layer(target)
      if target_rank > rank or (target_rank == rank and target_group != group
                                and target_group != "root"):
        bad.append(f"{module}:{line} ({group}) imports {target} ({target_group})")
  assert not bad, "Upward or sideways imports:\n" + "\n".join(bad)


def test_no_import_cycles():
  edges = {m: sorted({t for t, *_ in imports if t in MODULES and t != m and
                      not m.startswith(t + ".")})  # A package's __init__ runs first anyway.
           for m, imports in GRAPH.items()}
  state, stack, cycles = {}, [], []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in edges[node]:
      if state.get(nxt) == "open":
        cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
      elif nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = "done"

  for module in sorted(edges):
    if module not in state:
      visit(module)
  assert not cycles, "Import cycles:\n" + "\n".join(cycles)


def test_lazy_imports_only_in_entry_points():
  lazy = [f"{m}:{line} imports {t} inside a function" for m, imports in GRAPH.items()
          for t, line, at_top, _ in imports if not at_top and m not in LAZY_OK]
  assert not lazy, "\n".join(lazy)


def test_no_private_names_of_other_modules():
  bad = []
  for module, path in MODULES.items():
    tree = ast.parse(path.read_text(), str(path))
    aliases = {}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vit_jax_ft"):
        for a in node.names:
          if a.name.startswith("_"):
            bad.append(f"{module}:{node.lineno} imports {node.module}.{a.name}")
          aliases[a.asname or a.name] = a.name
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
          and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
          and node.value.id in aliases):
        bad.append(f"{module}:{node.lineno} uses {node.value.id}.{node.attr}")
  assert not bad, "Private names used across modules:\n" + "\n".join(bad)


def test_readme_layout_lists_every_folder():
  readme = (PACKAGE.parent / "README.md").read_text()
  layout = readme[readme.index("## Layout"):]
  folders = sorted(p.name for p in PACKAGE.iterdir()
                   if p.is_dir() and (p / "__init__.py").exists())
  missing = [f for f in folders if f"{f}/" not in layout]
  assert not missing, f"README's Layout section does not describe {missing}"
  assert "evaluators/" not in layout, "README's Layout still names the old evaluators/ folder"
