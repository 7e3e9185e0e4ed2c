"""The package's structure: one-way imports, evaluators as leaves, light configs, small
modules, every architecture field in the configs, no references outside the repository."""

import ast
import os
import re
import subprocess
import sys

import pytest

from configs import quickstart, seco, softcon
from softcon_jax import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "softcon_jax")


def _modules() -> dict[str, str]:
    """{dotted module name: file} of every module of the package (packages by __init__)."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(root, f)
    return out


MODULES = _modules()


def _imports(path: str, name: str) -> set[str]:
    """Package modules `name` imports anywhere in the file (module and function level).

    Parent packages a submodule import runs on the way are not edges (as import-linter).
    """
    tree = ast.parse(open(path).read())
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(parts + ([base] if base else []))
            # `from pkg import sub` depends on pkg.sub; `from pkg import name` on pkg.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        else:
            continue
        for t in targets:
            # The longest prefix that is a module of the package.
            parts = t.split(".")
            for n in range(len(parts), 0, -1):
                candidate = ".".join(parts[:n])
                if candidate in MODULES:
                    if candidate != name:
                        found.add(candidate)
                    break
    return found


GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def _cycle() -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(GRAPH):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_import_graph_has_no_cycle_including_function_level_imports():
    assert "softcon_jax.train" in GRAPH and len(GRAPH) > 30
    assert _cycle() is None, " -> ".join(_cycle())


def test_nothing_imports_the_trainer():
    importers = sorted(n for n, deps in GRAPH.items() if "softcon_jax.train" in deps)
    assert importers == []


# The package's layers, bottom to top. A module imports from its own layer or below, never
# above: models know nothing of interop, the library nothing of the data_prep scripts.
LAYERS = (
    ("cli", "defaults", "distributed", "logs", "signals", "registry", "overrides", "sharding",
     "report", "workdir_lock"),
    ("data", "models", "losses", "optim", "checkpoint"),
    ("interop", "methods", "evaluators", "hlo", "gpu_targets"),
    ("state", "step", "pretrained"),
    ("train", "export", "evaluate", "plan", "study", "study_run", "study_report"),
)


def _layer(module: str) -> int:
    group = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if group in names:
            return i
    return len(LAYERS)  # the package itself (softcon_jax/__init__) sits on top


def test_every_module_has_a_layer():
    unplaced = sorted({n.split(".")[1] for n in GRAPH if "." in n} - set().union(*LAYERS))
    assert not unplaced, f"add these to LAYERS in tests/test_architecture.py: {unplaced}"


def test_no_import_runs_upward():
    upward = [f"{name} ({_layer(name)}) imports {dep} ({_layer(dep)})"
              for name, deps in sorted(GRAPH.items()) for dep in sorted(deps)
              if _layer(dep) > _layer(name)]
    assert not upward, "\n".join(upward)


def test_library_does_not_import_the_scripts():
    """data_prep (the converters' command-line scripts) builds on the library, not back."""
    offenders = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(open(path).read())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name} imports {m}" for m in mods
                          if m.split(".")[0] in ("data_prep", "benchmarks", "launch")]
    assert not offenders, offenders


def test_evaluators_are_leaves():
    forbidden = {"softcon_jax.train", "softcon_jax.state", "softcon_jax.step",
                 "softcon_jax.export", "softcon_jax.evaluate", "softcon_jax.pretrained",
                 "softcon_jax.methods", "softcon_jax.checkpoint"}
    evaluators = [n for n in GRAPH if n.startswith("softcon_jax.evaluators")]
    assert len(evaluators) >= 6
    for name in evaluators:
        bad = {d for d in GRAPH[name] if any(d == f or d.startswith(f + ".")
                                              for f in forbidden)}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_configs_load_without_the_runtime():
    code = ("import sys; import configs.softcon, configs.seco, configs.quickstart; "
            "[m.get_config(a) for m, a in ((configs.softcon, 'vitb14,s1,runlocal'), "
            "(configs.seco, 'rn50'), (configs.quickstart, None))]; "
            "heavy = [m for m in ('jax', 'flax', 'optax', 'grain', 'orbax', 'numpy') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("module,arg", [
    (softcon, "rn50,s2c"), (softcon, "vits14,s2c"), (softcon, "vitb14,s1"),
    (softcon, "vits14,s2a,runlocal"), (seco, "rn18"), (seco, "rn50"), (seco, "rn18,runlocal"),
    (quickstart, None)])
def test_every_architecture_field_is_in_the_config(module, arg):
    c = module.get_config(arg)
    spec = models.BACKBONES.get(c.model.backbone)
    kwargs = c.model.backbone_kwargs.to_dict()
    assert set(kwargs) == spec.fields, (sorted(spec.fields - set(kwargs)),
                                        sorted(set(kwargs) - spec.fields))
    if module is not quickstart and "runlocal" not in (arg or ""):
        # The full recipes build exactly the registered architecture.
        for key, value in spec.defaults.items():
            got = kwargs[key]
            assert (tuple(got) if isinstance(got, (list, tuple)) else got) == value, key
    models.build_backbone(c.model.backbone, in_channels=c.data.in_channels, **kwargs)


def test_config_arguments_are_checked():
    with pytest.raises(ValueError, match=r"configs/softcon.py:vitx14: unknown token "
                                         r"'vitx14'; expected <vits14\|rn50\|vitb14>"):
        softcon.get_config("vitx14")
    assert softcon.get_config("s1,vitb14").model.backbone == "vit_base_patch14_dinov2"
    assert softcon.get_config("rn50,baseline").loss.name == "infonce"


def test_modules_stay_small_or_say_why():
    for name, path in MODULES.items():
        text = open(path).read()
        lines = text.count("\n")
        if lines > 400:
            doc = ast.get_docstring(ast.parse(text)) or ""
            assert re.search(r"\blong\b|\blines\b", doc), f"{path}: {lines} lines, no reason"
    assert open(os.path.join(PACKAGE, "train.py")).read().count("\n") <= 400


def test_no_references_to_documents_outside_the_repository():
    pattern = re.compile(r"REFERENCE\.md|REFERENCE\s§|\bissues? #?\d+\b", re.I)
    offenders = []
    for top in ("softcon_jax", "configs", "data_prep", "tests", "benchmarks", "launch"):
        for root, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith((".py", ".sh", ".md")) and f != os.path.basename(__file__):
                    p = os.path.join(root, f)
                    for i, line in enumerate(open(p, errors="replace"), 1):
                        if pattern.search(line):
                            offenders.append(f"{os.path.relpath(p, ROOT)}:{i}: {line.strip()}")
    docs = sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")))
    for f in ["README.md", "BENCHMARKS.md"] + docs:
        for i, line in enumerate(open(os.path.join(ROOT, f)), 1):
            if pattern.search(line):
                offenders.append(f"{f}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
