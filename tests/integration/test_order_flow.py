"""Orders end to end through the real broker and database: tasks, monitors, storage, failures."""

from __future__ import annotations

import signal
from collections import Counter

import psutil
import pytest
from PIL import Image

from pipeline.kafka import TopicAdmin
from pipeline.protocol import RESOURCES, order_topics, resource_topic
from devkit.orders import (
    REPO, all_stored_orders, pipeline_processes, run_orchestrator, start_orchestrator, stored_orders,
    write_order,
)
from devkit.waiting import PATIENCE, committed_offset, read_to_end, wait_for


def _runtime_seconds(run: dict) -> float:
    return (run["finished_at"] - run["started_at"]).total_seconds()


def test_three_concurrent_orders_run_their_tasks_and_store_every_resource(settings, tmp_path):
    files = [
        write_order(tmp_path, "edges", [{"name": "resize", "params": {"width": 320, "height": 240}},
                                        "grayscale", "edge_detect"]),
        write_order(tmp_path, "blur-twice", ["blur", "blur", "sharpen"], image="china.jpg"),
        write_order(tmp_path, "heavy", [{"name": "median", "params": {"size": 5, "passes": 3}}, "rotate"],
                    image="scene-1024x768.jpg"),
    ]
    result = run_orchestrator(settings, *map(str, files))
    assert result.returncode == 0, result.stderr[-3000:]

    stored = stored_orders(settings)
    assert {o.status for o in stored.values()} == {"SUCCEEDED"}
    assert len({o.id for o in stored.values()}) == 3
    for order in stored.values():
        successful = [r for r in order.runs if r["status"] == "SUCCEEDED"]
        assert [r["position"] for r in successful] == list(range(len(successful)))
        own_tasks = {r["task"] for r in order.runs}
        # No cross-talk: every stored sample names one of this order's tasks.
        assert {s["task"] for s in order.samples} <= own_tasks
        for run in successful:
            # A sample names its run (position, attempt). Not matched by time: a task reports
            # its end (HALT, the run's finished_at) before its process has exited, and a tick
            # in between is the run's own last sample, stamped after finished_at.
            in_run = [s for s in order.samples if (s["position"], s["attempt"]) == (run["position"], run["attempt"])]
            assert {s["task"] for s in in_run} <= {run["task"]}
            per_resource = Counter(s["resource"] for s in in_run)
            assert set(per_resource) == set(RESOURCES), (order.name, run["task"], per_resource)
            expected = _runtime_seconds(run)
            for resource, count in per_resource.items():
                # At least one sample even for a short task, and never more than one a second
                # (plus the opening and closing ones). How many a busy machine manages is
                # not asserted: the sampler skips ticks it missed rather than bunching them.
                assert 1 <= count <= expected + 2, (order.name, run["task"], resource, count, expected)

    outputs = {o.name: [r["output"] for r in o.runs if r["status"] == "SUCCEEDED"] for o in stored.values()}
    with Image.open(outputs["edges"][0]) as img:
        assert img.size == (320, 240) and img.mode == "RGB"
    with Image.open(outputs["edges"][2]) as img:
        assert img.size == (320, 240) and img.mode == "L"
    with Image.open(outputs["blur-twice"][1]) as img, Image.open(REPO / "orders/images/china.jpg") as src:
        assert img.size == src.size
    with Image.open(outputs["heavy"][1]) as img:
        assert img.size == (768, 1024)  # rotated by 90 degrees with expand
    for paths in outputs.values():
        assert len(set(paths)) == len(paths)  # one file per task, the repeated blur too
        for path in paths:
            with Image.open(path) as img:
                img.verify()
    for order in stored.values():
        assert pipeline_processes(settings, order.id) == []
    assert "SUCCEEDED" in result.stdout and "sample rows stored" in result.stdout


