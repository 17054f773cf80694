"""The house rules of the code, read from the source with `ast` (nothing is imported or run).

- A name that starts with ``_`` is private to its module: no other project module imports it
  (``from X import _name``) or reaches it (``X._name``, ``X.Y._name``); a part another module
  needs gets a public name where it lives.
- The floors: pipeline/ stands on stages/, stages/ on cache/; no module imports a floor above its
  own, and cache/ never imports torch (a cache is read without it). bench/ stands on top of all.
- Inside stages/ the three stages (extract, train, finetune) stand side by side on shared parts
  (runs, evaluate, classifiers, config, ...), never on each other: no module of stages/ imports a
  stage other than itself; stage three does not import stage two.
- Optional head capabilities are asked with ``Head.supports``, never probed with hasattr/getattr.
- No import circle anywhere in the project: a module never comes back to itself through what it
  imports, counting imports at any depth (a function's lazy import too).
- The house is shallow: within stages/ the longest chain of imports is at most ``MAX_CHAIN``
  modules (see ``longest_chain`` for what a chain is).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "cache", "clipcache", "bench")
FLOOR = {"cache": 0, "stages": 1, "pipeline": 2, "clipcache": 2, "bench": 3}

# Private reaches the code still makes, each with the reason it is not fixed here. An entry
# must keep matching a real reach (test_known_exceptions_are_still_needed): remove it once fixed.
KNOWN: dict[tuple[str, str], str] = {}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the project's packages under ``root``: dotted name -> file."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imports_of(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in ``path``, at any depth (lazy imports too)."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((_absolute(module, node, path.name == "__init__.py"), node.lineno))
    return out


def _owning_module(dotted: str, modules: dict[str, Path]) -> str:
    """The project module a dotted name lives in (its longest prefix that is a module)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return dotted


