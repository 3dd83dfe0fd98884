"""The expected-usage network: for a sample of a running task, the P10, P50 and P90 of usage.

Categories go through learned embeddings (never their ids as magnitudes), are joined with the
standardised numbers and pass an MLP whose head gives the median and two positive offsets, so
the three quantiles never cross. :class:`ExpectedUsageModel` bundles the network with its
:class:`~models.features.Preprocessor`; it predicts in original units from a pandas frame.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from models.alarms import AlarmCalibration, half_width_floors
from models.features import FEATURE_COLUMNS, NUMERIC, OPTIONAL, EncodedBatch, Preprocessor, usage_scale
from models.work import ExpectedWork, with_progress

logger = logging.getLogger(__name__)

QUANTILES = (0.1, 0.5, 0.9)
PREDICTION_COLUMNS = ["p10", "p50", "p90"]
NOMINAL_COVERAGE = QUANTILES[2] - QUANTILES[0]
MIN_CALIBRATION_ROWS = 20
_PREPROCESSING_FILE = "preprocessing.json"
_CONFIG_FILE = "config.json"
_WEIGHTS_FILE = "weights.pt"
_WORK_FILE = "work.json"
_CALIBRATION_FILE = "calibration.json"
_ALARMS_FILE = "alarms.json"

_PREDICT_CHUNK = 65_536


@dataclass(frozen=True)
class NetConfig:
    """Sizes of the network; saved with it so a load rebuilds the same shape."""

    n_tasks: int
    n_resources: int
    n_prev_tasks: int
    n_numeric: int = len(NUMERIC)
    task_dim: int = 8
    resource_dim: int = 4
    prev_task_dim: int = 4
    hidden: int = 64
    layers: int = 2
    dropout: float = 0.0


class QuantileNet(nn.Module):
    """Embeddings + MLP -> (rows, 3) standardised quantiles, non-crossing by construction."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.task = nn.Embedding(config.n_tasks, config.task_dim)
        self.resource = nn.Embedding(config.n_resources, config.resource_dim)
        self.prev_task = nn.Embedding(config.n_prev_tasks, config.prev_task_dim)
        width = config.task_dim + config.resource_dim + config.prev_task_dim + config.n_numeric
        blocks: list[nn.Module] = []
        for _ in range(config.layers):
            blocks += [nn.Linear(width, config.hidden), nn.SiLU()]
            if config.dropout:
                blocks.append(nn.Dropout(config.dropout))
            width = config.hidden
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(width, 3)

    def forward(self, batch: EncodedBatch) -> torch.Tensor:
        x = torch.cat([self.task(batch.task), self.resource(batch.resource),
                       self.prev_task(batch.prev_task), batch.numeric], dim=1)
        median, low, high = self.head(self.body(x)).unbind(dim=1)
        return torch.stack([median - F.softplus(low), median, median + F.softplus(high)], dim=1)


