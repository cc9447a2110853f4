"""The package's shape: no import loop, a config layer that stays light, a small sorted public API."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import slmbatch

PACKAGE = Path(slmbatch.__file__).parent

#: The config layer: what a job definition is made of. Building, printing and
#: validating a job must work with none of the engine, cluster or HTTP stack.
CONFIG_MODULES = {
    "slmbatch.spec",
    "slmbatch.adapters",
    "slmbatch.errors",
    "slmbatch.columns",
    "slmbatch.config",
    "slmbatch.job",
    "slmbatch.paths",
    "slmbatch.stages",
    "slmbatch.stages.base",
    "slmbatch.stages.classify",
    "slmbatch.stages.extract",
    "slmbatch.stages.summarize",
}
HEAVY = ("ray", "vllm", "httpx", "torch")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function, as absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}
    return found


def package_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target in imports_of(path):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target not in (name, "slmbatch"):
                edges.add(target)
        graph[name] = edges
    return graph


def external_imports(module: str) -> set[str]:
    path = PACKAGE.parent.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return {m.split(".")[0] for m in imports_of(path) if not m.startswith("slmbatch")}


def test_the_package_has_no_import_loop():
    graph = package_graph()
    loops = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                loops.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not loops, "import loops: " + "; ".join(" -> ".join(loop) for loop in loops)


def test_the_config_layer_imports_only_itself_and_light_libraries():
    graph = package_graph()
    assert CONFIG_MODULES <= set(graph), sorted(CONFIG_MODULES - set(graph))
    for module in sorted(CONFIG_MODULES):
        outside = graph[module] - CONFIG_MODULES - {"slmbatch.scoring"}
        assert not outside, f"{module} imports {sorted(outside)}, outside the config layer"
        heavy = external_imports(module) & set(HEAVY)
        assert not heavy, f"{module} imports {sorted(heavy)}"


def test_defining_and_printing_a_job_loads_no_engine_cluster_or_http_library():
    code = (
        "import sys\n"
        "from slmbatch.job import Job\n"
        "from slmbatch.config import Model, ParquetSource, ParquetSink, Frontier, Egress\n"
        "from slmbatch.stages import Classify, Extract, Summarize\n"
        "m = Model('some/model')\n"
        "job = Job(name='j', source=ParquetSource('in', columns=['text']), sink=ParquetSink('out'),\n"
        "          stages=[Classify('c', model=m, input='text', labels=['a', 'b'], threshold=0.5),\n"
        "                  Summarize('s', model=m, input='text')],\n"
        "          frontier=Frontier(base_url='http://127.0.0.1:1/v1', model='f'), egress=Egress())\n"
        "print(job)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]", out
    assert "job j" in out


def test_the_public_api_is_what_it_was_plus_deliberate_additions():
    assert set(slmbatch.__all__) == {
        "AnswerCache",  # issue 18: answers kept from run to run
        "Classify",
        "ConfigError",
        "Egress",
        "EngineError",
        "Extract",
        "FailureBudgetError",
        "Frontier",
        "FrontierError",
        "InputError",
        "Job",
        "Model",
        "ParquetSink",
        "ParquetSource",
        "RowAccountingError",
        "RunSummary",
        "SlmbatchError",
        "Stage",
        "Summarize",
        "load_thresholds",
        "promoted",  # issue 15: the version of a model line promoted now
        "run",
    }


def test_the_wheel_ships_only_the_product():
    assert not any(
        (PACKAGE / name).exists() for name in ("toymodels.py", "localserver.py", "classifier_server.py", "faults.py")
    )
    assert "devkit" not in {m.split(".")[0] for p in PACKAGE.rglob("*.py") for m in imports_of(p)}


def test_a_new_stage_family_is_one_class_that_evaluation_scores_by_itself():
    from slmbatch.evaluate import StageRows, evaluate_stage
    from slmbatch.spec import spec
    from slmbatch.stages import Stage, family

    @spec
    class Sentiment(Stage):
        kind = "sentiment_for_test"
        headline_metric = "hit_rate"

        @classmethod
        def score(cls, prediction, gold):
            return float(prediction == gold)

    assert family("sentiment_for_test") is Sentiment
    rows = StageRows(
        name="s",
        kind="sentiment_for_test",
        gold=["+", "-"],
        small=["+", "+"],
        confidence=[0.9, 0.2],
        cascade=["+", "-"],
        frontier=[None, "-"],
        escalated=[False, True],
        escalatable=[True, True],
        small_cost=[0.0, 0.0],
        frontier_cost=[0.0, 0.001],
    )
    result = evaluate_stage(rows)
    assert result["metric"] == "hit_rate"
    by_system = {s["system"]: s for s in result["systems"]}
    assert by_system["small model"]["hit_rate"] == 0.5 and by_system["cascade"]["hit_rate"] == 1.0