def private_reaches(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(``other.module._name``, line) for each private name of another project module that
    ``module`` imports or reaches through an attribute."""
    tree = ast.parse(path.read_text(), str(path))
    bound: dict[str, str] = {}  # local name -> the project module (or module.member) it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PACKAGES:
                    bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node, path.name == "__init__.py")
            if source.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:
                if a.name == "*":
                    continue
                if _private(a.name) and _owning_module(source, modules) != module:
                    found.append((f"{source}.{a.name}", node.lineno))
                bound[a.asname or a.name] = f"{source}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain, base = [], node.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                owner = ".".join([bound[base.id], *reversed(chain)])
                if _owning_module(owner, modules) != module:
                    found.append((f"{owner}.{node.attr}", node.lineno))
    return sorted(set(found), key=lambda f: f[1])


def floor_breaks(module: str, path: Path) -> list[str]:
    """Imports of a floor above ``module``'s own, and torch in cache/."""
    top = module.split(".")[0]
    out = []
    for target, line in imports_of(module, path):
        head = target.split(".")[0]
        if head in FLOOR and FLOOR[head] > FLOOR[top]:
            out.append(f"{module}:{line}: imports {target} ({head}/ is a floor above {top}/)")
        if top == "cache" and head == "torch":
            out.append(f"{module}:{line}: cache/ imports torch (a cache must read without it)")
    return out


def test_the_walk_sees_the_whole_project():
    modules = project_modules()
    assert {"stages.train", "stages.finetune", "stages.runs", "stages.evaluate", "stages.classifiers", "cache.store",
            "pipeline.cli",
            "stages.heads.registry", "bench.bench_train"} <= set(modules)
    assert len(modules) > 40


def test_no_module_imports_a_private_name_of_another():
    modules = project_modules()
    bad = []
    for module, path in modules.items():
        for name, line in private_reaches(module, path, modules):
            if (module, name) not in KNOWN:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {module} uses {name}")
    assert not bad, ("private names of other modules (give the part a public name where it lives):\n"
                     + "\n".join(bad))


def test_known_exceptions_are_still_needed():
    modules = project_modules()
    seen = {(m, name) for m, p in modules.items() for name, _ in private_reaches(m, p, modules)}
    stale = [k for k in KNOWN if k not in seen]
    assert not stale, f"fixed, remove from KNOWN: {stale}"


def test_floors_hold_and_cache_has_no_torch():
    bad = [line for module, path in project_modules().items() for line in floor_breaks(module, path)]
    assert not bad, "\n".join(bad)


STAGES = ("stages.extract", "stages.train", "stages.finetune")
CAPABILITIES = ("video_embedding", "logits_from_embedding", "set_backbone_weights")  # Head.CAPABILITIES


def stage_imports(module: str, path: Path) -> list[str]:
    """Imports of a stage module (stages.extract / train / finetune) by a module of stages/ other
    than that stage itself: the stages stand beside each other, not on each other."""
    if module.split(".")[0] != "stages":
        return []
    out = []
    for target, line in imports_of(module, path):
        stage = next((s for s in STAGES if target == s or target.startswith(s + ".")), None)
        if stage is not None and stage != module:
            out.append(f"{module}:{line}: imports {target} (a stage; share the part through a module beside it)")
    return out


def capability_probes(path: Path) -> list[int]:
    """Lines that probe a head capability by name (hasattr(x, "video_embedding"), getattr(...))."""
    tree = ast.parse(path.read_text(), str(path))
    return sorted(node.lineno for node in ast.walk(tree)
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("hasattr", "getattr") and len(node.args) >= 2
                  and isinstance(node.args[1], ast.Constant) and node.args[1].value in CAPABILITIES)


def test_the_stages_stand_beside_each_other_and_finetune_does_not_import_train():
    modules = project_modules()
    finetune = [t for t, _ in imports_of("stages.finetune", modules["stages.finetune"])]
    assert "stages.evaluate" in finetune  # the part it shares with stage two
    assert not [t for t in finetune if t == "stages.train" or t.startswith("stages.train.")]
    bad = [line for module, path in modules.items() for line in stage_imports(module, path)]
    assert not bad, "\n".join(bad)


def test_head_capabilities_are_asked_not_probed():
    from stages.heads import Head

    assert Head.CAPABILITIES == CAPABILITIES
    bad = [f"{path.relative_to(ROOT)}:{line}" for path in project_modules().values() for line in capability_probes(path)]
    assert not bad, "probe of a head capability (use Head.supports): " + ", ".join(bad)


# Import circles the code still has, each with the reason it is not fixed here; like KNOWN, an
# entry must keep matching a real circle (test_known_cycles_are_still_there): remove it once fixed.
KNOWN_CYCLES: dict[frozenset, str] = {}
MAX_CHAIN = 5  # the most modules on one chain of imports inside stages/ (issue 24: from 10)


def project_imports(module: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """{project module: first line} that ``module`` imports, at any depth (lazy imports too).

    An import names the module of its statement: ``from stages.heads.registry import Head`` ->
    stages.heads.registry (the packages Python runs on the way are not counted: importing from
    the defining module is how a module avoids standing on a package's re-exports), and
    ``from stages.heads import lda`` -> stages.heads and stages.heads.lda."""
    out: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node, path.name == "__init__.py")
            names = [source] + [f"{source}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name in modules and name != module:
                out.setdefault(name, node.lineno)
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    return {m: project_imports(m, p, modules) for m, p in modules.items()}


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The import circles: each strongly connected group of two or more modules, sorted (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def describe_cycle(group: list[str], graph: dict[str, dict[str, int]], modules: dict[str, Path]) -> str:
    """The circle's modules and each import that ties them (file:line)."""
    def rel(m: str) -> str:  # the file, from the root its module name starts at
        path = modules[m]
        return path.relative_to(path.parents[len(m.split(".")) - (path.name != "__init__.py")]).as_posix()

    edges = [f"{rel(a)}:{line} imports {b}" for a in group for b, line in sorted(graph[a].items()) if b in group]
    return f"{' <-> '.join(group)}: " + "; ".join(edges)


def longest_chain(graph: dict[str, dict[str, int]], modules: dict[str, Path], prefix: str = "stages") -> list[str]:
    """The longest chain of imports inside ``prefix``: a path of distinct modules of ``prefix``,
    each importing the next (at any depth, as ``project_imports`` counts them), e.g. stages.train
    -> stages.evaluate -> stages.data.open -> ... Its length is the number of modules on it. A
    package's __init__ is a module of a chain only if it imports a project module (an empty
    ``stages/__init__.py`` adds no floor)."""
    def counted(m: str) -> bool:
        return (m == prefix or m.startswith(prefix + ".")) and (
            modules[m].name != "__init__.py" or bool(graph[m]))

    deps = {m: [d for d in graph[m] if counted(d)] for m in graph if counted(m)}
    best: dict[str, list[str]] = {}

    def walk(m: str, seen: frozenset) -> tuple[list[str], bool]:
        """(longest chain from m avoiding ``seen``, whether a circle cut it short)."""
        if m in best:
            return best[m], False
        chain, cut = [m], False
        for d in sorted(deps[m]):
            if d in seen:
                cut = True
                continue
            sub, sub_cut = walk(d, seen | {d})
            cut = cut or sub_cut
            if len(sub) + 1 > len(chain):
                chain = [m] + sub
        if not cut:  # the same from wherever the walk came: kept
            best[m] = chain
        return chain, cut

    return max((walk(m, frozenset({m}))[0] for m in sorted(deps)), key=len, default=[])


def test_no_import_cycle_anywhere():
    modules = project_modules()
    graph = import_graph(modules)
    cycles = [c for c in import_cycles(graph) if frozenset(c) not in KNOWN_CYCLES]
    assert not cycles, ("import circles (move the definition that ties them to the module both can stand on):\n"
                        + "\n".join(describe_cycle(c, graph, modules) for c in cycles))


def test_known_cycles_are_still_there():
    stale = [sorted(k) for k in KNOWN_CYCLES if sorted(k) not in import_cycles(import_graph(project_modules()))]
    assert not stale, f"fixed, remove from KNOWN_CYCLES: {stale}"


def test_stage_one_stands_on_no_part_of_stage_two():
    """Stage one names what a head reads from a cache through stages/heads/ (needs.py, the
    registry), never through stage two's data wing: nothing it reaches, at any remove, is in
    stages/data/."""
    modules = project_modules()
    graph = import_graph(modules)
    reached, todo = set(), ["stages.extract"]
    while todo:
        for d in graph[todo.pop()]:
            if d not in reached:
                reached.add(d)
                todo.append(d)
    assert "stages.heads.needs" in reached
    assert not sorted(m for m in reached if m == "stages.data" or m.startswith("stages.data."))


def test_the_longest_chain_of_imports_in_stages_is_short():
    modules = project_modules()
    chain = longest_chain(import_graph(modules), modules)
    assert "stages.train" in modules and len(chain) >= 3  # the walk sees stages/ (train stands on parts)
    assert len(chain) <= MAX_CHAIN, (f"a chain of {len(chain)} imports inside stages/ (at most {MAX_CHAIN}): "
                                     + " -> ".join(chain) + "; import from the defining module, or move the "
                                     "fact a long chain reaches for down to a leaf")


# --------------------------------------------------------------------------- the checker itself
def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir(exist_ok=True)
    return project_modules(tmp_path)


@pytest.mark.parametrize("source, expected", [
    ("from stages.train import _helper\n", "stages.train._helper"),
    ("from stages.train import TrainCfg, _helper as h\n", "stages.train._helper"),
    ("import stages.train as T\nT._helper(1)\n", "stages.train._helper"),
    ("import stages.train\nstages.train._helper(1)\n", "stages.train._helper"),
    ("from stages import train\ntrain._helper = None\n", "stages.train._helper"),
    ("def f():\n    from cache.wds import _npy\n    return _npy\n", "cache.wds._npy"),
    ("from .train import _helper\n", "stages.train._helper"),
])
def test_checker_finds_each_way_of_reaching_a_private_name(tmp_path, source, expected):
    modules = _tree(tmp_path, {"stages/train.py": "def _helper(x):\n    return x\n", "stages/user.py": source})
    got = [name for name, _ in private_reaches("stages.user", modules["stages.user"], modules)]
    assert got == [expected]


def test_checker_lets_a_module_use_its_own_private_names_and_public_ones(tmp_path):
    source = ("from stages.train import helper\nimport stages.train as T\n\n\ndef _mine():\n    return T.helper\n\n\n"
              "class A:\n    def __init__(self):\n        self._x = _mine()\n        self.__dict__.clear()\n")
    modules = _tree(tmp_path, {"stages/train.py": "def helper():\n    pass\n", "stages/user.py": source})
    assert private_reaches("stages.user", modules["stages.user"], modules) == []


def test_checker_finds_a_floor_above_and_torch_in_cache(tmp_path):
    modules = _tree(tmp_path, {"cache/low.py": "import torch\n\n\ndef f():\n    from stages.train import x\n",
                               "stages/mid.py": "from cache.low import f\nfrom pipeline.cli import app\n",
                               "pipeline/top.py": "import stages.mid\nimport cache.low\n"})
    low = floor_breaks("cache.low", modules["cache.low"])
    assert len(low) == 2 and any("torch" in s for s in low) and any("stages.train" in s for s in low)
    mid = floor_breaks("stages.mid", modules["stages.mid"])
    assert len(mid) == 1 and "pipeline.cli" in mid[0]
    assert floor_breaks("pipeline.top", modules["pipeline.top"]) == []


def test_checker_finds_a_stage_on_a_stage_and_a_capability_probe(tmp_path):
    modules = _tree(tmp_path, {"stages/finetune.py": "def f():\n    from stages.train import TrainCfg\n",
                               "stages/evaluate.py": "import stages.extract\n",
                               "stages/train.py": "from stages.train import x\nfrom stages.runs import y\n",
                               "pipeline/cli.py": "from stages.train import TrainCfg\n",
                               "stages/probe.py": "ok = hasattr(h, 'video_embedding') or getattr(h, 'name', 1)\n"})
    assert len(stage_imports("stages.finetune", modules["stages.finetune"])) == 1
    assert len(stage_imports("stages.evaluate", modules["stages.evaluate"])) == 1
    assert stage_imports("stages.train", modules["stages.train"]) == []  # itself, and a shared part
    assert stage_imports("pipeline.cli", modules["pipeline.cli"]) == []  # the CLI calls the stages
    assert capability_probes(modules["stages.probe"]) == [1]


def test_checker_finds_a_circle_through_a_lazy_import_and_a_package(tmp_path):
    modules = _tree(tmp_path, {"stages/__init__.py": "",
                               "stages/a.py": "from stages import b\n",
                               "stages/b.py": "def f():\n    from .c import x\n",
                               "stages/c.py": "import stages.a\n",
                               "stages/d.py": "from stages.a import y\n",
                               "cache/x.py": "from cache import y\n", "cache/y.py": "import os\n"})
    graph = import_graph(modules)
    assert graph["stages.a"] == {"stages": 1, "stages.b": 1} and graph["stages.b"] == {"stages.c": 2}
    assert import_cycles(graph) == [["stages.a", "stages.b", "stages.c"]]
    assert describe_cycle(["stages.a", "stages.b", "stages.c"], graph, modules) == (
        "stages.a <-> stages.b <-> stages.c: stages/a.py:1 imports stages.b; stages/b.py:2 imports stages.c; "
        "stages/c.py:1 imports stages.a")
    del graph["stages.c"]["stages.a"]
    assert import_cycles(graph) == []


def test_checker_measures_the_longest_chain(tmp_path):
    modules = _tree(tmp_path, {"stages/__init__.py": '"""empty: not a floor"""\n',
                               "stages/leaf.py": "from cache.x import y\n",
                               "stages/mid.py": "from stages import leaf\n",
                               "stages/top.py": "def f():\n    import stages.mid\n",
                               "stages/pkg/__init__.py": "from stages.pkg.inner import z\n",
                               "stages/pkg/inner.py": "from stages.leaf import w\n",
                               "stages/user.py": "from stages.pkg import z\n",
                               "stages/side.py": "from stages.pkg.inner import z\n",
                               "cache/x.py": "", "pipeline/cli.py": "import stages.top\n"})
    graph = import_graph(modules)
    assert longest_chain(graph, modules) == ["stages.user", "stages.pkg", "stages.pkg.inner", "stages.leaf"]
    assert len(longest_chain(graph, modules)) == 4  # stages (empty __init__) and pipeline/ do not count
    graph["stages.leaf"]["stages.top"] = 1  # a circle: the chain still ends, each module once
    chain = longest_chain(graph, modules)
    assert len(chain) == len(set(chain)) == 6 and chain[:3] == ["stages.user", "stages.pkg", "stages.pkg.inner"]


# ----------------------------------------------------------------------------- import order
FIRST_PARTY = {*PACKAGES, "clipcache", "conftest"} | {p.stem for p in (ROOT / "tests").glob("*.py")}


def _section(module: str) -> int:
    """isort's sections: __future__, the standard library, third party, this project (tests' helpers too)."""
    import sys

    top = module.lstrip(".").split(".")[0]
    if top == "__future__":
        return 0
    if module.startswith(".") or top in FIRST_PARTY:
        return 3
    return 1 if top in sys.stdlib_module_names else 2


def import_order_problems(path: Path, root: Path = ROOT) -> list[str]:
    """The module's leading block of imports against isort's order (what ruff's I001 checks, less
    the line wrapping): sections in order, and in each, ``import x`` lines before ``from x import``
    lines, each sorted by module name. A file marked ``# isort: skip_file`` says why it is exempt."""
    text = path.read_text()
    if "# isort: skip_file" in text:
        return []
    body = ast.parse(text, str(path)).body
    start = 1 if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) else 0
    keys = []
    for node in body[start:]:
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            break
        name = node.names[0].name if isinstance(node, ast.Import) else "." * node.level + (node.module or "")
        keys.append(((_section(name), isinstance(node, ast.ImportFrom), name.lower()), node.lineno, name))
    return [f"{path.relative_to(root)}:{b[1]}: {b[2]} after {a[2]}" for a, b in zip(keys, keys[1:]) if b[0] < a[0]]


def test_imports_are_in_isort_order():
    files = [p for pkg in (*PACKAGES, "clipcache", "tests") for p in sorted((ROOT / pkg).rglob("*.py"))]
    problems = [p for f in files for p in import_order_problems(f)]
    assert not problems, "imports out of isort order:\n" + "\n".join(problems)


def test_the_import_order_check_sees_a_misplaced_import(tmp_path):
    probe = tmp_path / "m.py"
    probe.write_text('"""doc"""\nimport sys\nimport os\nfrom pathlib import Path\n\nimport numpy\n\nfrom cache import meta\n')
    assert import_order_problems(probe, tmp_path) == ["m.py:3: os after sys"]
    probe.write_text("import os\nimport sys\nfrom pathlib import Path\n\nimport numpy\n\nfrom cache import meta\nimport json\n")
    assert import_order_problems(probe, tmp_path) == ["m.py:8: json after cache"]
    probe.write_text("import os\nfrom pathlib import Path\n\nimport numpy\nfrom torch import nn\n\nfrom cache import meta\n")
    assert import_order_problems(probe, tmp_path) == []
