"""``python -m monitor plot ORDER_ID``: one PNG per task run, a panel per resource: actual
usage, the expected median, the band shaded, anomalies marked, against seconds since the task
started; and a summary naming the task and resource that deviated first and most."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from monitor.order_context import OrderContext, order_samples  # noqa: E402
from pipeline.db import connect, create_schema  # noqa: E402
from pipeline.db.deviations import DeviationRow, DeviationStore  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.protocol import RESOURCES  # noqa: E402
from pipeline.settings import Settings  # noqa: E402

logger = logging.getLogger(__name__)

PLOTS_EXPERIMENT = "deviation-plots"
UNITS = {"cpu": "% of one core", "memory": "MiB resident", "disk_read": "KiB/s", "disk_write": "KiB/s",
         "cpu_wait": "% of one core, waiting"}


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
    create_schema(engine)
    store = DeviationStore(engine)
    versions = store.versions(order_id)
    if version is not None and version not in versions:
        raise PlotError(f"order {order_id} has no deviations of model version {version}; "
                        f"run `python -m monitor rescore {order_id} --model {version}` first")
    version = version or (max(versions, key=_version_key) if versions else None)
    rows = store.read(order_id, version) if version else _unscored(engine, order_id)
    if not rows:
        raise PlotError(f"order {order_id} has no stored samples")
    context = OrderContext(engine, order_id)
    runs: dict[int, list[DeviationRow]] = defaultdict(list)
    for row in rows:
        runs[row.position].append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for position, run_rows in sorted(runs.items()):
        path = out_dir / f"order-{order_id}-{position:02d}-{run_rows[0].task}.png"
        _plot_run(path, order_id, position, run_rows, version, context.started_ms(position))
        files.append(path)
    summary = _summary(order_id, rows, version, context.task_list)
    (out_dir / f"order-{order_id}-summary.txt").write_text(summary + "\n")
    return PlotResult(files, summary, version)


def _plot_run(path: Path, order_id: int, position: int, rows: list[DeviationRow], version: str | None,
              started_ms: int | None) -> None:
    # Each sample is a rate over the interval that ends at its timestamp (the first from the
    # task's start), so it is drawn as a step over that interval, the dot at its end.
    start = min([r.timestamp_ms for r in rows] + ([started_ms] if started_ms is not None else []))
    fig, axes = plt.subplots(len(RESOURCES), 1, figsize=(8, 2.2 * len(RESOURCES)), sharex=True)
    for ax, resource in zip(axes, RESOURCES):
        series = [r for r in rows if r.resource == resource]
        x = [(r.timestamp_ms - start) / 1000 for r in series]
        if series:
            xs = [0.0, *x]
            if version:
                ax.fill_between(xs, _steps([r.lower for r in series]), _steps([r.upper for r in series]),
                                color="tab:blue", alpha=0.2, step="pre", label="expected band (P10-P90)")
                ax.step(xs, _steps([r.expected for r in series]), where="pre", color="tab:blue",
                        linestyle="--", label="expected (P50)")
            ax.step(xs, _steps([r.value for r in series]), where="pre", color="black", label="actual")
            ax.plot(x, [r.value for r in series], color="black", marker=".", linestyle="none")
        flagged = [(xi, r.value) for xi, r in zip(x, series) if r.anomaly]
        if flagged:
            ax.scatter(*zip(*flagged), color="red", marker="x", s=60, zorder=5, label="anomaly")
        ax.set_ylabel(f"{resource}\n({UNITS[resource]})", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("seconds since the task started (each sample covers the interval up to its dot)")
    scored = f"model version {version}" if version else "not scored (no model)"
    fig.suptitle(f"order {order_id}, task {position + 1}: {rows[0].task} ({scored})")
    fig.tight_layout()
    # The panels' resources, read back from the axes, go into the PNG's text chunks so that
    # tests and tools can check the picture's layout without parsing pixels.
    panels = ",".join(ax.get_ylabel().split("\n")[0] for ax in fig.axes)
    fig.savefig(path, dpi=90, metadata={"Panels": panels, "Title": f"order {order_id} task {position + 1}"})
    plt.close(fig)


def _steps(values: list[float]) -> list[float]:
    """``values`` for a step drawn from the task's start: the first interval begins at 0."""
    return [values[0], *values]


def _summary(order_id: int, rows: list[DeviationRow], version: str | None, task_list: list[str]) -> str:
    if version is None:
        return f"order {order_id}: not scored (no expected-usage model); actual usage only"
    anomalous = [r for r in rows if r.anomaly]
    if not anomalous:
        return f"order {order_id} (model version {version}): no anomaly; {len(rows)} samples scored"
    first = min(anomalous, key=lambda r: r.timestamp_ms)
    most = max(rows, key=lambda r: abs(r.score))
    return "\n".join([
        f"order {order_id} (model version {version}): {len(anomalous)} anomalous samples of {len(rows)}",
        f"deviated first: task {first.position + 1} {first.task}, {first.resource} "
        f"(value {first.value:.1f}, expected {first.expected:.1f})",
        f"deviated most: task {most.position + 1} {most.task}, {most.resource} (score {most.score:+.1f})",
    ])


def _unscored(engine, order_id: int) -> list[DeviationRow]:
    return [DeviationRow(s.order_id, s.task, s.position, s.resource, s.timestamp_ms, s.value,
                         s.value, s.value, s.value, 0.0, False)
            for s in order_samples(engine, order_id)]


def _version_key(version: str):
    return (0, int(version)) if version.isdigit() else (1, version)


def log_to_mlflow(settings: Settings, order_id: int, result: PlotResult, out_dir: Path) -> str | None:
    """Log the plots and summary as artifacts of a run for the order; the run id, or None
    (with a warning) when MLflow cannot be reached."""
    try:
        import mlflow
        from mlflow import MlflowClient

        from training.tracking import ensure_experiment, use_store

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
