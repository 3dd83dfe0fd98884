"""The regression faults (extra_work, extra_memory, double_write): how an order gives them
and their factor, how they reach the task's command line, and what they do to a real task's
run, measured as the kernel counts it: CPU time, peak resident size, bytes written."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from orchestrator.orders import FAULT_TYPES, OrderError, load_order
from orchestrator.runtime.job_specs import JobTemplates
from pipeline.invocation import DEFAULT_FAULT_FACTOR, REGRESSION_FAULTS, TaskInvocation
from pipeline.settings import Settings
from services.catalog import get_task
from services.runtime.faults import Fault
from services.runtime.spec import ImageTask, Param, TaskParameterError
from training.collect import make_image

REPO = Path(__file__).resolve().parents[2]
ORDER_ID = 7


# --- orders ---------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (16, 12), (200, 30, 30)).save(tmp_path / "images" / "small.png")
    return tmp_path


def order_file(folder: Path, *tasks) -> Path:
    path = folder / "order.json"
    path.write_text(json.dumps({"id": "regression", "image": "images/small.png", "tasks": list(tasks)}))
    return path


def order_error(path: Path) -> str:
    with pytest.raises(OrderError) as raised:
        load_order(path)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


def test_the_regression_faults_are_fault_types():
    assert set(REGRESSION_FAULTS) <= set(FAULT_TYPES)
    assert FAULT_TYPES[:5] == ("raise", "stall", "cpu_hog", "memory_leak", "io_storm")


def test_an_order_gives_a_regression_and_its_factor_beside_the_fault_or_in_params(folder):
    order = load_order(order_file(folder,
                                  {"name": "median", "fault": "extra_work", "fault_factor": 2.3},
                                  {"name": "blur", "params": {"radius": 2, "fault": "extra_memory", "fault_factor": 3}},
                                  {"name": "grayscale", "fault": "double_write"},
                                  {"name": "sharpen", "fault": "cpu_hog", "fault_at": 1}))
    work, memory, write, hog = order.tasks
    assert (work.fault, work.fault_factor) == ("extra_work", 2.3)
    assert (memory.fault, memory.fault_factor, memory.params["radius"]) == ("extra_memory", 3.0, 2.0)
    assert "fault_factor" not in memory.params
    assert (write.fault, write.fault_factor, write.fault_at) == ("double_write", DEFAULT_FAULT_FACTOR, 0.0)
    assert (hog.fault, hog.fault_at, hog.fault_factor) == ("cpu_hog", 1.0, DEFAULT_FAULT_FACTOR)


def test_an_order_with_a_regression_is_its_own_order_file(folder):
    order = load_order(order_file(folder, {"name": "median", "fault": "extra_work", "fault_factor": 2},
                                  {"name": "blur", "fault": "stall", "fault_at": 1.5}))
    document = order.to_document()
    assert document["tasks"][0]["fault_factor"] == 2.0 and "fault_at" not in document["tasks"][0]
    assert "fault_factor" not in document["tasks"][1]
    again = folder / "again.json"
    again.write_text(json.dumps(document))
    assert load_order(again).tasks == order.tasks


@pytest.mark.parametrize(("task", "fragment"), [
    ({"name": "median", "fault": "extra_work", "fault_factor": 1}, "$.tasks[0].fault_factor: expected a number > 1, got 1"),
    ({"name": "median", "fault": "extra_work", "fault_factor": 0.5}, "expected a number > 1, got 0.5"),
    ({"name": "median", "fault": "extra_work", "fault_factor": 11}, "$.tasks[0].fault_factor: expected a number <= 10, got 11"),
    ({"name": "median", "fault": "extra_work", "fault_factor": "2"}, "$.tasks[0].fault_factor: expected a number, got a string ('2')"),
    ({"name": "median", "params": {"fault": "extra_memory", "fault_factor": 1}}, "$.tasks[0].params.fault_factor: expected a number > 1"),
    ({"name": "median", "fault_factor": 2}, "$.tasks[0]: 'fault_factor' needs 'fault' as well"),
    ({"name": "median", "fault": "extra_work", "params": {"fault_factor": 2}},
     "$.tasks[0].params: 'fault_factor' needs 'fault' as well"),  # as fault_at: together, in one place
    ({"name": "median", "fault": "extra_work", "fault_factor": 2, "params": {"fault": "extra_work", "fault_factor": 2}},
     "task 1 ('median'): 'fault' given both in the task and in its params"),
    ({"name": "median", "fault": "extra_work", "fault_at": 1},
     "task 1 ('median'): 'fault_at' does not apply to fault 'extra_work', a regression that starts with the work"),
    ({"name": "median", "params": {"fault": "double_write", "fault_at": 0}}, "'fault_at' does not apply to fault 'double_write'"),
    ({"name": "median", "fault": "cpu_hog", "fault_factor": 2},
     "task 1 ('median'): 'fault_factor' applies only to the regression faults extra_work, extra_memory, double_write"),
])
def test_a_bad_regression_is_refused_in_one_line(folder, task, fragment):
    assert fragment in order_error(order_file(folder, task))


def test_fault_factor_is_reserved_like_fault_and_fault_at():
    with pytest.raises(TaskParameterError, match="'fault_factor' is reserved"):
        get_task("blur").resolve_params({"fault_factor": 2})
    with pytest.raises(ValueError, match="reserved"):
        ImageTask(name="x", summary="x", params={"fault_factor": Param(float, 1.0)}, apply=lambda i, p: i)


def test_a_factor_of_one_or_less_is_no_regression():
    for factor in (1.0, 0.5, float("nan")):
        with pytest.raises(ValueError, match="factor must be a number > 1"):
            Fault("extra_work", 0.0, threading.Event(), factor)


# --- the command line -------------------------------------------------------------------------


def invocation(image: Path, task: str = "median", fault: str | None = None, factor: float = 1.5) -> TaskInvocation:
    return TaskInvocation(ORDER_ID, (task,), task, (), image, fault=fault, fault_factor=factor)


def test_the_factor_travels_on_the_command_line_and_fault_at_does_not():
    inv = invocation(Path("/in.png"), fault="extra_memory", factor=2.25)
    args = inv.to_args()
    assert args[args.index("--fault") + 1] == "extra_memory"
    assert args[args.index("--fault-factor") + 1] == "2.25" and "--fault-at" not in args
    assert TaskInvocation.from_args(args) == inv
    hog = TaskInvocation(ORDER_ID, ("blur",), "blur", (), Path("/in.png"), fault="cpu_hog", fault_at=2.0)
    assert "--fault-factor" not in hog.to_args() and "--fault-at" in hog.to_args()  # as before
    assert TaskInvocation.from_args(hog.to_args()) == hog


def test_a_kubernetes_job_carries_the_factor(tmp_path):
    settings = Settings.from_env({"PIPELINE_STATE_DIR": str(tmp_path), "K8S_NAMESPACE": "pipelines"})
    job = JobTemplates(settings, run_id="abc123").task_job(invocation(Path("/artifacts/x.png"), fault="extra_work",
                                                                      factor=3.0), 60.0, None)
    task = next(c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "task")
    assert task["args"][task["args"].index("--fault-factor") + 1] == "3.0"


# --- what they do to a real task ---------------------------------------------------------------


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "photo-600x450.png"
    make_image(600, 450, 11).save(path)
    return path


def operation_cpu(kind: str | None, image: Image.Image, factor: float = 1.5) -> tuple[float, Image.Image]:
    fault = Fault(kind, 0.0, threading.Event(), factor)
    began = time.process_time()
    result = fault.work(get_task("median").run, image, {})
    return time.process_time() - began, result


def test_extra_work_does_the_operation_factor_times_over_and_keeps_its_output(photo):
    with Image.open(photo) as opened:
        image = opened.copy()
    healthy, output = operation_cpu(None, image)
    healthy = statistics.median([healthy, *(operation_cpu(None, image)[0] for _ in range(2))])
    faulted = [operation_cpu("extra_work", image) for _ in range(3)]
    ratio = statistics.median(cpu for cpu, _ in faulted) / healthy
    print(f"extra_work x1.5: operation CPU {ratio:.2f} x a healthy run's")
    assert 1.25 <= ratio <= 1.9
    assert ImageChops.difference(faulted[0][1], output).getbbox() is None  # the same output


# A task's work as the runtime does it (services/runtime/runner.py _work: read, operate, save
# beside, rename), in a process of its own without Kafka; it reports the kernel's counts.
CHILD = """
import json, sys, threading, time
from pathlib import Path
from pipeline.invocation import TaskInvocation
from pipeline.settings import Settings
from services.catalog import get_task
from services.runtime import runner