@pytest.mark.parametrize("fault, retry, reason", [
    ("raise", {"max_attempts": 2, "backoff_seconds": 0.2}, "InjectedFault"),
    ("stall", {"max_attempts": 2, "backoff_seconds": 0.2, "task_timeout_seconds": 4}, "no PROGRESS within"),
])
def test_a_failing_task_is_retried_then_the_order_fails_cleanly(settings, tmp_path, fault, retry, reason):
    path = write_order(tmp_path, f"fails-{fault}", ["grayscale", {"name": "blur", "fault": fault}, "sharpen"],
                       retry=retry)
    result = run_orchestrator(settings, str(path))
    assert result.returncode == 1, result.stderr[-3000:]
    order = stored_orders(settings)[f"fails-{fault}"]
    assert order.status == "FAILED"
    blur_runs = [r for r in order.runs if r["position"] == 1]
    assert [(r["attempt"], r["status"]) for r in blur_runs] == [(1, "FAILED"), (2, "FAILED")]
    assert all(reason in r["error"] for r in blur_runs)
    assert not [r for r in order.runs if r["position"] == 2]  # sharpen never started
    assert "FAILED" in result.stdout and reason in result.stdout
    assert pipeline_processes(settings, order.id) == []


def test_a_killed_monitor_consumer_is_restarted_and_loses_or_duplicates_nothing(settings, tmp_path):
    path = write_order(tmp_path, "long", [{"name": "blur", "fault": "cpu_hog"}, "grayscale"])
    orchestrator = start_orchestrator(settings, str(path), "--keep-topics")
    try:
        consumer = _wait_for_monitor(settings, "consumer", timeout=PATIENCE)
        order_id = int(consumer.cmdline()[4])  # python -m monitor consumer ORDER_ID
        # Killed once it has stored and committed samples, so that its successor must resume
        # from a committed offset, not from the start of the topic.
        committed = wait_for(
            lambda: max(committed_offset(settings, f"monitor-consumer-{order_id}", resource_topic(order_id)), 0),
            "offsets committed by the monitor-consumer")
        assert consumer.is_running() and consumer.status() != psutil.STATUS_ZOMBIE
        consumer.send_signal(signal.SIGKILL)
        out, err = orchestrator.communicate(timeout=PATIENCE * 2)
    finally:
        if orchestrator.poll() is None:
            orchestrator.kill()
    assert orchestrator.returncode == 0, err[-3000:]
    assert "restarting it" in err
    order = stored_orders(settings)["long"]
    assert order.id == order_id
    produced = _samples_on_topic(settings, order.id)
    stored = Counter((s["task"], s["resource"], s["ts"]) for s in order.samples)
    # More was produced than the killed consumer had committed: its successor stored the rest.
    assert len(order.samples) == len(produced) > committed > 0
    assert max(stored.values()) == 1
    assert pipeline_processes(settings, order.id) == []
    # Kept only to count what was produced: later tests' fresh databases reuse the id.
    TopicAdmin(settings).delete(list(order_topics(order.id)))


def test_ctrl_c_cancels_and_leaves_nothing_running(settings, tmp_path):
    path = write_order(tmp_path, "cancelled", [{"name": "blur", "fault": "stall"}, "grayscale"])
    orchestrator = start_orchestrator(settings, str(path))
    try:
        _wait_for_process(settings, lambda cmd: cmd[2:3] == ["services.blur.main"])
        orchestrator.send_signal(signal.SIGINT)
        out, err = orchestrator.communicate(timeout=PATIENCE)
    finally:
        if orchestrator.poll() is None:
            orchestrator.kill()
    assert orchestrator.returncode == 130, err[-3000:]
    order = stored_orders(settings)["cancelled"]
    assert order.status == "CANCELLED"
    assert pipeline_processes(settings, order.id) == []


def test_a_second_signal_forces_the_exit_in_one_line_and_leaves_nothing_running(settings, tmp_path):
    path = write_order(tmp_path, "forced", [{"name": "blur", "fault": "stall"}, "grayscale"])
    orchestrator = start_orchestrator(settings, str(path))
    blur = None
    try:
        blur = _wait_for_process(settings, lambda cmd: cmd[2:3] == ["services.blur.main"], timeout=PATIENCE)
        # A task that does not stop at once (SIGSTOP holds the SIGTERM it gets pending): the
        # cancellation then waits for it, and the second signal comes while it does, not
        # before the first was handled nor after the cancellation was over.
        blur.suspend()
        orchestrator.send_signal(signal.SIGTERM)
        wait_for(lambda: _pending(blur.pid, signal.SIGTERM), "the cancellation stopping the task")
        orchestrator.send_signal(signal.SIGTERM)
        blur.resume()  # it gets its SIGTERM now, as the way out asks of it
        out, err = orchestrator.communicate(timeout=PATIENCE)
    finally:
        if blur is not None and blur.is_running():
            blur.resume()
        if orchestrator.poll() is None:
            orchestrator.kill()
    assert orchestrator.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.rstrip().splitlines()[-1] == "interrupted", err[-3000:]
    assert (out + err).count("cancelling") == 1, err[-3000:]  # the first signal's; the second forced
    order = stored_orders(settings)["forced"]
    # What the way out did not stop goes with its parent.
    wait_for(lambda: pipeline_processes(settings, order.id) == [], "the order's processes gone")


