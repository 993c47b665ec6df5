"""The GPU recipe (bench/gpu/recipe.sh) rehearsed on CPU: its plan and budget, and every step run
with tiny shapes in a fresh environment that has only what the lent GPU machine's image has
(torch, einops, numpy, pandas, matplotlib, psutil), the rest installed offline from the wheels."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import venv
from pathlib import Path

import pytest
from conftest import ROOT

from bench.gpu import recipe

IMAGE = ("torch", "einops", "numpy", "pandas", "matplotlib", "psutil")  # the GPU machine's packages


def run_recipe(*args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}  # env may bring W&B back (offline)
    return subprocess.run(
        ["bash", str(ROOT / "bench/gpu/recipe.sh"), *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def packed(out: Path) -> list[str]:
    with tarfile.open(out / "recipe.tar.gz") as tar:
        return tar.getnames()


# -- the plan -------------------------------------------------------------------------------
def test_first_is_the_first_pass_and_next_goes_on_from_the_first_step_not_done():
    names = lambda steps: [s.name for s in steps]  # noqa: E731
    assert names(recipe.plan("first", {"steps": {}})) == ["tests", "harness", "kernels", "maxlen", "decode"]
    state = {
        "steps": {
            "tests": {"status": "done"},
            "harness": {"status": "failed"},
            "kernels": {"status": "cut"},
            "maxlen": {"status": "skipped"},
        }
    }
    assert names(recipe.plan("next", state))[:5] == ["kernels", "maxlen", "decode", "hf_model", "context_parallel"]
    assert names(recipe.plan("next", state))[-1] == "lra"
    assert names(recipe.plan("decode", state)) == ["decode"]


def test_every_step_has_commands_for_both_profiles(tmp_path):
    for step in recipe.STEPS:
        for profile in (recipe.GPU, recipe.REHEARSAL):
            commands = step.commands(profile, tmp_path)
            assert commands, (step.name, profile.name)
            for command in commands:  # no key given twice (Hydra would refuse the sweep)
                keys = [a.split("=")[0] for a in command if "=" in a and not a.startswith("-")]
                assert len(keys) == len(set(keys)), (step.name, profile.name, command)


def test_the_gpu_first_pass_is_the_issue_s_cells(tmp_path):
    kernels = [" ".join(c) for c in recipe.BY_NAME["kernels"].commands(recipe.GPU, tmp_path)]
    assert all("dtype=bfloat16" in c and "model=gpu_d128" in c and "batch_size=1" in c for c in kernels)
    assert sum("seq_len=4096,16384,65536 causal=false" in c for c in kernels) == 3
    assert sum("seq_len=16384 causal=true" in c for c in kernels) == 3
    decode = " ".join(" ".join(c) for c in recipe.BY_NAME["decode"].commands(recipe.GPU, tmp_path))
    assert "seq_len=32768,131072" in decode and "model.n_kv_heads=8,1" in decode and "attention.op=splitk" in decode


# -- the budget -----------------------------------------------------------------------------
def test_a_step_that_cannot_fit_the_budget_is_skipped_and_says_so(tmp_path):
    out = tmp_path / "out"
    result = run_recipe("--rehearse", "first", "--budget", "5", "--out", str(out), "--pack-to", str(tmp_path / "back"))
    assert result.returncode == 0, result.stderr  # all 5 s went to the reserve for the tarball
    for name in recipe.FIRST_PASS:
        assert f"recipe: skip {name}: it needs at least 1 s" in result.stdout
    state = json.loads((out / "recipe_state.json").read_text())
    assert {s["status"] for s in state["steps"].values()} == {"skipped"}
    assert "recipe_state.json" in packed(out) and (tmp_path / "back/recipe.tar.gz").exists()


@pytest.mark.slow
def test_a_step_cut_at_its_deadline_keeps_its_records_and_a_rerun_finishes_it(tmp_path):
    out = tmp_path / "out"
    cut = run_recipe("--rehearse", "kernels", "--budget", "40", "--out", str(out))
    assert cut.returncode == 0, cut.stderr
    state = json.loads((out / "recipe_state.json").read_text())
    assert state["steps"]["kernels"]["status"] == "cut", cut.stdout
    kept = len(list((out / "kernels").rglob("result.json")))
    finished = run_recipe("--rehearse", "kernels", "--out", str(out))  # no budget: to the end
    state = json.loads((out / "recipe_state.json").read_text())
    assert state["steps"]["kernels"]["status"] == "done", finished.stdout
    resumed = sum(map(int, re.findall(r"resume: skipped (\d+) cell", finished.stdout)))
    assert resumed == kept  # every record of the cut run was kept, and not measured again
    assert len(list((out / "kernels").rglob("result.json"))) > kept


# -- every step, in a bare environment ------------------------------------------------------
def requirements(names) -> set[str]:
    """The distributions ``names`` need, themselves included (extras left out)."""
    seen, todo = set(), list(names)
    while todo:
        name = re.split(r"[ ;<>=!~\[(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        seen.add(name)
        todo += [r for r in dist.requires or [] if "extra ==" not in r]
    return seen


def image_like_environment(root: Path) -> Path:
    """A venv that sees only the GPU image's packages (linked from this environment): its python."""
    venv.create(root / "venv", with_pip=True)
    image = root / "image"
    image.mkdir()
    for name in requirements(IMAGE):
        dist = importlib.metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (image / top).exists() and top != "..":
                (image / top).symlink_to(source)
    site = next((root / "venv/lib").glob("python*/site-packages"))
    (site / "gpu_image.pth").write_text(f"{image}\n")
    return root / "venv/bin"


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheels")
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    built = subprocess.run(
        ["bash", str(ROOT / "bench/gpu/wheelhouse.sh"), str(folder), python],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if built.returncode != 0:
        pytest.skip(f"the wheels of bench/gpu/wheels.txt could not be downloaded here: {built.stderr[-500:]}")
    return folder


@pytest.mark.slow
def test_every_step_rehearsed_in_an_environment_without_hydra_or_wandb(tmp_path, wheels):
    bin_dir = image_like_environment(tmp_path)
    bare = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": "",
        "WHEELS": str(wheels),
        "SITE": str(tmp_path / "site"),
        "WANDB_MODE": "offline",
    }  # W&B as on the GPU machine: offline runs
    lacking = subprocess.run(
        [bin_dir / "python3", "-c", "import torch, einops; import hydra"],
        env={**os.environ, **bare},
        capture_output=True,
        text=True,
    )
    assert "No module named 'hydra'" in lacking.stderr  # the environment really lacks it, and has torch
    out = tmp_path / "out"
    started = time.time()
    result = run_recipe("--rehearse", "all", "--out", str(out), env=bare, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = json.loads((out / "recipe_state.json").read_text())
    assert {n: s["status"] for n, s in state["steps"].items()} == {s.name: "done" for s in recipe.STEPS}, result.stdout[
        -3000:
    ]
    names = packed(out)
    assert (out / "recipe.tar.gz").stat().st_size < recipe.TARBALL_LIMIT
    for step in recipe.STEPS:
        assert f"{step.name}/log.txt" in names
        if step.name not in ("tests", "harness"):
            assert f"{step.name}/report.md" in names and f"{step.name}/results.csv" in names, step.name
            records = [n for n in names if n.startswith(f"{step.name}/") and n.endswith("result.json")]
            assert records, step.name
    assert "harness/harness_check.json" in names
    harness = json.loads((out / "harness/harness_check.json").read_text())
    assert harness["reference"] == "torch.utils.benchmark" and harness["rows"]
    assert "no cudnn kernel on CPU" in harness["refused"][0]["reason"]
    assert re.search(r"\d+ (passed|skipped|deselected)", (out / "tests/log.txt").read_text())
    kernels = [json.loads(p.read_text()) for p in (out / "kernels").rglob("result.json")]
    statuses = {(r["attention"], r["status"]) for r in kernels}
    assert ("sdpa", "ok") in statuses and ("xformers", "unsupported") in statuses and ("full", "ok") in statuses
    print(f"rehearsal of every step: {time.time() - started:.0f} s")
