"""The package's layers, read from the imports: a library imports only its own layer or a lower
one, no library imports a command, and every module sits in a layer (docs/design.md, "Layers")."""

import ast
import pathlib

from tests import helpers

REPO = pathlib.Path(helpers.REPO)

LAYERS = (  # lowest first; a module may import its own layer and the ones before it
    ("config",),
    ("core",),
    ("data", "vqgan", "retrieval"),
    ("prepare", "sampling", "training", "io"),
    ("run", "__init__"),
    ("eval", "serving"),
    ("jobs",),
    ("cli", "commands"),
)
RANK = {place: rank for rank, places in enumerate(LAYERS) for place in places}


def is_command(path: pathlib.Path) -> bool:
  return path.parent.name == "cm3jax" and "__main__" in path.read_text()


def place(module: str, commands: set[str]) -> str:
  """The layer table's name for a module: its folder, or itself at the top level."""
  parts = module.split(".")[1:]
  if not parts:
    return "__init__"
  if parts[0] in commands:
    return "commands"
  return parts[0]


def imported_modules(path: pathlib.Path, module: str) -> set[str]:
  """Every cm3jax module the file imports, at its top or inside a function."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("cm3jax"))
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cm3jax"):
      found.update(f"{node.module}.{a.name}" if node.module == "cm3jax" else node.module
                   for a in node.names)
  return found - {module}


def package_imports() -> tuple[dict[str, set[str]], set[str]]:
  """{module: the cm3jax modules it imports} and the names of the commands."""
  root = REPO / "cm3jax"
  imports, commands = {}, set()
  for path in sorted(root.rglob("*.py")):
    parts = path.relative_to(REPO).with_suffix("").parts
    module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    imports[module] = imported_modules(path, module)
    if is_command(path):
      commands.add(parts[-1])
  return imports, commands


def violations(imports: dict[str, set[str]], commands: set[str]) -> list[str]:
  found = []
  for module, targets in imports.items():
    here = place(module, commands)
    if here not in RANK:
      found.append(f"{module} is in no layer (tests/test_layers.py LAYERS)")
      continue
    for target in sorted(targets):
      there = place(target, commands)
      if there == "commands":
        found.append(f"{module} imports the command {target}")
      elif there in RANK and RANK[there] > RANK[here]:
        found.append(f"{module} ({here}) imports {target} ({there}), a higher layer")
  return found


def test_no_import_runs_up_the_layers():
  imports, commands = package_imports()
  assert len(commands) == 14, sorted(commands)
  assert violations(imports, commands) == []


def test_the_check_sees_an_import_up_the_layers_and_of_a_command():
  imports = {"cm3jax.core.model": {"cm3jax.sampling.engine"},
             "cm3jax.training.train": {"cm3jax.sample"},
             "cm3jax.eval.reports": {"cm3jax.core.vocab"},
             "cm3jax.extras.x": set()}
  assert violations(imports, {"sample"}) == [
      "cm3jax.core.model (core) imports cm3jax.sampling.engine (sampling), a higher layer",
      "cm3jax.training.train imports the command cm3jax.sample",
      "cm3jax.extras.x is in no layer (tests/test_layers.py LAYERS)"]


def test_the_top_level_holds_only_commands_and_the_api():
  _, commands = package_imports()
  top = {p.stem for p in (REPO / "cm3jax").glob("*.py")}
  assert top - commands <= {"__init__", "cli", "config", "run"}, sorted(top - commands)
