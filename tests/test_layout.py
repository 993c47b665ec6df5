"""The shape of bench/: imports in layers (no cycle, no reaching into another module's
privates, the analysis side apart from the measuring side), and benches and tasks that join
through their registries (one module + one yaml), as backends do."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, compose

import bench.config
from bench import records
from bench.analysis import report
from bench.benches import BENCHES, Bench, bench_names, get_bench, register_bench
from bench.harness import run_job
from bench.results import Result, measured
from bench.tasks import get_task, task_names
from efficient.bounds import Bound
from run import summary_line


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def bench_imports() -> dict[str, list[tuple[str, list[str]]]]:
    """module -> [(imported bench module, names taken from it)], lazy imports included."""
    modules = {module_name(p): p for p in (ROOT / "bench").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bench":
                for alias in node.names:  # `from bench import records` names a module, not a member
                    target = f"{node.module}.{alias.name}"
                    edges.append((target, []) if target in modules else (node.module, [alias.name]))
            elif isinstance(node, ast.Import):
                edges += [(a.name, []) for a in node.names if a.name.split(".")[0] == "bench"]
        graph[name] = [(target, names) for target, names in edges if target != name]
    return graph


def test_bench_imports_have_no_cycle():
    graph = {m: {target for target, _ in edges} for m, edges in bench_imports().items()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            assert state.get(target) != "open", "import cycle: " + " -> ".join([*path, module, target])
            if target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_no_module_imports_another_modules_private_names():
    taken = [
        (m, target, n)
        for m, edges in bench_imports().items()
        for target, names in edges
        for n in names
        if n.startswith("_")
    ]
    assert not taken, taken


def test_the_analysis_side_reads_records_and_never_measures():
    """bench.analysis imports only itself, bench.records and bench.results (what a record is and
    says of itself; torch-free, as the analysis is); the measuring side never imports it,
    except the end-of-sweep callback that writes the report, and the commands' short names."""
    graph = bench_imports()
    for module, edges in graph.items():
        targets = {t for t, _ in edges}
        if module.startswith("bench.analysis"):
            readable = {"bench.records", "bench.results"}
            assert targets <= {t for t in graph if t.startswith("bench.analysis")} | readable, module
        elif module not in ("bench.callbacks", "bench.report", "bench.pick", "bench.dashboard"):
            assert not any(t.startswith("bench.analysis") for t in targets), module


@pytest.mark.parametrize("group,names", [("bench", bench_names), ("task", task_names)])
def test_every_registered_bench_and_task_has_its_yaml_and_back(group, names):
    yamls = {p.stem for p in (ROOT / "conf" / group).glob("*.yaml")}
    assert set(names()) == yamls


@dataclass
class ProbeBenchConfig:
    name: str = "probe"
    scale: float = 2.0


@dataclass(frozen=True, kw_only=True)
class ProbeResult(Result):
    TABLE = "Scaled lengths (bench=probe)"

    scaled_length: float = measured(
        "seq_len x bench.scale", pivot="Scaled length", column="scaled", fmt=",.1f", headline="scaled to {:,.1f}"
    )
    words: str = measured("a remark about the length", column="in words")


def run_probe(cell, **context) -> ProbeResult:
    return ProbeResult(scaled_length=cell.seq_len * cell.bench.scale, words=f"{cell.seq_len} tokens")


@pytest.fixture
def probe_bench():
    """The probe bench, registered for one test and removed after it (the registry is global)."""
    register_bench(
        Bench("probe", ProbeBenchConfig, run_probe, ProbeResult, exclusive=False, bounds={"scale": Bound(0, open=True)})
    )
    bench.config.register()
    yield
    BENCHES.unregister("probe")


def test_a_new_bench_is_one_registration_and_one_yaml(tmp_path, probe_bench):
    """A bench from outside the package: registered, given a yaml on Hydra's search path, it is
    composed, its bounds checked, and run by the harness into an ok record that describes itself:
    the report draws its tables, the CSV has its columns and the summary line its headline, with
    no line of the report, records or run.py naming it."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "probe.yaml").write_text(
        "defaults:\n  - /schema/bench/probe@_here_\n  - _self_\n\nname: probe\n"
    )
    search = f"hydra.searchpath=[file://{tmp_path}]"
    cfg = compose("bench=probe", "seq_len=16", "device=cpu", search)
    assert bench.config.value_problems(cfg) == []
    record = run_job(cfg)
    assert (record["status"], record["scaled_length"], record["words"]) == ("ok", 32.0, "16 tokens")
    assert records.validate(record) == [] and record["measures"]["scaled_length"] == "seq_len x bench.scale"
    text = report.markdown([record, run_job(compose("bench=probe", "seq_len=64", search))])
    assert "**Scaled length**" in text and "| full | 32.0 | 128.0 |" in text
    assert "**Scaled lengths (bench=probe)**" in text and "| full | 64 | 128.0 | 64 tokens |" in text
    report.write_csv([record], tmp_path / "r.csv")
    assert "scaled_length,words" in (tmp_path / "r.csv").read_text().splitlines()[0]
    assert summary_line(record).endswith("ok: scaled to 32.0")
    bad = compose("bench=probe", "bench.scale=0", search)
    assert bench.config.value_problems(bad) == ["bench.scale=0.0 is out of range: bench.scale must be > 0"]


def test_bench_and_task_names_that_do_not_exist_list_the_valid_ones():
    with pytest.raises(KeyError, match="valid benches: accuracy, context_parallel, decode, maxlen, .*speed"):
        get_bench("sped")
    with pytest.raises(KeyError, match="valid tasks: charlm, listops, recall, synthetic"):
        get_task("list_ops")
