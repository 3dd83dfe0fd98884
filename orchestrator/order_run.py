"""One run of one order: topics, monitors, then the tasks one at a time with retries."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.anomaly_feed import AnomalyFeed
from orchestrator.orders import Order, TaskSpec, input_image
from orchestrator.progress_listener import ProgressListener
from orchestrator.report import OrderResult, Reporter, TaskResult
from orchestrator.runtime import Handle, Runtime, TaskLaunch
from orchestrator.runtime.base import RuntimeFailure
from services.runtime.confinement import is_under
from pipeline.db.orders import SHARED_MONITORS, OrderStore, RunStatus
from pipeline.errors import DatabaseError, PipelineError
from pipeline.kafka import Producer, TopicAdmin
from pipeline.protocol import OrderStopped, Progress, TaskStatus, order_topics
from models.registry_probe import champion_may_exist

logger = logging.getLogger(__name__)

MONITOR_KINDS = ("producer", "consumer")
MONITOR_EXIT_TIMEOUT = 60.0
# How long an order monitored by the shared services waits for their TERMINATE (all its
# samples stored) once its tasks are over; a backlog of many orders may take a while.
SHARED_TERMINATE_TIMEOUT = 300.0
# An order whose samples are not confirmed this long after its tasks ended says so (and what
# to do) on the console, then goes on waiting.
CONFIRM_NOTICE_SECONDS = 10.0
# Once cancelled (the first Ctrl-C or SIGTERM) an order's wind-down waits at most this long for
# its monitors: what they have not confirmed by then is kept for the next run, as for a dead
# orchestrator. Together with the task's own stop grace this keeps a cancel under 10 s.
CANCEL_GRACE = 3.0
TASK_STOP_GRACE = 5.0
EXIT_AFTER_PROGRESS_TIMEOUT = 30.0
WIND_DOWN_RESTARTS = 3  # a monitor-consumer failing after the last task is started again this often
LATE_PROGRESS_WAIT = 3.0
MAX_SKIPPED_IDS = 1000


@dataclass(frozen=True)
class Services:
    """What every order of one orchestrator run shares."""

    runtime: Runtime
    store: OrderStore
    admin: TopicAdmin
    producer: Producer
    listener: ProgressListener
    reporter: Reporter
    cancel: threading.Event
    keep_topics: bool = False
    monitoring: bool = True  # False: no monitors at all (`run --no-monitors`)
    shared_monitors: bool = False  # True: the shared sampler and consumer serve the orders
    # Where live scoring looks for its model (None: live scoring is off).
    scoring_tracking_uri: str | None = None
    anomalies: AnomalyFeed | None = None  # shows the orders' anomalies as they are raised
    artifact_dir: Path | None = None  # where every task output lies (ARTIFACT_DIR)
    task_slots: TaskSlots | None = None  # None: every order's task starts at once


class TaskSlots:
    """How many tasks of all orders run at once: a task attempt takes a slot before it starts
    and gives it back once stopped, so many orders at once queue for a slot rather than for
    the CPU (where the broker and the monitors, which every order waits for, would starve)."""

    def __init__(self, slots: int, cancel: threading.Event) -> None:
        self._free = threading.BoundedSemaphore(slots)
        self._cancel = cancel

    def take(self) -> bool:
        """Wait for a slot; False when cancelled first (a slot freed by the cancel's own
        stopping of a task is not taken)."""
        while not self._cancel.is_set():
            if self._free.acquire(timeout=0.2):
                if not self._cancel.is_set():
                    return True
                self._free.release()
        return False

    def give_back(self) -> None:
        self._free.release()


class _AttemptFailed(Exception):
    pass


class _MonitorStart:
    """A monitor on its way up. Its readiness is awaited beside the tasks, never before them:
    the producer replays ``task<ID>`` from its start and a task's HALT carries its totals, so
    a task that runs before the monitors are up is still measured in full (measuring must not
    delay the work it measures)."""

    def __init__(self, handle: Handle, timeout: float) -> None:
        self.handle = handle
        self.error: RuntimeFailure | None = None
        self._thread = threading.Thread(target=self._wait, args=(timeout,), daemon=True,
                                        name=f"ready-{handle.name}")
        self._thread.start()

    def _wait(self, timeout: float) -> None:
        # A monitor that is slow to start (a busy machine) delays nothing but its own
        # samples, which it catches up on: only one that exited is a failure.
        while True:
            try:
                self.handle.wait_ready(timeout)
                return
            except RuntimeFailure as exc:
                if self.handle.exit_code() is not None:
                    self.error = exc
                    return
                logger.warning("%s not ready after %gs; still waiting for it", self.handle.name, timeout)

    @property
    def settled(self) -> bool:
        return not self._thread.is_alive()

    def settle(self, timeout: float, cancel: threading.Event) -> None:
        """Wait for the outcome (or a cancel); raise RuntimeFailure if the monitor never
        became ready."""
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and not cancel.is_set() and time.monotonic() < deadline:
            self._thread.join(0.2)
        if self.error is not None:
            raise self.error


class OrderRun:
    """Runs one order to SUCCEEDED, FAILED or CANCELLED; never raises for a task's failure."""

    def __init__(self, order: Order, services: Services) -> None:
        self.order = order
        self.s = services
        self.result = OrderResult(order.name, str(order.source or ""),
                                  tasks=[TaskResult(i, t.name) for i, t in enumerate(order.tasks)])
        self.order_id: int | None = None
        self._monitors: dict[str, Handle] = {}
        self._starting: dict[str, _MonitorStart] = {}
        self._progress: queue.Queue[Progress] | None = None
        self._terminated: threading.Event | None = None  # shared monitors: TERMINATE seen
        self._cancel_deadline: float | None = None  # set once the wind-down sees the cancel
        self._image = order.image  # where the tasks read it (see Runtime.stage_input)

    def run(self) -> OrderResult:
        began = time.monotonic()
        try:
            self.order_id = self._new_order_id()
            self.result.order_id = self.order_id
            status, error = self._run_tasks()
        except PipelineError as exc:  # the broker, the database, a monitor that never came up
            logger.debug("order_id=%s failed outside its tasks", self.order_id, exc_info=True)
            status, error = RunStatus.FAILED, str(exc)
        finally:
            self._wind_down()
        self.result.status, self.result.error = status, error
        self.result.seconds = time.monotonic() - began
        # Unconfirmed by the shared consumer: its topics stay, and the order stays the shared
        # services' to serve (orders.topics_kept, monitor/claims.py).
        unconfirmed = self._terminated is not None and not self._terminated.is_set()
        recorded = self.order_id is None or self._record_end(status, error, topics_kept=unconfirmed)
        if self.order_id is not None:
            if not recorded:
                logger.warning("order_id=%d topics kept: the next orchestrator to start stores what "
                               "is left on them", self.order_id)
            elif not unconfirmed:
                self._remove_topics()
            else:
                logger.warning("order_id=%d topics kept: the shared consumer has not confirmed "
                               "storing every sample yet", self.order_id)
        if recorded:
            self._say(f"{status.value} after {self.result.seconds:.1f}s, {self.result.rows} sample rows stored")
            self._warn_if_unmeasured()
        return self.result

    def _warn_if_unmeasured(self) -> None:
        """A monitored order whose tasks ran but left no sample row was not measured: every
        task run yields at least its closing sample, so zero rows is never a quiet success."""
        ran = any(task.attempts for task in self.result.tasks)
        if self.s.monitoring and ran and self.result.rows == 0 and self.result.status is not RunStatus.CANCELLED:
            warning = ("no sample of its tasks was stored: the monitors did not serve it (see "
                       "`python -m pipeline infra status` and the monitors' logs)")
            self.result.warnings.append(warning)
            self._say(f"warning: {warning}")

    def _record_end(self, status: RunStatus, error: str | None, topics_kept: bool) -> bool:
        """Store how the order ended; False (said in one line) when the database stayed away
        for longer than DB_RETRY_SECONDS: the next orchestrator to start marks it then."""
        try:
            self.s.store.set_status(self.order_id, status, error, topics_kept)
            self.result.rows = self.s.store.count_measurements(self.order_id)
        except DatabaseError as exc:
            self.result.status = RunStatus.FAILED
            self.result.error = f"{error or status.value}; not recorded: {exc}"
            self._say(f"{status.value} after {self.result.seconds:.1f}s but not recorded: {exc}; "
                      "the next orchestrator to start marks it FAILED")
            return False
        return True

    def _monitors_kind(self) -> str | None:
        """What ``orders.monitors`` records (the shared services serve only "shared")."""
        if not self.s.monitoring:
            return None
        return SHARED_MONITORS if self.s.shared_monitors else "per-order"

    def _run_tasks(self) -> tuple[RunStatus, str | None]:
        order_id = self.order_id
        self._progress = self.s.listener.register(order_id)
        if self.s.anomalies is not None:
            self.s.anomalies.register(order_id, self.order.name, len(self.order.tasks))
        self._image = self.s.runtime.stage_input(self.order.image, order_id)
        if self.s.monitoring and self.s.shared_monitors:
            self._terminated = self.s.listener.watch_terminate(order_id)
        else:
            # Where each task pod samples itself, the order needs no producer of its own.
            kinds = ("consumer",) if self.s.runtime.samples_in_task_pods else MONITOR_KINDS
            self._start_monitors(kinds if self.s.monitoring else ())
        uri = self.s.scoring_tracking_uri
        if "consumer" in self._starting and uri and champion_may_exist(uri):
            # A consumer that scores loads its model before it reports ready (seconds of CPU):
            # the tasks wait for that rather than share the machine with it.
            self._starting.pop("consumer").settle(self.s.runtime.monitor_ready_timeout, self.s.cancel)
        self.s.store.set_status(order_id, RunStatus.RUNNING)
        monitors = ("shared monitors" if self.s.shared_monitors else "monitors starting") \
            if self.s.monitoring else "no monitors"
        self._say(f"running {len(self.order.tasks)} task(s) on {self.order.image.name} ({monitors})")
        progress: tuple[str, ...] = ()
        for position, spec in enumerate(self.order.tasks):
            if self.s.cancel.is_set():
                return RunStatus.CANCELLED, "cancelled by the user"
            outputs = self._run_task(position, spec, progress)
            if outputs is None:
                if self.s.cancel.is_set():
                    return RunStatus.CANCELLED, "cancelled by the user"
                task = self.result.tasks[position]
                return RunStatus.FAILED, f"task {position + 1} ({spec.name}) failed: {task.error}"
            progress = outputs
        return RunStatus.SUCCEEDED, None

    def _run_task(self, position: int, spec: TaskSpec, progress: tuple[str, ...]) -> tuple[str, ...] | None:
        """All attempts of one task; the outputs so far on success, None on failure."""
        result = self.result.tasks[position]
        retry = self.order.retry
        name = f"task {position + 1}/{len(self.order.tasks)} {spec.name}"
        for attempt in range(1, retry.max_attempts + 1):
            launch = TaskLaunch(self.order_id, self.order.task_names, spec.name, progress,
                                self._image, dict(spec.params), spec.fault, spec.fault_at, attempt,
                                fault_factor=spec.fault_factor)
            if not self._take_slot():
                return None  # cancelled while waiting for a slot
            try:
                result.attempts = attempt
                self._say(f"{name} started" + (f" (attempt {attempt}/{retry.max_attempts})" if attempt > 1 else ""))
                began = time.monotonic()
                try:
                    reported = self._attempt(launch, spec)
                    outputs, failure = reported.outputs, None
                except (RuntimeFailure, _AttemptFailed) as exc:  # RuntimeFailure: the order cannot go on
                    reported, failure = None, exc
                result.seconds = time.monotonic() - began
                status = RunStatus.SUCCEEDED if failure is None else RunStatus.FAILED
                result.status, result.error = status, None if failure is None else str(failure)
                self.s.store.finish_task(self.order_id, position, attempt, status,
                                         output=outputs[-1] if failure is None else None,
                                         error=result.error,
                                         output_bytes=self._output_bytes(outputs[-1]) if failure is None else None,
                                         operation_ns=None if reported is None else reported.operation_ns)
            finally:
                self._give_back_slot()
            if failure is None:
                result.output = outputs[-1]
                self._say(f"{name} done in {result.seconds:.1f}s")
                return outputs
            if isinstance(failure, RuntimeFailure):
                raise failure
            self._say(f"{name} failed: {failure}")
            if self.s.cancel.is_set() or attempt == retry.max_attempts:
                return None
            if self.s.cancel.wait(retry.backoff_seconds * 2 ** (attempt - 1)):
                return None
        return None

    def _take_slot(self) -> bool:
        """A running slot for the next attempt (see TaskSlots); False when cancelled first."""
        return self.s.task_slots is None or self.s.task_slots.take()

    def _give_back_slot(self) -> None:
        if self.s.task_slots is not None:
            self.s.task_slots.give_back()

    def _attempt(self, launch: TaskLaunch, spec: TaskSpec) -> Progress:
        """The attempt's PROGRESS, once it succeeded; :class:`_AttemptFailed` otherwise."""
        handle = self.s.runtime.start_task(launch, spec.resources, self.order.retry.task_timeout_seconds)
        started = time.monotonic()
        deadline = started + self.order.retry.task_timeout_seconds
        exited_at: float | None = None
        next_heartbeat = time.monotonic() + 10.0
        try:
            self.s.store.start_task(self.order_id, launch.position, launch.attempt, spec.name, spec.fault,
                                    started=handle.started_at(),
                                    **self._input_image(launch), params=spec.params)
            while True:
                if self.s.cancel.is_set():
                    raise _AttemptFailed("cancelled")
                progress = self._next_progress(launch)
                if progress is not None:
                    # Wait for the exit too: the task flushes HALT (and STOP) before exiting,
                    # so the next task's ORDER can never overtake them on task<ID>.
                    code = handle.wait(EXIT_AFTER_PROGRESS_TIMEOUT)
                    if progress.status is TaskStatus.FAILED:
                        raise _AttemptFailed(progress.error or "the task reported failure")
                    if code not in (0, None):
                        raise _AttemptFailed(f"reported success but exited with status {code}")
                    return progress
                now = time.monotonic()
                code = handle.exit_code()
                if code is not None:
                    # PROGRESS may still be on its way; give it a moment before calling it lost.
                    # A task that exited 0 has flushed its PROGRESS to the broker: on a busy
                    # machine its reading may lag, so it is waited for longer.
                    exited_at = exited_at or now
                    if now - exited_at > (LATE_PROGRESS_WAIT if code != 0 else EXIT_AFTER_PROGRESS_TIMEOUT):
                        raise _AttemptFailed(f"{handle.end_reason()} without reporting PROGRESS")
                elif now > deadline:
                    raise _AttemptFailed(f"no PROGRESS within {self.order.retry.task_timeout_seconds:g}s; stopped")
                self._supervise_monitors()
                if now > next_heartbeat:
                    self._say(f"task {launch.position + 1}/{len(self.order.tasks)} {launch.task_name} "
                              f"running {now - started:.0f}s")
                    next_heartbeat = now + 10.0
        finally:
            handle.stop(grace=TASK_STOP_GRACE)

    def _output_bytes(self, output: str) -> int | None:
        """The size of a run's output (what its writes are judged against), when it lies under
        the artifact directory (the path came in a PROGRESS message) and is readable here."""
        if not (self.s.artifact_dir and is_under(output, self.s.artifact_dir)):
            return None
        try:
            return os.stat(output).st_size
        except OSError:
            return None

    def _input_image(self, launch: TaskLaunch) -> dict[str, int]:
        """The facts of the image the task reads (orders.InputImage) as task_runs' columns.
        After the first task that is an output path from a PROGRESS message, which anyone
        able to write to the broker can forge: it is read only when it lies under the
        artifact directory (the task itself refuses one that does not,
        services/runtime/confinement.py)."""
        if launch.position > 0 and not (self.s.artifact_dir and is_under(launch.input_path, self.s.artifact_dir)):
            return {}
        facts = input_image(launch.input_path)
        if facts is None:
            return {}
        return {"input_pixels": facts.pixels, "input_channels": facts.channels, "input_bytes": facts.file_bytes}

    def _new_order_id(self) -> int:
        """A fresh orderID, with its topics created by this call.

        A topic of that name can only belong to another database that handed out the same id
        (a reset SQLite file, another developer's database on a shared broker): it may be in
        use, and a topic deleted and created again under the same name can be read from the
        old one's position by a reader that missed the deletion. So such an id is skipped (its
        row is marked FAILED, saying why), never its topics deleted."""
        for _ in range(MAX_SKIPPED_IDS):
            order_id = self.s.store.create(self.order.name, str(self.order.image), self.order.required_tasks,
                                           self.order.image_size)
            taken = self._claim_topics(order_id)
            if not taken:
                return order_id
            why = f"orderID {order_id} skipped: topics {', '.join(sorted(taken))} exist already (another database's)"
            logger.warning("%s", why)
            self.s.store.set_status(order_id, RunStatus.FAILED, why)
        raise PipelineError(f"{MAX_SKIPPED_IDS} orderIDs in a row have topics on the broker already; "
                            "delete the leftover task<ID>/resource<ID> topics or use another database")

    def _claim_topics(self, order_id: int) -> set[str]:
        """Create the id's topics and record its monitors; the topics that existed already
        (then the ones created here are deleted again, and the id is not to be used).

        Creation is exclusive (the broker says which topics existed), so two databases handing
        out the same id at the same moment never share its topics, as checking first and
        creating after would let them. The monitors are recorded only once the id is kept:
        until then no shared service may take leftover topics for this order's (nothing is
        on the new ones yet)."""
        topics = list(order_topics(order_id))
        try:
            taken = self.s.admin.create_exclusive(topics)
        except PipelineError as exc:  # the broker refused: this order ends here
            self.s.store.set_status(order_id, RunStatus.FAILED, str(exc))
            raise
        created = [t for t in topics if t not in taken]
        if taken:
            self._delete_created(order_id, created)
            return taken
        try:
            self.s.store.set_monitors(order_id, self._monitors_kind())
        except PipelineError:
            self._delete_created(order_id, created)
            raise
        return taken

    def _delete_created(self, order_id: int, created: list[str]) -> None:
        """Delete topics :meth:`_claim_topics` created for an id that is not used after all."""
        try:
            self.s.admin.delete(created)
        except PipelineError as exc:
            logger.warning("order_id=%d topics %s not deleted: %s", order_id, ", ".join(created), exc)

    def _start_monitors(self, kinds) -> None:
        """Start the monitors side by side; their readiness is checked while the tasks run."""
        for kind in kinds:
            self._monitors[kind] = handle = self.s.runtime.start_monitor(kind, self.order_id)
            self._starting[kind] = _MonitorStart(handle, self.s.runtime.monitor_ready_timeout)

    def _start_monitor(self, kind: str) -> None:
        handle = self.s.runtime.start_monitor(kind, self.order_id)
        self._monitors[kind] = handle
        handle.wait_ready(self.s.runtime.monitor_ready_timeout)

    def _supervise_monitors(self) -> None:
        """Restart a monitor that died mid-order. Nothing is lost: the consumer resumes from its
        last committed offset and the producer replays the task topic to regain its state.
        A monitor that cannot be restarted fails the order (RuntimeFailure)."""
        for kind, start in list(self._starting.items()):
            if start.settled:
                del self._starting[kind]
                if start.error is None:
                    logger.info("order_id=%d monitor-%s ready", self.order_id, kind)
                else:  # it exited while starting: restarted below, like one that dies later
                    logger.warning("order_id=%d %s", self.order_id, start.error)
        for kind, handle in list(self._monitors.items()):
            if kind in self._starting:
                continue  # still starting up: its readiness wait reports how that ends
            code = handle.exit_code()
            if code is not None:
                self._say(f"monitor-{kind} exited with status {code} mid-order; restarting it")
                handle.stop()
                self._start_monitor(kind)

    def _next_progress(self, launch: TaskLaunch) -> Progress | None:
        try:
            progress = self._progress.get(timeout=0.2)
        except queue.Empty:
            return None
        if progress.index != launch.position or progress.attempt != launch.attempt:
            logger.info("order_id=%d ignoring stale PROGRESS index=%d attempt=%d", launch.order_id,
                        progress.index, progress.attempt)
            return None
        return progress

    def _wind_down(self) -> None:
        """Complete the monitors' STOP/TERMINATE handshake, whatever happened; leave nothing running."""
        if self.order_id is None:
            return
        for kind, start in self._starting.items():
            try:
                start.settle(self.s.runtime.monitor_ready_timeout, self.s.cancel)
            except RuntimeFailure as exc:
                logger.error("order_id=%d %s", self.order_id, exc)
        last = self.result.tasks[-1]
        if (self._monitors or self._terminated is not None) and last.status is not RunStatus.SUCCEEDED:
            # The last task never sent STOP: send it for it, so the monitors end cleanly.
            try:
                self.s.producer.send_now(OrderStopped(self.order_id).encode())
            except PipelineError as exc:
                logger.error("order_id=%d could not send STOP: %s", self.order_id, exc)
            if self.s.runtime.samples_in_task_pods:
                # No task pod will relay this STOP to the consumer; a stop-only producer does.
                try:
                    self._monitors["producer"] = self.s.runtime.start_monitor("producer", self.order_id)
                except RuntimeFailure as exc:
                    logger.error("order_id=%d could not start the stop-only producer: %s",
                                 self.order_id, exc)
        if self._terminated is not None:
            self._await_terminate()
        self._await_monitors(MONITOR_EXIT_TIMEOUT)
        for handle in self._monitors.values():
            if handle.exit_code() is None:
                logger.warning("order_id=%d %s still running; stopping it", self.order_id, handle.name)
            handle.stop(grace=0.0 if self._cancelled_past_grace() else TASK_STOP_GRACE)
        self.s.listener.unregister(self.order_id)

    def _cancelled_past_grace(self) -> bool:
        """Whether the run was cancelled at least :data:`CANCEL_GRACE` seconds ago (as seen
        by the wind-down): from then on nothing is waited for."""
        if not self.s.cancel.is_set():
            return False
        if self._cancel_deadline is None:
            self._cancel_deadline = time.monotonic() + CANCEL_GRACE
        return time.monotonic() >= self._cancel_deadline

    def _await_terminate(self) -> None:
        """Wait for the shared consumer's TERMINATE (every sample of the order stored). Says
        within :data:`CONFIRM_NOTICE_SECONDS` when it does not come, with what to do; a cancel
        ends the wait within :data:`CANCEL_GRACE` (the topics are kept then, and what is on
        them is stored by the shared consumer or the next run)."""
        began = time.monotonic()
        noticed = False
        while not self._terminated.wait(0.2):
            if self._cancelled_past_grace():
                self._say("cancelled before the shared monitor-consumer confirmed this order's samples; "
                          "its topics are kept, and what is on them is stored by the shared consumer "
                          "or the next run")
                return
            waited = time.monotonic() - began
            if waited >= SHARED_TERMINATE_TIMEOUT:
                self._say(f"the shared monitor-consumer has not confirmed this order's samples after "
                          f"{SHARED_TERMINATE_TIMEOUT:g}s (no TERMINATE); its topics are kept so that it "
                          "can catch up")
                return
            if not noticed and waited >= CONFIRM_NOTICE_SECONDS:
                noticed = True
                self._notice_unconfirmed(waited)

    def _notice_unconfirmed(self, waited: float) -> None:
        """Say why this order's samples are not confirmed yet: a consumer that stores (this
        order's rows, or other orders confirmed meanwhile) is behind, which is said once for
        the run; one that has stored none of it and confirms nothing is not serving it."""
        wait = (f"orders wait up to {SHARED_TERMINATE_TIMEOUT:g}s for it (Ctrl-C or SIGTERM stops "
                "waiting and keeps their topics for the next run)")
        try:
            rows = self.s.store.count_measurements(self.order_id)
        except DatabaseError:
            rows = 0
        if rows or self.s.listener.confirmed_within(waited):
            self.s.reporter.once("consumer behind", f"the shared monitor-consumer is behind: it confirms "
                                                    f"orders' samples more than {waited:.0f}s after their "
                                                    f"tasks ended; {wait}")
            return
        self._say(f"the shared monitors have stored no sample of this order {waited:.0f}s after its tasks "
                  "ended and confirm nothing: they may be down, stuck or serving another database; see "
                  "`python -m pipeline infra status` and their logs, or restart them (`python -m pipeline "
                  f"infra down`, then run again); {wait}")

    def _await_monitors(self, grace: float) -> None:
        """Wait up to ``grace`` for the monitors to end their handshake. A monitor-consumer
        that fails on the way (the broker away longer than its clients wait) is started again,
        a few times: it resumes from its committed offsets, stores the rest and reaches STOP,
        so the order's last samples are not lost to a failure after its last task."""
        deadline = time.monotonic() + grace
        restarts = 0
        while not self._cancelled_past_grace():
            consumer = self._monitors.get("consumer")
            code = consumer.exit_code() if consumer is not None else None
            if code not in (None, 0) and restarts < WIND_DOWN_RESTARTS and not self.s.cancel.is_set():
                restarts += 1
                self._say(f"monitor-consumer exited with status {code} before storing every sample; "
                          "restarting it")
                consumer.stop()
                try:
                    self._start_monitor("consumer")
                except RuntimeFailure as exc:
                    logger.error("order_id=%d %s", self.order_id, exc)
                    return
                deadline = max(deadline, time.monotonic() + grace)
                continue
            if not any(h.exit_code() is None for h in self._monitors.values()) or time.monotonic() > deadline:
                return
            self.s.cancel.wait(0.2)

    def _remove_topics(self) -> None:
        """Housekeeping once the order is over (its end is recorded before: this waits for
        the broker)."""
        if not self.s.keep_topics:
            try:
                self.s.admin.delete(list(order_topics(self.order_id)))
            except PipelineError as exc:
                logger.warning("order_id=%d topics not deleted: %s", self.order_id, exc)

    def _say(self, text: str) -> None:
        self.s.reporter.line(f"order {self.order_id} {self.order.name}: {text}")
