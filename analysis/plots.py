"""``python -m monitor plot ORDER_ID``: one PNG per task run, a panel per resource: actual
usage, the expected median, the band shaded, anomalies marked, against seconds since the task
started; and a summary naming the task and resource that deviated first and most."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, select

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pipeline.db import connect, create_schema  # noqa: E402
from pipeline.db.retry import retrying  # noqa: E402
from pipeline.db.deviations import DeviationStore, to_ms  # noqa: E402
from pipeline.db.schema import measurements, resources, task_runs, tasks  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.protocol import Deviation  # noqa: E402
from pipeline.settings import Settings  # noqa: E402

logger = logging.getLogger(__name__)

PLOTS_EXPERIMENT = "deviation-plots"
# The panels every plot has, in this order (tools and tests read them back from the PNG's
# "Panels" text); resources beyond them follow when the order has them: the known ones in
# LATER_PANELS' order, then any other by name.
FIRST_PANELS = ("cpu", "memory", "disk_read", "disk_write", "cpu_wait")
# The run's totals (analysis/scoring.py RunCheck) are one point each, at the run's end (and
# cpu_seconds also where an overrun was caught): their band spans the run.
LATER_PANELS = ("cpu_demand", "cpu_seconds", "peak_memory", "bytes_read", "bytes_written", "node_cpu_pressure")
UNITS = {"cpu": "% of one core", "memory": "MiB resident", "disk_read": "KiB/s", "disk_write": "KiB/s",
         "cpu_wait": "% of one core, waiting", "cpu_demand": "% of one core, wanted",
         "cpu_seconds": "CPU s, run so far", "peak_memory": "MiB, run's peak", "bytes_read": "KiB, run total",
         "bytes_written": "KiB, run total", "node_cpu_pressure": "% of time, node"}


class PlotError(PipelineError):
    exit_code = 2


@dataclass(frozen=True)
class PlotResult:
    files: list[Path]
    summary: str
    model_version: str | None


def plot_order(settings: Settings, order_id: int, out_dir: Path, version: str | None = None) -> PlotResult:
    """Write the PNGs and the summary for ``order_id`` into ``out_dir``."""
    engine = connect(settings.database_url)
    version, rows, scored, starts = retrying(lambda: _order_rows(engine, order_id, version),
                                             f"order {order_id}: reading its samples",
                                             settings.db_retry_seconds)
    if not rows:
        raise PlotError(f"order {order_id} has no stored samples")
    panels = panels_for(r.resource for r in rows)
    runs: dict[int, list[Deviation]] = defaultdict(list)
    for row in rows:
        runs[row.index].append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for position, run_rows in sorted(runs.items()):
        path = out_dir / f"order-{order_id}-{position:02d}-{run_rows[0].task}.png"
        started = max(starts.get(position, {}).values(), default=None)  # its last attempt's start
        figure = draw_run(order_id, position, run_rows, panels, scored, version, started)
        save_figure(figure, path, f"order {order_id} task {position + 1}")
        files.append(path)
    summary = _summary(order_id, [r for r in rows if r.resource in scored], version)
    (out_dir / f"order-{order_id}-summary.txt").write_text(summary + "\n")
    return PlotResult(files, summary, version)


def panels_for(resources: Iterable[str]) -> list[str]:
    """The panels of an order's plots: FIRST_PANELS always, then the other resources it has."""
    others = set(resources) - set(FIRST_PANELS)
    known = [r for r in LATER_PANELS if r in others]
    return [*FIRST_PANELS, *known, *sorted(others - set(known))]