def written():
    lines = Path("/proc/self/io").read_text().splitlines()
    return int(dict(line.split(": ") for line in lines)["write_bytes"])

artifacts = Path(sys.argv[1])
inv = TaskInvocation.from_args(sys.argv[2:])
settings = Settings.from_env({"PIPELINE_STATE_DIR": str(artifacts.parent / "state"), "ARTIFACT_DIR": str(artifacts)})
before, cpu_before = written(), time.process_time_ns()
output, operation_ns = runner._work(get_task(inv.task_name), inv, settings, threading.Event())
after, cpu_after = written(), time.process_time_ns()
# VmHWM: this address space's own peak (ru_maxrss would hold the pytest process's, from before exec).
status = Path("/proc/self/status").read_text().splitlines()
peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"peak_kib": peak_kib, "write_bytes": after - before, "output": str(output),
                  "operation_ns": operation_ns, "process_ns": cpu_after - cpu_before}))
"""


def run_child(tmp_path_factory, photo, kind: str | None) -> dict:
    artifacts = tmp_path_factory.mktemp(f"run-{kind}") / "artifacts"
    args = invocation(photo, fault=kind).to_args()
    done = subprocess.run([sys.executable, "-c", CHILD, str(artifacts), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    result["files"] = sorted(p.name for p in Path(result["output"]).parent.iterdir())
    result["size"] = Path(result["output"]).stat().st_size
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory, photo) -> dict[str | None, dict]:
    """One healthy run of median on the photo and one with each of extra_memory and
    double_write (factor 1.5), each in a folder of its own."""
    return {kind: run_child(tmp_path_factory, photo, kind) for kind in (None, "extra_memory", "double_write")}


def test_the_runtime_measures_its_operations_cpu_time_and_extra_work_makes_it_factor_times(tmp_path_factory, photo):
    # three runs of each, in processes of their own as the runtime runs them: the median
    healthy = [run_child(tmp_path_factory, photo, None) for _ in range(3)]
    faulted = [run_child(tmp_path_factory, photo, "extra_work") for _ in range(3)]
    for run in healthy + faulted:
        # the operation is part of the process's CPU time over the whole work (which also
        # decodes the input), measured by the process clock around it
        assert 0 < run["operation_ns"] <= run["process_ns"]
    ratio = statistics.median(r["operation_ns"] for r in faulted) / statistics.median(r["operation_ns"] for r in healthy)
    share = statistics.median(r["operation_ns"] / r["process_ns"] for r in healthy)
    print(f"extra_work x1.5: the operation's CPU time {ratio:.2f} x a healthy run's "
          f"(the operation is {share:.0%} of the work's process CPU)")
    assert 1.25 <= ratio <= 1.9
    assert share > 0.5  # median on 600x450: the operation is most of the work


def test_extra_memory_makes_the_peak_resident_size_factor_times_a_healthy_runs(runs):
    ratio = runs["extra_memory"]["peak_kib"] / runs[None]["peak_kib"]
    print(f"extra_memory x1.5: peak resident {ratio:.2f} x a healthy run's ({runs[None]['peak_kib'] // 1024} MiB)")
    assert 1.3 <= ratio <= 1.8
    assert Path(runs["extra_memory"]["output"]).read_bytes() == Path(runs[None]["output"]).read_bytes()


def test_double_write_writes_the_output_twice_and_leaves_one_file(runs):
    healthy, faulted = runs[None], runs["double_write"]
    if healthy["write_bytes"] == 0:
        pytest.skip("this file system does not count write_bytes (tmpfs)")
    ratio = faulted["write_bytes"] / faulted["size"]
    print(f"double_write: write_bytes {ratio:.2f} x the output's size (healthy {healthy['write_bytes'] / healthy['size']:.2f})")
    assert 0.9 <= healthy["write_bytes"] / healthy["size"] <= 1.2
    assert 1.8 <= ratio <= 2.3
    assert faulted["files"] == healthy["files"] == [Path(healthy["output"]).name]  # no copy, no .partial left
    assert Path(faulted["output"]).read_bytes() == Path(healthy["output"]).read_bytes()


def test_the_tasks_own_totals_carry_its_output_and_its_operations_cpu_time(tmp_path):
    from services.runtime.totals import operation_clock_ns, own_totals

    output = tmp_path / "out.png"
    output.write_bytes(b"x" * 1234)
    began = operation_clock_ns()
    sum(i * i for i in range(200_000))  # some CPU in this thread
    spent = operation_clock_ns() - began
    totals = own_totals(output, spent)
    assert totals.output_bytes == 1234 and totals.operation_ns == spent > 0
    assert totals.cpu_ns >= spent  # the process's clock holds the operation's
    assert totals.peak_rss_kib > 0 and totals.ended_ns > 0