def pinball_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean pinball (quantile) loss over rows and :data:`QUANTILES`; predicted is (rows, 3)."""
    taus = torch.tensor(QUANTILES, dtype=predicted.dtype, device=predicted.device)
    error = target.unsqueeze(1) - predicted
    return torch.maximum(taus * error, (taus - 1) * error).mean()


class ExpectedUsageModel:
    """Preprocessing and network together: ``predict(frame)`` gives p10/p50/p90 in units;
    ``work`` the expected totals of each task's runs (models/work.py), which the network's
    output is scaled by; ``alarms`` the calibration of its alarm thresholds (models/alarms.py),
    None until ``fit`` sets it."""

    def __init__(self, preprocessor: Preprocessor, net: QuantileNet, config: NetConfig,
                 device: torch.device | str = "cpu", work: ExpectedWork | None = None,
                 widening: tuple[float, ...] | None = None, alarms: AlarmCalibration | None = None) -> None:
        self.preprocessor = preprocessor
        self.alarms = alarms
        self.config = config
        self.work = work or ExpectedWork({})
        # Per resource index, how far each edge of the P10-P90 band moves out (standardised
        # log scale) so that it holds 80 % of held-out samples (:meth:`calibrate`).
        self.widening = widening or (0.0,) * len(preprocessor.resources)
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()

    @classmethod
    def create(cls, preprocessor: Preprocessor, device: torch.device | str = "cpu",
               **sizes) -> "ExpectedUsageModel":
        """A fresh, untrained model for ``preprocessor``'s vocabularies (seed torch first)."""
        config = NetConfig(len(preprocessor.tasks), len(preprocessor.resources),
                           len(preprocessor.prev_tasks), **sizes)
        return cls(preprocessor, QuantileNet(config), config, device)

    @torch.inference_mode()
    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Expected usage for every row of ``frame`` (FEATURE_COLUMNS), in original units.

        Columns ``p10``, ``p50``, ``p90``; the index is ``frame``'s.
        """
        missing = [c for c in FEATURE_COLUMNS if c not in frame.columns and c not in OPTIONAL]
        if missing:
            raise ValueError(f"missing feature columns: {', '.join(missing)}")
        self.net.eval()
        frame = with_progress(frame, self.work)
        encoded = self.preprocessor.encode(frame)
        parts = []
        for start in range(0, len(encoded), _PREDICT_CHUNK):
            chunk = encoded.take(slice(start, start + _PREDICT_CHUNK)).to(self.device)
            parts.append(self.preprocessor.decode_target(self._banded(chunk), chunk.resource).cpu())
        values = torch.cat(parts).numpy() if parts else np.empty((0, 3), dtype=np.float32)
        values = values.astype(np.float64) * self.scale(frame)[:, None]
        return pd.DataFrame(values, columns=PREDICTION_COLUMNS, index=frame.index)

    def scale(self, frame: pd.DataFrame) -> np.ndarray:
        """Per row, what the network's output is multiplied by: the run's expected total for
        the resources that grow with the work (models.features.usage_scale)."""
        return usage_scale(frame, self.work, self.preprocessor.typical_scale())

    def floors(self, frame: pd.DataFrame) -> np.ndarray:
        """Per row of ``frame``, the smallest half-width of its band (models.alarms.half_width_floors)."""
        return half_width_floors(frame["resource"].astype(str).to_numpy(), self.scale(frame))

    def _banded(self, batch: EncodedBatch) -> torch.Tensor:
        """The network's standardised quantiles with the calibrated band edges."""
        raw = self.net(batch)
        widen = torch.tensor(self.widening, dtype=raw.dtype, device=raw.device)[batch.resource]
        low = torch.minimum(raw[:, 0] - widen, raw[:, 1])
        high = torch.maximum(raw[:, 2] + widen, raw[:, 1])
        return torch.stack([low, raw[:, 1], high], dim=1)

    @torch.no_grad()
    def misses(self, inputs: EncodedBatch, target: torch.Tensor) -> dict[str, np.ndarray]:
        """Per resource name, how far each row of ``inputs`` (standardised ``target``) lies
        outside the network's own P10-P90 band (negative: inside), in log units (comparable
        between models whose targets were standardised differently)."""
        self.net.eval()
        raw = self.net(inputs)
        misses = torch.maximum(raw[:, 0] - target, target - raw[:, 2])
        std = torch.tensor(self.preprocessor.target_std, dtype=torch.float32)[inputs.resource.cpu()]
        misses = misses.cpu() * std
        return {name: misses[inputs.resource.cpu() == index].numpy()
                for index, name in enumerate(self.preprocessor.resources)}

    def widen_to(self, misses: dict[str, np.ndarray]) -> dict[str, float]:
        """Widen (or narrow) each resource's band so that it holds :data:`NOMINAL_COVERAGE`
        of the held-out rows whose :meth:`misses` are given: conformalised quantile
        regression. A network trained on few orders draws its bands too tight; this is
        what makes "P10-P90" mean 80 %. Returns the widening per resource name."""
        widening = list(self.widening)
        for index, name in enumerate(self.preprocessor.resources):
            mine = np.asarray(misses.get(name, ()), dtype=np.float64)
            if len(mine) >= MIN_CALIBRATION_ROWS:
                level = min(1.0, NOMINAL_COVERAGE * (1 + 1 / len(mine)))
                widening[index] = float(np.quantile(mine, level)) / float(self.preprocessor.target_std[index])
        self.widening = tuple(widening)
        return {name: w for name, w in zip(self.preprocessor.resources, self.widening) if w}

    def calibrate(self, inputs: EncodedBatch, target: torch.Tensor) -> dict[str, float]:
        """:meth:`widen_to` the rows of ``inputs`` (held out from training, standardised ``target``)."""
        return self.widen_to(self.misses(inputs, target))

    def to(self, device: torch.device | str) -> "ExpectedUsageModel":
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    def save(self, directory: str | Path) -> Path:
        """Write preprocessing, sizes and weights to ``directory`` (created); returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / _PREPROCESSING_FILE).write_text(json.dumps(self.preprocessor.to_dict(), indent=1))
        (directory / _CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=1))
        (directory / _WORK_FILE).write_text(json.dumps(self.work.to_dict(), indent=1))
        (directory / _CALIBRATION_FILE).write_text(json.dumps(list(self.widening)))
        if self.alarms is not None:
            (directory / _ALARMS_FILE).write_text(json.dumps(self.alarms.to_dict()))
        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        torch.save(state, directory / _WEIGHTS_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> "ExpectedUsageModel":
        """The model :meth:`save` wrote to ``directory``."""
        directory = Path(directory)
        preprocessor = Preprocessor.from_dict(json.loads((directory / _PREPROCESSING_FILE).read_text()))
        config = NetConfig(**json.loads((directory / _CONFIG_FILE).read_text()))
        net = QuantileNet(config)
        net.load_state_dict(torch.load(directory / _WEIGHTS_FILE, map_location="cpu", weights_only=True))
        work_file = directory / _WORK_FILE
        work = ExpectedWork.from_dict(json.loads(work_file.read_text())) if work_file.is_file() else None
        calibration = directory / _CALIBRATION_FILE
        widening = tuple(json.loads(calibration.read_text())) if calibration.is_file() else None
        alarms_file = directory / _ALARMS_FILE
        alarms = AlarmCalibration.from_dict(json.loads(alarms_file.read_text())) if alarms_file.is_file() else None
        return cls(preprocessor, net, config, device, work, widening, alarms)

    @staticmethod
    def is_saved_in(directory: str | Path) -> bool:
        """Whether ``directory`` holds a model written by :meth:`save`."""
        return all((Path(directory) / name).is_file()
                   for name in (_PREPROCESSING_FILE, _CONFIG_FILE, _WEIGHTS_FILE))
