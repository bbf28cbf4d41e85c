"""Import rules between the modules (docs/architecture.md), read with ``ast``."""

import ast
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# I/O: files, processes and the checkpoint formats.
IO_MODULES = {
  "os",
  "io",
  "pathlib",
  "shutil",
  "glob",
  "tempfile",
  "subprocess",
  "pickle",
  "safetensors",
  "gguf",
  "orbax",
  "datasets",
  "tokenizers",
  "train.models.pretrained",
  "train.models.gguf_import",
  "train.models.tokenizer",
  "train.checkpoints",
  "train.data",
  "train.examples",
  "train.run_dir",
}


def imports(path: pathlib.Path) -> set[str]:
  """Every module ``path`` imports (also inside functions), with its parent packages."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      found = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    for name in found:
      parts = name.split(".")
      names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
  return names


def module_imports(module: str) -> set[str]:
  """What ``module`` (``train.x``) imports, directly or through other train modules."""
  seen, todo, result = set(), [module], set()
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    path = ROOT / (name.replace(".", "/") + ".py")
    if not path.exists():  # a name imported from a module, not a module
      continue
    direct = imports(path)
    result |= direct
    todo += [n for n in direct if n.startswith("train.")]
  return result


@pytest.mark.parametrize("path", sorted((ROOT / "gmt_optax").glob("*.py")), ids=lambda p: p.name)
def test_gmt_optax_imports_no_trainer(path):
  assert not imports(path) & {"train", "flax", "orbax", "datasets"}


def test_model_does_no_io():
  assert not module_imports("train.models.decoder") & IO_MODULES
  tree = ast.parse((ROOT / "train" / "models" / "decoder.py").read_text())
  assert not [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "open"]


def test_data_does_not_import_the_model():
  for module in ("train.data", "train.examples"):
    assert not module_imports(module) & {"train.models.decoder", "flax"}


def test_params_does_no_io():
  """The name table and model building work on ``(name, read)`` streams: formats read files."""
  assert not module_imports("train.models.params") & IO_MODULES


def test_no_import_cycle():
  """No ``train`` module reaches itself through its imports (also inside functions)."""
  for path in sorted((ROOT / "train").rglob("*.py")):
    if path.stem in ("__init__", "__main__"):
      continue
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    direct = {n for n in imports(path) if n.startswith("train.") and n != module}
    reached = set().union(*(module_imports(n) for n in direct)) if direct else set()
    assert module not in reached, f"{module} imports itself through {sorted(direct)}"


def test_the_module_map_names_every_module_and_no_other():
  """docs/architecture.md is the one module map: each module file has a row, each row a file."""
  text = (ROOT / "docs" / "architecture.md").read_text()
  named = set(re.findall(r"`((?:gmt_optax|train)/[\w/]+\.py)`", text))
  package_inits = {f"train/{p}/__init__.py" for p in ("models", "eval", "plan")}
  files = {
    str(p.relative_to(ROOT))
    for folder in ("gmt_optax", "train")
    for p in (ROOT / folder).rglob("*.py")
  }
  assert files - package_inits - named == set(), "modules missing from docs/architecture.md"
  assert named - files == set(), "docs/architecture.md names files that do not exist"


def test_the_sandbox_launcher_imports_the_standard_library_only():
  # It runs as a script with `python -I -S`: no site-packages and no `train` package.
  assert imports(ROOT / "train" / "eval" / "sandbox_launcher.py") <= sys.stdlib_module_names
