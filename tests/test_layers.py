"""The package's layers import only downward, and nothing in the library imports the lab.

LAYERS is the declared table (design.md "Layout"): a module may import its own
layer and the layers below it.  The lab (and the ring lab helper) sits beside
the library: it may use every library layer, and only the top (cli, demo)
may use it.  Checked twice: statically, every import statement of every module
(also those inside functions); and by importing each layer's modules in a fresh
interpreter with the modules above them blocked.
"""
import ast
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "egresscore")

# bottom to top; "lab" is beside the library, see the module docstring
LAYERS = {
    0: ["errors", "types", "files", "verdicts", "_netns", "_bpf", "_steer", "_natref", "_core", "_gcpause"],
    1: ["policy", "cluster", "inputs", "compiler"],
    2: ["flowlog", "metrics", "control", "sources", "health", "replication", "policystats"],
    3: ["agent"],
    4: ["show"],
    5: ["cli", "demo", "__main__", "__init__"],
}
LAB = ["lab", "_ringlab"]
TOP = max(LAYERS)


def _layer_of(module):
    """The layer of a dotted egresscore module name (a package's submodules share its layer)."""
    parts = module.split(".")
    assert parts[0] == "egresscore", module
    head = parts[1] if len(parts) > 1 else "__init__"
    if head in LAB:
        return "lab"
    for layer, names in LAYERS.items():
        if head in names:
            return layer
    return None


def _modules():
    """Every Python module of the package, as (dotted name, path)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(PKG):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for f in filenames:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__" and len(rel) > 1:
                    rel = rel[:-1]
                    if rel == ["egresscore"]:
                        rel = ["egresscore", "__init__"]
                out.append((".".join(rel), os.path.join(dirpath, f)))
    return sorted(out)


def _is_package(dotted):
    return os.path.isdir(os.path.join(ROOT, *dotted.split(".")))


def _is_module(dotted):
    base = os.path.join(ROOT, *dotted.split("."))
    if os.path.isdir(base) or os.path.exists(base + ".py"):
        return True
    folder, name = os.path.split(base)
    # the extension module: built (.so) or not yet (its name is declared in LAYERS)
    return os.path.isdir(folder) and (dotted == "egresscore._core" or any(
        f.startswith(name + ".") and f.endswith(".so") for f in os.listdir(folder)))


def _imports(dotted, path):
    """The egresscore modules that `path` imports (dotted names), anywhere in the file."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = dotted if _is_package(dotted) or dotted.endswith("__init__") else dotted.rpartition(".")[0]
    package = package.removesuffix(".__init__")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "egresscore")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "egresscore":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                # `from . import show` imports a module; `from . import EgressMap` the package itself
                found.add(sub if _is_module(sub) else (target if target != "egresscore" else "egresscore.__init__"))
    return found


def _allowed(src_layer, dst_layer):
    if src_layer == "lab":
        return dst_layer == "lab" or dst_layer < TOP
    if dst_layer == "lab":
        return src_layer == TOP
    return dst_layer <= src_layer


def test_every_module_has_a_layer():
    missing = [m for m, _ in _modules() if _layer_of(m) is None]
    assert not missing, f"declare these modules in LAYERS: {missing}"


def test_imports_go_only_downward():
    upward = []
    for module, path in _modules():
        src = _layer_of(module)
        for target in sorted(_imports(module, path)):
            dst = _layer_of(target)
            if dst is not None and target != module and not _allowed(src, dst):
                upward.append(f"{module} (layer {src}) imports {target} (layer {dst})")
    assert not upward, "\n".join(upward)


def test_the_static_check_sees_an_upward_import(tmp_path):
    """The checker itself: a layer-2 module importing the CLI is reported."""
    bad = tmp_path / "control.py"
    bad.write_text("def f():\n    from .cli import main\n    from . import show, EgressMap\n")
    found = _imports("egresscore.control", str(bad))
    assert found == {"egresscore.cli", "egresscore.show", "egresscore.__init__"}
    assert not _allowed(2, _layer_of("egresscore.cli")) and not _allowed(3, "lab") and _allowed("lab", 4)


_BLOCKER = textwrap.dedent("""
    import importlib, importlib.abc, sys, types
    root, blocked, wanted = sys.argv[1], set(sys.argv[2].split(",")) - {""}, sys.argv[3].split(",")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name in blocked or any(name.startswith(b + ".") for b in blocked):
                raise ImportError(f"upward import of {name}")
            return None

    sys.meta_path.insert(0, Block())
    pkg = types.ModuleType("egresscore")   # the package without its __init__ (which re-exports the top)
    pkg.__path__ = [root + "/egresscore"]
    sys.modules["egresscore"] = pkg
    for name in wanted:
        importlib.import_module(name)
""")


def _blocked_above(layer):
    names = [n for lay, ns in LAYERS.items() if lay > layer for n in ns if n != "__init__"]
    return [f"egresscore.{n}" for n in names + (LAB if layer < TOP else [])]


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_each_layer_imports_with_the_layers_above_it_blocked(layer):
    wanted = [m for m, _ in _modules() if _layer_of(m) == layer and m not in ("egresscore.__init__",
                                                                                "egresscore.__main__")]
    if layer == 0:
        wanted.append("egresscore._core")
    out = subprocess.run([sys.executable, "-c", _BLOCKER, ROOT, ",".join(_blocked_above(layer)), ",".join(wanted)],
                         check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_import_check_fails_on_an_upward_import():
    """The blocker itself: importing the CLI with the top layer blocked fails."""
    out = subprocess.run([sys.executable, "-c", _BLOCKER, ROOT, ",".join(_blocked_above(4)), "egresscore.cli"],
                         check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode != 0 and "upward import of egresscore.cli" in out.stderr
