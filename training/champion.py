"""Whether a newly registered version takes the ``champion`` alias: the rule, and its sentence.

- **No champion yet** (or one this code cannot load, which live scoring cannot use either):
  the new version becomes champion, since live scoring needs one; the sentence says whether it
  beats the GBM, so nobody takes "champion" for "good".
- **Otherwise** the alias moves only when the network beats the GBM over the folds
  (:mod:`training.verdict`) **and** clearly beats the champion: its mean per-resource pinball
  loss relative to the champion's, both on the same held-out orders, is below
  ``1 - CHAMPION_MARGIN`` and it loses no resource to the champion by more than the
  fold-to-fold spread.

The champion is re-scored on this fit's held-out orders because a figure it was registered
with was measured on other orders. Those orders may have been its training data, which favours
the champion, but not by much when most of what the network predicts is the work model both
share (models/work.py): a refit on the same data then lands within a few percent of the
champion either way. A challenger only takes over with a clear margin, so that a refit does
not move the alias (and live scoring's thresholds) on noise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from models.registry_probe import MODEL_NAME

logger = logging.getLogger(__name__)

CHAMPION_MARGIN = 0.05
"""How much lower than the champion's a challenger's pinball loss must be to replace it: a
refit on the same orders (the same folds' networks against the champion trained on them all)
has come out at and just below 1."""


@dataclass(frozen=True)
class CurrentChampion:
    """The version the alias points at; ``ratio`` is the network's pinball loss relative to it
    on the held-out orders (None when it could not be loaded, ``problem`` says why)."""

    version: str
    ratio: float | None = None
    problem: str | None = None
    losses: tuple[str, ...] = ()  # resources the network loses to it by more than the spread


@dataclass(frozen=True)
class Decision:
    promote: bool
    line: str


def decide(version: str, beats_gbm: bool, gbm_ratio: float, champion: CurrentChampion | None) -> Decision:
    """Whether ``version`` becomes champion, and the sentence that says so."""
    against_gbm = (f"it beats the GBM (pinball {gbm_ratio:.2f} times the GBM's)" if beats_gbm
                   else f"it does NOT beat the GBM (pinball {gbm_ratio:.2f} times the GBM's)")
    registered = f"{MODEL_NAME} version {version} registered"
    if champion is None:
        return Decision(True, f"{registered} and is now the champion, the first one, as live scoring "
                              f"needs one; {against_gbm}")
    if champion.ratio is None:
        return Decision(True, f"{registered} and is now the champion: version {champion.version} cannot "
                              f"be loaded by this code ({champion.problem}), so live scoring had none; "
                              f"{against_gbm}")
    against_champion = (f"{champion.ratio:.2f} times version {champion.version}'s pinball on the same "
                        f"held-out orders")
    if not beats_gbm:
        return Decision(False, f"{registered}; champion stays version {champion.version}, as {against_gbm}")
    if champion.ratio > 1.0:
        return Decision(False, f"{registered}; champion stays version {champion.version}: {against_gbm}, "
                               f"but it is worse than the champion ({against_champion})")
    if champion.ratio >= 1.0 - CHAMPION_MARGIN:
        return Decision(False, f"{registered}; champion stays version {champion.version}: {against_gbm}, "
                               f"but not clearly better than the champion ({against_champion}; replacing it "
                               f"needs below {1 - CHAMPION_MARGIN:.2f})")
    if champion.losses:
        return Decision(False, f"{registered}; champion stays version {champion.version}: {against_gbm}, "
                               f"but it loses {', '.join(champion.losses)} to the champion by more than the "
                               f"fold-to-fold spread ({against_champion})")
    return Decision(True, f"{registered} and is now the champion, was version {champion.version}: "
                          f"{against_gbm} and clearly beats the champion ({against_champion})")