def _pending(pid: int, signum: int) -> bool:
    """Whether ``signum`` is pending for process ``pid`` (as for a stopped process)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & (1 << (signum - 1)):
                return True
    return False


def _wait_for_process(settings, match, timeout: float = PATIENCE) -> psutil.Process:
    """A process of this test's run (matched by its DATABASE_URL) whose command line matches."""
    def found() -> psutil.Process | None:
        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info["cmdline"] or []
            try:
                if (len(cmdline) > 2 and match(cmdline)
                        and process.environ().get("DATABASE_URL") == settings.database_url):
                    return process
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return None

    return wait_for(found, "the process", timeout, every=0.2)


def _wait_for_monitor(settings, kind: str, timeout: float) -> psutil.Process:
    return _wait_for_process(settings, lambda cmd: cmd[1:4] == ["-m", "monitor", kind], timeout)


def _samples_on_topic(settings, order_id: int) -> set[tuple[str, int]]:
    """Distinct (key, timestamp) samples the producer put on resource<ID> (the order is over:
    the topic's end is where it stays)."""
    return {(m.key, m.timestamp_ms) for m in read_to_end(settings, resource_topic(order_id)) if m.key != "STOP"}


def test_topics_left_by_another_database_are_left_alone_and_their_id_skipped(settings, tmp_path):
    from pipeline.kafka import Producer
    from pipeline.protocol import MonitorTerminated, OrderStopped, task_topic

    # A fresh database hands out order id 1 again; leave behind what an old order 1 said
    # (another database's order on the same broker may still be using these topics).
    admin = TopicAdmin(settings)
    leftover = [t for t in order_topics(1) if t not in admin.existing()]
    if leftover:
        admin.create(leftover)
    try:
        with Producer(settings) as producer:
            producer.send(OrderStopped(1).encode())
            producer.send(MonitorTerminated(1).encode())
        path = write_order(tmp_path, "after-reset", [{"name": "median", "params": {"passes": 2}}])
        result = run_orchestrator(settings, str(path))
        assert result.returncode == 0, result.stderr[-3000:]
        orders = {o.id: o for o in all_stored_orders(settings)}
        order = next(o for o in orders.values() if o.name == "after-reset" and o.runs)
        assert order.id != 1 and order.status == "SUCCEEDED"
        assert {s["resource"] for s in order.samples} == set(RESOURCES)
        # Id 1 was skipped, saying why, and the other database's topics are untouched.
        assert orders[1].status == "FAILED" and "skipped" in _order_error(settings, 1)
        keys = [m.key for m in read_to_end(settings, task_topic(1))]
        assert keys[-2:] == ["STOP", "TERMINATE"]
    finally:
        if leftover:
            admin.delete(leftover)


def _order_error(settings, order_id: int) -> str:
    from pipeline.db import connect
    from pipeline.db.orders import OrderStore

    return OrderStore(connect(settings.database_url)).get(order_id).error or ""


def test_a_killed_orchestrator_leaves_no_task_or_monitor_behind(settings, tmp_path):
    path = write_order(tmp_path, "orphaned", [{"name": "blur", "fault": "stall"}, "grayscale"])
    orchestrator = start_orchestrator(settings, str(path))
    try:
        _wait_for_process(settings, lambda cmd: cmd[2:3] == ["services.blur.main"])
        orchestrator.send_signal(signal.SIGKILL)
        orchestrator.wait(PATIENCE)
        # (the monitor-producer waits up to 30 s for TERMINATE)
        wait_for(lambda: pipeline_processes(settings) == [], "every task and monitor gone", every=0.5)
    finally:
        for process in pipeline_processes(settings):
            process.kill()
