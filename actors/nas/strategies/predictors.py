"""Objective predictors of LINAS: one per measured objective, on one-hot encoded configs.

Two model families compete — ridge regression (the additive effect of each choice) and an
RBF support-vector regressor (interactions) — each with a small hyperparameter grid; the one
with the better cross-validated error is refitted on everything validated. Targets are
standardised first, so one grid serves error rates and milliseconds alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ObjectivePredictor:
    seed: int = 0
    folds: int = 5
    model_: object = field(default=None, init=False)
    family_: str = field(default="", init=False)
    cv_rmse_: float = field(default=float("nan"), init=False)

    def fit(self, features: np.ndarray, targets: np.ndarray) -> ObjectivePredictor:
        from sklearn.linear_model import Ridge
        from sklearn.model_selection import GridSearchCV, KFold
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVR

        self._mean, self._std = float(targets.mean()), float(targets.std()) or 1.0
        y = (targets - self._mean) / self._std
        folds = KFold(min(self.folds, len(y)), shuffle=True, random_state=self.seed)
        candidates = {
            "ridge": (Ridge(), {"alpha": [0.1, 1.0, 10.0]}),
            "svr": (
                make_pipeline(StandardScaler(), SVR(kernel="rbf")),
                {"svr__C": [1.0, 10.0, 100.0], "svr__gamma": ["scale", 0.01]},
            ),
        }
        best = None
        for family, (model, grid) in candidates.items():
            search = GridSearchCV(model, grid, cv=folds, scoring="neg_root_mean_squared_error")
            search.fit(features, y)
            if best is None or search.best_score_ > best[1].best_score_:
                best = (family, search)
        self.family_, search = best
        self.model_ = search.best_estimator_
        self.cv_rmse_ = float(-search.best_score_ * self._std)
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.model_.predict(features) * self._std + self._mean


def mape(predicted: np.ndarray, measured: np.ndarray) -> float:
    """Mean absolute percentage error, in percent."""
    return float(np.mean(np.abs(predicted - measured) / np.maximum(np.abs(measured), 1e-12)) * 100)


def kendall_tau(predicted: np.ndarray, measured: np.ndarray) -> float:
    """Rank agreement in [-1, 1]; what matters for choosing candidates is the order."""
    from scipy.stats import kendalltau

    if len(measured) < 2:
        return float("nan")
    return float(kendalltau(predicted, measured).statistic)
