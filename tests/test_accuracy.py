"""bench=accuracy (bench/benches/accuracy.py): the schedule, training that lowers the loss, a
resume that continues the same run, the record, and the cells a backend or task refuses."""

import pytest
import torch
from conftest import compose
from presets import CHARLM, LISTOPS, RECALL

from bench.benches.accuracy import learning_rate, run_accuracy
from bench.cell import Cell
from bench.records import validate
from efficient.attention import flex


def test_warmup_then_cosine_decay():
    assert learning_rate(0, 10, 100) == pytest.approx(0.1) and learning_rate(9, 10, 100) == pytest.approx(1.0)
    assert learning_rate(55, 10, 100) == pytest.approx(0.5) and learning_rate(100, 10, 100) == pytest.approx(0.0)


class StopAt:
    """A tracker that interrupts training after a given step (a killed job)."""

    def __init__(self, step):
        self.step = step

    def log(self, metrics, step):
        if step == self.step:
            raise KeyboardInterrupt


def test_training_reduces_loss_and_records_the_test_accuracy(tmp_path):
    losses = []

    class Recorder:
        def log(self, metrics, step):
            losses.append(metrics["train_loss"])

    cfg = compose(*LISTOPS, "bench.steps=60", "bench.eval_every=30")
    result = run_accuracy(Cell.of(cfg), tracker=Recorder(), output_dir=tmp_path)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    assert result.metric == "test_accuracy" and 0.0 <= result.value <= 1.0
    assert result.steps == 60 and (tmp_path / "best.pt").exists()
    torch.load(tmp_path / "best.pt", weights_only=True)  # weights only: loads safely


# charlm with memory takes minutes on 2 cores: slow (CI runs it; `-m "not slow"` skips it in a quick loop)
@pytest.mark.parametrize(
    "task", [LISTOPS, pytest.param(CHARLM, marks=pytest.mark.slow)], ids=["listops", "charlm-with-memory"]
)
def test_resume_continues_the_same_run(tmp_path, task):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    for folder in (straight, interrupted):
        folder.mkdir()
    cfg = compose(*task, "bench.steps=40", "bench.eval_every=20")
    run_accuracy(Cell.of(cfg), output_dir=straight)
    with pytest.raises(KeyboardInterrupt):
        run_accuracy(Cell.of(cfg), tracker=StopAt(25), output_dir=interrupted)  # last.pt is at step 20
    resumed = compose(*task, "bench.steps=40", "bench.eval_every=20", "bench.resume=true")
    run_accuracy(Cell.of(resumed), output_dir=interrupted)
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(interrupted / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 40
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_accuracy_job_record_and_missing_data(tmp_path):
    from bench.harness import run_job

    record = run_job(compose(*LISTOPS, "bench.steps=10", "bench.eval_every=10"), output_dir=tmp_path)
    assert record["status"] == "ok" and validate(record) == [] and record["metric"] == "test_accuracy"
    missing = run_job(compose(*LISTOPS, f"task.data_dir={tmp_path}/lra"), output_dir=tmp_path)
    assert missing["status"] == "error" and "basic_train.tsv not found: expected LRA's TSV" in missing["reason"]


def test_a_backend_that_cannot_do_the_task_is_unsupported(tmp_path):
    from bench.harness import run_job

    record = run_job(compose(*RECALL, "attention=linformer", "bench.steps=5"), output_dir=tmp_path)
    assert record["status"] == "unsupported" and record["reason"] == "linformer cannot be causal"
    no_backward = run_job(compose(*RECALL, "attention=flex", "bench.steps=5", "model.d_model=64"), output_dir=tmp_path)
    refused_here = flex.cpu_isa_problem(32)  # a CPU whose flex kernel torch gets wrong: said first
    assert no_backward["status"] == "unsupported"
    assert (refused_here or "flex has no backward on cpu, and training needs one") in no_backward["reason"]
    encoder = [o for o in RECALL if not o.startswith("causal")] + ["causal=false", "bench.steps=5"]
    mismatch = run_job(compose(*encoder), output_dir=tmp_path)
    assert mismatch["status"] == "error" and "set causal=true" in mismatch["reason"]
