"""Training loop for the expected-usage network: epochs, validation, early stopping.

In the manner of pytorch/examples' mnist: ``train_one_epoch`` and ``evaluate`` take everything
as arguments, a seed makes the run repeatable (on the CPU), and nothing lives at module level.
MLflow stays outside: each epoch is handed to an ``on_epoch`` callback.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from models.expected_usage import ExpectedUsageModel, pinball_loss
from models.features import EncodedBatch, Preprocessor, usage_scale
from models.work import ExpectedWork, with_progress
from services.catalog import work_powers
from training.errors import TrainingError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one fit (all logged as MLflow parameters)."""

    epochs: int = 200
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-5
    patience: int = 30
    hidden: int = 64
    layers: int = 2
    unknown_rate: float = 0.02  # share of task names hidden as <unk> while training (below)
    seed: int = 0


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    train_loss: float
    val_loss: float
    val_coverage: float
    learning_rate: float


@dataclass
class FitOutcome:
    """The best model (by validation loss) and how training went."""

    model: ExpectedUsageModel
    history: list[EpochResult] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    stopped_early: bool = False


def train_one_epoch(net: torch.nn.Module, inputs: EncodedBatch, target: torch.Tensor,
                    optimizer: torch.optim.Optimizer, batch_size: int,
                    generator: torch.Generator, unknown_rate: float = 0.0) -> float:
    """One pass over ``inputs`` in shuffled mini-batches; the mean training loss.

    ``unknown_rate`` of the task and previous-task names are replaced by ``<unk>``, so that
    embedding learns what an unseen task looks like on average instead of staying random.
    """
    net.train()
    order = torch.randperm(len(inputs), generator=generator).to(target.device)
    total = 0.0
    for start in range(0, len(inputs), batch_size):
        index = order[start:start + batch_size]
        optimizer.zero_grad(set_to_none=True)
        batch = _hide_names(inputs.take(index), unknown_rate, generator)
        loss = pinball_loss(net(batch), target[index])
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(index)
    return total / max(len(inputs), 1)


def _hide_names(batch: EncodedBatch, rate: float, generator: torch.Generator) -> EncodedBatch:
    if rate <= 0:
        return batch
    hide_task = (torch.rand(len(batch), generator=generator) < rate).to(batch.task.device)
    hide_prev = (torch.rand(len(batch), generator=generator) < rate).to(batch.task.device)
    return EncodedBatch(batch.task.masked_fill(hide_task, 0), batch.resource,
                        batch.prev_task.masked_fill(hide_prev, 0), batch.numeric)


@torch.no_grad()
def evaluate(net: torch.nn.Module, inputs: EncodedBatch, target: torch.Tensor) -> tuple[float, float]:
    """Mean pinball loss (standardised scale) and P10-P90 coverage on ``inputs``."""
    net.eval()
    predicted = net(inputs)
    inside = (target >= predicted[:, 0]) & (target <= predicted[:, 2])
    return float(pinball_loss(predicted, target)), float(inside.float().mean())


def fit(train: pd.DataFrame, validation: pd.DataFrame, config: TrainConfig,
        device: torch.device | str = "cpu",
        on_epoch: Callable[[EpochResult], None] | None = None,
        progress: bool = True) -> FitOutcome:
    """Train a fresh model on ``train``; keep the epoch with the lowest validation loss.

    Stops after ``config.patience`` epochs without improvement, or after ``config.epochs``.
    """
    began = time.monotonic()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = torch.device(device)
    work = ExpectedWork.fit(train, work_powers())
    train, validation = with_progress(train, work), with_progress(validation, work)
    preprocessor = Preprocessor.fit(train, usage_scale(train, work))
    model = ExpectedUsageModel.create(preprocessor, device, hidden=config.hidden, layers=config.layers)
    model.work = work
    train_x, train_y = _tensors(model, train, device)
    val_x, val_y = _tensors(model, validation, device)
    optimizer = torch.optim.AdamW(model.net.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5,
                                                           patience=max(config.patience // 3, 1))
    outcome = FitOutcome(model)
    best_loss, best_state, waited = float("inf"), None, 0
    bar = tqdm(range(1, config.epochs + 1), desc="training", unit="epoch", file=sys.stderr,
               disable=not progress, dynamic_ncols=True, mininterval=0.5)
    for epoch in bar:
        train_loss = train_one_epoch(model.net, train_x, train_y, optimizer, config.batch_size, generator,
                                     config.unknown_rate)
        val_loss, val_coverage = evaluate(model.net, val_x, val_y)
        scheduler.step(val_loss)
        result = EpochResult(epoch, train_loss, val_loss, val_coverage, optimizer.param_groups[0]["lr"])
        outcome.history.append(result)
        if on_epoch is not None:
            on_epoch(result)
        if val_loss < best_loss - 1e-6:
            best_loss, waited, outcome.best_epoch = val_loss, 0, epoch
            best_state = copy.deepcopy(model.net.state_dict())
        else:
            waited += 1
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}", best=outcome.best_epoch,
                        refresh=False)
        if waited >= config.patience:
            outcome.stopped_early = True
            break
    bar.close()
    if best_state is not None:
        model.net.load_state_dict(best_state)
    model.net.eval()
    widened = model.calibrate(val_x, val_y)
    logger.info("P10-P90 bands calibrated on the validation orders: %s",
                ", ".join(f"{name} {w:+.3f}" for name, w in widened.items()) or "no change")
    outcome.seconds = time.monotonic() - began
    logger.info("trained %d epochs in %.1fs; best epoch %d (validation loss %.4f)",
                len(outcome.history), outcome.seconds, outcome.best_epoch, best_loss)
    return outcome


def misses(model: ExpectedUsageModel, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per resource, how far the rows of ``frame`` (held out from ``model``'s training) lie
    outside its network's own band: what :meth:`ExpectedUsageModel.widen_to` calibrates on."""
    return model.misses(*_tensors(model, with_progress(frame, model.work), model.device))


def _tensors(model: ExpectedUsageModel, frame: pd.DataFrame, device: torch.device):
    """The encoded inputs and target of ``frame`` (with progress), its values divided by
    their usage scale."""
    preprocessor = model.preprocessor
    inputs = preprocessor.encode(frame)
    values = frame["value"].to_numpy(dtype="float64") / model.scale(frame)
    target = preprocessor.encode_target(values, inputs.resource)
    return inputs.to(device), target.to(device)


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (CUDA when available, else the CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    return torch.device(name)