def draw_run(order_id: int, position: int, rows: list[Deviation], panels: list[str], scored: set[str],
             version: str | None, started_ms: int | None) -> Figure:
    """One task run's figure: a panel per resource of ``panels``, the band and median for the
    ``scored`` ones, one legend below the panels (outside them: it never hides a sample)."""
    # Each sample is a rate over the interval that ends at its timestamp (the first from the
    # task's start), so it is drawn as a step over that interval, the dot at its end.
    start = min([r.timestamp_ms for r in rows] + ([started_ms] if started_ms is not None else []))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.9 * len(panels) + 1.2), sharex=True,
                             squeeze=False, layout="constrained")
    for ax, resource in zip(axes[:, 0], panels):
        series = [r for r in rows if r.resource == resource]
        x = [(r.timestamp_ms - start) / 1000 for r in series]
        if series:
            xs = [0.0, *x]
            if version and resource in scored:
                ax.fill_between(xs, _steps([r.lower for r in series]), _steps([r.upper for r in series]),
                                color="tab:blue", alpha=0.2, step="pre", label="expected band (P10-P90)")
                ax.step(xs, _steps([r.expected for r in series]), where="pre", color="tab:blue",
                        linestyle="--", label="expected (P50)")
            ax.step(xs, _steps([r.value for r in series]), where="pre", color="black", label="actual")
            ax.plot(x, [r.value for r in series], color="black", marker=".", linestyle="none")
        else:
            ax.text(0.5, 0.5, "no samples", transform=ax.transAxes, ha="center", va="center", color="gray")
        flagged = [(xi, r.value) for xi, r in zip(x, series) if r.anomaly]
        if flagged:
            ax.scatter(*zip(*flagged), color="red", marker="x", s=60, zorder=5, label="anomaly")
        unscored = "not scored" if version and series and resource not in scored else None
        detail = "; ".join(part for part in (UNITS.get(resource), unscored) if part)
        ax.set_ylabel(f"{resource}\n({detail})" if detail else resource, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("seconds since the task started (each sample covers the interval up to its dot)")
    handles: dict[str, object] = {}
    for ax in axes[:, 0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=len(handles),
                   fontsize=8, frameon=False)
    what = f"model version {version}" if version else "not scored: no model"
    fig.suptitle(f"order {order_id}, task {position + 1}: {rows[0].task} ({what})")
    return fig


def save_figure(fig: Figure, path: Path, title: str) -> None:
    """Write the PNG, nothing clipped; the panels' resources, read back from the axes, go into
    its text chunks so that tests and tools can check the layout without parsing pixels."""
    panels = ",".join(ax.get_ylabel().split("\n")[0] for ax in fig.axes)
    fig.savefig(path, dpi=90, bbox_inches="tight", metadata={"Panels": panels, "Title": title})
    plt.close(fig)


def _steps(values: list[float]) -> list[float]:
    """``values`` for a step drawn from the task's start: the first interval begins at 0."""
    return [values[0], *values]


def _summary(order_id: int, rows: list[Deviation], version: str | None) -> str:
    if version is None:
        return f"order {order_id}: not scored (no expected-usage model); actual usage only"
    anomalous = [r for r in rows if r.anomaly]
    if not anomalous:
        return f"order {order_id} (model version {version}): no anomaly; {len(rows)} samples scored"
    first = min(anomalous, key=lambda r: r.timestamp_ms)
    most = max(rows, key=lambda r: abs(r.score))
    return "\n".join([
        f"order {order_id} (model version {version}): {len(anomalous)} anomalous samples of {len(rows)}",
        f"deviated first: task {first.index + 1} {first.task}, {first.resource} "
        f"(value {first.value:.1f}, expected {first.expected:.1f})",
        f"deviated most: task {most.index + 1} {most.task}, {most.resource} (score {most.score:+.1f})",
    ])


def _order_rows(engine: Engine, order_id: int, version: str | None):
    """The model version drawn; the rows to draw: the scored samples of that version (the
    newest by default) and, as measured, what the model did not score (context such as
    node_cpu_pressure, or a resource newer than the model); the scored resources; when each
    run's attempts started."""
    create_schema(engine)
    store = DeviationStore(engine)
    versions = store.versions(order_id)
    if version is not None and version not in versions:
        raise PlotError(f"order {order_id} has no deviations of model version {version}; "
                        f"run `python -m monitor rescore {order_id} --model {version}` first")
    version = version or (max(versions, key=_version_key) if versions else None)
    rows = store.read(order_id, version) if version else []
    scored = {r.resource for r in rows}
    starts = _run_starts(engine, order_id)
    rows += [r for r in _stored_samples(engine, order_id, starts) if r.resource not in scored]
    return version, rows, scored, starts


def _run_starts(engine: Engine, order_id: int) -> dict[int, dict[str, int]]:
    """Start (ms) of every task run: position -> task -> start of its last attempt."""
    with engine.connect() as conn:
        runs = conn.execute(
            select(task_runs.c.position, tasks.c.name, task_runs.c.started_at)
            .join(tasks, tasks.c.id == task_runs.c.task_id)
            .where(task_runs.c.order_id == order_id).order_by(task_runs.c.attempt)).all()
    starts: dict[int, dict[str, int]] = defaultdict(dict)
    for position, task, started in runs:
        starts[position][task] = to_ms(started)
    return starts


def _stored_samples(engine: Engine, order_id: int, starts: dict[int, dict[str, int]]) -> list[Deviation]:
    """The order's samples as measured (every resource, context included), unscored. A sample
    stored before samples named their run goes to the last run of its task started before it."""
    query = (
        select(tasks.c.name, resources.c.name, measurements.c.ts, measurements.c.value, measurements.c.position)
        .join(tasks, tasks.c.id == measurements.c.task_id)
        .join(resources, resources.c.id == measurements.c.resource_id)
        .where(measurements.c.order_id == order_id)
        .order_by(measurements.c.ts)
    )
    with engine.connect() as conn:
        stored = conn.execute(query).all()
    rows = []
    for task, resource, ts, value, position in stored:
        ts_ms = to_ms(ts)
        if position is None:
            began = sorted((start, p) for p, by_task in starts.items() for t, start in by_task.items() if t == task)
            position = next((p for start, p in reversed(began) if start <= ts_ms), began[0][1] if began else 0)
        rows.append(Deviation(order_id, task, position, resource, ts_ms, value, value, value, value, 0.0, "", False))
    return rows


def _version_key(version: str):
    return (0, int(version)) if version.isdigit() else (1, version)


def log_to_mlflow(settings: Settings, order_id: int, result: PlotResult, out_dir: Path) -> str | None:
    """Log the plots and summary as artifacts of a run for the order; the run id, or None
    (with a warning) when MLflow cannot be reached."""
    try:
        import mlflow
        from mlflow import MlflowClient

        from models.registry import ensure_experiment, use_store

        use_store(settings.mlflow_tracking_uri)
        experiment = ensure_experiment(MlflowClient(), PLOTS_EXPERIMENT, settings.mlflow_tracking_uri)
        with mlflow.start_run(experiment_id=experiment, run_name=f"order-{order_id}") as run:
            mlflow.set_tags({"order_id": str(order_id), "model_version": result.model_version or "none"})
            for path in result.files:
                mlflow.log_artifact(str(path), artifact_path="plots")
            mlflow.log_artifact(str(out_dir / f"order-{order_id}-summary.txt"))
            return run.info.run_id
    except Exception as exc:  # noqa: BLE001 - the PNGs are written either way
        logger.warning("plots not logged to MLflow at %s: %s", settings.mlflow_tracking_uri, exc)
        return None
