"""Linear probes on hidden states: the estimator, its JSON serialisation, SE thresholds, and the per-location fit.

Used by the train_probes, evaluate and analysis stages; no stage logic lives here.

- ``LinearProbe``: standardise, then L2 logistic regression (``kind="logistic"``, binary labels) or ridge
  regression (``kind="ridge"``, a continuous target such as semantic entropy itself), with C chosen by
  cross-validation grouped by question (runs of one question never sit on both sides of a fold). Its features
  are one (position, layer) of the hidden states, or a contiguous range of layers at one position, concatenated
  (``layer_end``), as in the SEP paper.
- ``LinearProbe.to_dict`` / ``from_dict``, ``save_probe`` / ``load_probe``: plain JSON (numbers only), safe
  to read from a shared remote, unlike pickle or joblib which run code on load.
- ``best_split_threshold`` / ``median_threshold``: turn semantic entropy into a binary high-SE label.
- ``fit_location_probes`` / ``score_location_probes``: one probe per (position, layer) of a hidden-state
  array; the single code path both train_probes and evaluate use, so their probes are identical.
- ``probe_features`` / ``fit_probe`` / ``probe_score``: the features a probe reads from a hidden-state array,
  fitting one probe there, and its own metric (AUROC for logistic, Spearman for ridge).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import GroupKFold
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from stages.lib.metrics import auroc, single_class_reason, spearman
from stages.lib.errors import UserError

log = logging.getLogger(__name__)

PROBE_FORMAT = "sep-linear-probe"
PROBE_FORMAT_VERSION = 1
PROBE_KINDS = ("logistic", "ridge")


class SingleClassError(UserError):
    """Training labels hold one class, so no classifier can be fitted."""


def require_two_classes(labels, label_name: str, split: str) -> None:
    """Raise SingleClassError naming ``label_name`` and ``split`` unless ``labels`` (n,) holds both classes."""
    reason = single_class_reason(labels, label_name)
    if reason is not None:
        raise SingleClassError(f"label `{label_name}` in split `{split}`: {reason}; a probe needs both classes")


class LinearProbe:
    """Standardised L2 logistic (or ridge) regression, with C chosen by question-grouped cross-validation.

    Parameters
    ----------
    c_grid : sequence of float
        Inverse regularisation strengths to try; a single value skips the cross-validation.
    cv_folds : int
        Folds of the grouped CV, clamped to the number of distinct groups (questions) in the training data.
    max_iter : int
        lbfgs iterations per fit.
    random_state : int or None
        Seeds the fold shuffling and the solver.
    label_name, position, layer, feature : metadata saved with the probe (what it predicts, from where).
    kind : ``logistic`` (binary label, scored by AUROC) or ``ridge`` (continuous target, alpha = 1 / C, scored
        by Spearman correlation in the cross-validation).
    layer_end : last layer (inclusive) of a concatenated layer range starting at ``layer``; None for one layer.

    Attributes
    ----------
    scaler_mean_, scaler_scale_ : (n_features,) standardisation fitted on the training data
    coef_ : (n_features,) weights in the standardised space
    intercept_ : float
    C_ : float, the chosen C
    cv_auroc_ : dict C -> mean held-out AUROC (Spearman for ridge) over folds (None when no fold was usable)
    n_features_in_ : int
    """

    def __init__(self, c_grid: Sequence[float] = (1.0,), cv_folds: int = 5, max_iter: int = 1000,
                 random_state: int | None = None, label_name: str = "label", position: str | None = None,
                 layer: int | None = None, feature: str = "hidden_state", kind: str = "logistic",
                 layer_end: int | None = None):
        if kind not in PROBE_KINDS:
            raise ValueError(f"probe kind {kind!r}; expected one of {PROBE_KINDS}")
        self.c_grid = c_grid
        self.cv_folds = cv_folds
        self.max_iter = max_iter
        self.random_state = random_state
        self.label_name = label_name
        self.position = position
        self.layer = layer
        self.feature = feature
        self.kind = kind
        self.layer_end = layer_end

    # ---- fitting ---------------------------------------------------------------------------------
    def fit(self, features, labels, groups=None, split: str = "train") -> "LinearProbe":
        """Fit on ``features`` (n, n_features) and ``labels`` (n,) (bool; float targets for ridge);
        ``groups`` (n,) are question ids.

        Without groups every row is its own group. ``split`` only names the data in error messages.
        """
        features = _as_features(features)
        labels = self._targets(labels, split)
        if len(labels) != len(features):
            raise ValueError(f"{len(features)} feature rows but {len(labels)} labels")
        groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
        c_grid = sorted(float(c) for c in self.c_grid)
        if len(c_grid) == 1:
            self.cv_auroc_ = {c_grid[0]: None}
            self.C_ = c_grid[0]
        else:
            self.cv_auroc_ = self._cross_validate(features, labels, groups, c_grid, split)
            self.C_ = _best_c(self.cv_auroc_, self.label_name, split)
        scaler = StandardScaler().fit(features)
        model = self._regression(self.C_).fit(scaler.transform(features), labels)
        self.scaler_mean_ = scaler.mean_.astype(np.float64)
        self.scaler_scale_ = scaler.scale_.astype(np.float64)
        self.coef_ = np.ravel(model.coef_).astype(np.float64)
        self.intercept_ = float(np.ravel(model.intercept_)[0])
        self.n_features_in_ = features.shape[1]
        return self

    def _targets(self, labels, split: str) -> np.ndarray:
        if self.kind == "logistic":
            labels = np.asarray(labels).astype(bool)
            require_two_classes(labels, self.label_name, split)
            return labels
        labels = np.asarray(labels, dtype=np.float64)
        if not np.all(np.isfinite(labels)) or len(np.unique(labels)) < 2:
            raise SingleClassError(f"target `{self.label_name}` in split `{split}`: a ridge probe needs finite, "
                                   "non-constant values")
        return labels

    def _regression(self, c: float):
        if self.kind == "ridge":
            return Ridge(alpha=1.0 / c)
        return LogisticRegression(C=c, max_iter=self.max_iter, random_state=self.random_state)

    def _held_out_score(self, targets: np.ndarray, decision: np.ndarray) -> float | None:
        """AUROC (logistic) or Spearman (ridge) of ``decision`` for ``targets``; a constant prediction of a
        varying target ranks nothing, like AUROC's 0.5, so it scores 0 rather than undefined."""
        if self.kind == "logistic":
            return auroc(targets, decision)
        if len(np.unique(targets)) > 1 and np.ptp(decision) == 0:
            return 0.0
        return spearman(targets, decision)

    def _cross_validate(self, features, labels, groups, c_grid, split) -> dict[float, float | None]:
        n_groups = len(np.unique(groups))
        if n_groups < 2:
            raise ValueError(f"label `{self.label_name}` in split `{split}`: grouped cross-validation over "
                             f"c_grid needs >= 2 questions, got {n_groups}")
        folds = GroupKFold(n_splits=min(self.cv_folds, n_groups), shuffle=True, random_state=self.random_state)
        fold_scores: dict[float, list[float]] = {c: [] for c in c_grid}
        for fit_rows, held_out_rows in folds.split(features, labels, groups):
            # a fold whose training part or held-out part has one class says nothing about C: skip it
            if self.kind == "logistic" and (single_class_reason(labels[fit_rows])
                                            or single_class_reason(labels[held_out_rows])):
                continue
            scaler = StandardScaler().fit(features[fit_rows])  # refitted per fold: no held-out leakage
            fit_x, held_out_x = scaler.transform(features[fit_rows]), scaler.transform(features[held_out_rows])
            for c in c_grid:
                model = self._regression(c).fit(fit_x, labels[fit_rows])
                score = self._held_out_score(labels[held_out_rows], _decision(model, held_out_x))
                if score is not None:
                    fold_scores[c].append(score)
        return {c: (float(np.mean(s)) if s else None) for c, s in fold_scores.items()}

    # ---- prediction ------------------------------------------------------------------------------
    def decision_function(self, features) -> np.ndarray:
        """Log-odds of the positive class (the predicted value for ridge), shape (n,)."""
        self._check_fitted()
        features = _as_features(features)
        if features.shape[1] != self.n_features_in_:
            raise ValueError(f"probe expects {self.n_features_in_} features, got {features.shape[1]}")
        return ((features - self.scaler_mean_) / self.scaler_scale_) @ self.coef_ + self.intercept_

    def predict_proba(self, features) -> np.ndarray:
        """P(positive class), shape (n,) (one column, unlike scikit-learn's (n, 2): the label is binary)."""
        self._require_classifier("predict_proba")
        return expit(self.decision_function(features))

    def predict(self, features) -> np.ndarray:
        """Boolean prediction at P = 0.5, shape (n,)."""
        self._require_classifier("predict")
        return self.decision_function(features) > 0

    def margin(self, features) -> np.ndarray:
        """Signed distance to the decision boundary in the standardised space: decision / ||w||, shape (n,).

        0 for every row when all weights are 0 (no boundary to measure from).
        """
        self._require_classifier("margin")
        norm = float(np.linalg.norm(self.coef_))
        decision = self.decision_function(features)
        return decision / norm if norm > 0 else np.zeros_like(decision)

    def _require_classifier(self, method: str) -> None:
        if self.kind != "logistic":
            raise ValueError(f"{self!r} is a ridge regression: {method} has no meaning for it; use decision_function "
                             "for its predicted value")

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise RuntimeError("LinearProbe is not fitted; call fit() or from_dict() first")

    # ---- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of hyper-parameters, metadata and fitted numbers (floats survive JSON exactly)."""
        self._check_fitted()
        return {
            "format": PROBE_FORMAT,
            "format_version": PROBE_FORMAT_VERSION,
            "label_name": self.label_name,
            "position": self.position,
            "layer": self.layer,
            "feature": self.feature,
            "kind": self.kind,
            "layer_end": self.layer_end,
            "c_grid": [float(c) for c in self.c_grid],
            "cv_folds": int(self.cv_folds),
            "max_iter": int(self.max_iter),
            "random_state": self.random_state,
            "C": self.C_,
            "cv_auroc": [{"C": c, "auroc": a} for c, a in self.cv_auroc_.items()],
            "n_features": int(self.n_features_in_),
            "scaler_mean": self.scaler_mean_.tolist(),
            "scaler_scale": self.scaler_scale_.tolist(),
            "coef": self.coef_.tolist(),
            "intercept": self.intercept_,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LinearProbe":
        """Rebuild a fitted probe from ``to_dict`` output; raise ValueError on a foreign or inconsistent dict."""
        if data.get("format") != PROBE_FORMAT or data.get("format_version") != PROBE_FORMAT_VERSION:
            raise ValueError(f"not a {PROBE_FORMAT} v{PROBE_FORMAT_VERSION} dict: format="
                             f"{data.get('format')!r} version={data.get('format_version')!r}")
        probe = cls(c_grid=tuple(data["c_grid"]), cv_folds=data["cv_folds"], max_iter=data["max_iter"],
                    random_state=data["random_state"], label_name=data["label_name"], position=data["position"],
                    layer=data["layer"], feature=data["feature"], kind=data.get("kind", "logistic"),
                    layer_end=data.get("layer_end"))
        probe.C_ = float(data["C"])
        probe.cv_auroc_ = {float(row["C"]): row["auroc"] for row in data["cv_auroc"]}
        probe.n_features_in_ = int(data["n_features"])
        probe.scaler_mean_ = np.asarray(data["scaler_mean"], dtype=np.float64)
        probe.scaler_scale_ = np.asarray(data["scaler_scale"], dtype=np.float64)
        probe.coef_ = np.asarray(data["coef"], dtype=np.float64)
        probe.intercept_ = float(data["intercept"])
        for name in ("scaler_mean_", "scaler_scale_", "coef_"):
            if getattr(probe, name).shape != (probe.n_features_in_,):
                raise ValueError(f"probe dict: `{name[:-1]}` has shape {getattr(probe, name).shape}; "
                                 f"expected ({probe.n_features_in_},)")
        return probe

    def __repr__(self) -> str:
        fitted = f", C_={self.C_}" if hasattr(self, "C_") else ""
        layers = f", layer_end={self.layer_end!r}" if self.layer_end is not None else ""
        return (f"LinearProbe(kind={self.kind!r}, label_name={self.label_name!r}, position={self.position!r}, "
                f"layer={self.layer!r}{layers}{fitted})")


def save_probe(probe: LinearProbe, path: str | Path) -> None:
    """Write ``probe.to_dict()`` as JSON (not atomic on its own: write inside an atomic directory)."""
    Path(path).write_text(json.dumps(probe.to_dict(), indent=1) + "\n")


def load_probe(path: str | Path) -> LinearProbe:
    """Read a probe JSON written by ``save_probe``; names the file when it is missing or malformed."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; run the train_probes stage (`dvc repro train_probes`)")
    try:
        return LinearProbe.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError) as error:
        raise ValueError(f"{path}: {error}") from error


def save_location_probes(probes: Mapping[tuple[str, str, int], LinearProbe], path: str | Path) -> None:
    """Write every per-location probe as one JSON list of ``to_dict`` records (inside an atomic directory)."""
    Path(path).write_text(json.dumps([probe.to_dict() for probe in probes.values()]) + "\n")


def load_location_probes(path: str | Path) -> dict[tuple[str, str, int], LinearProbe]:
    """Read ``save_location_probes`` output, keyed (label name, position, layer) like ``fit_location_probes``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; run the train_probes stage (`dvc repro train_probes`)")
    try:
        probes = [LinearProbe.from_dict(record) for record in json.loads(path.read_text())]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: {error}") from error
    return {(probe.label_name, probe.position, int(probe.layer)): probe for probe in probes}


def _decision(model, features: np.ndarray) -> np.ndarray:
    return model.decision_function(features) if hasattr(model, "decision_function") else model.predict(features)


def _as_features(features) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (n, n_features); got shape {features.shape}")
    return features


def _best_c(cv_auroc: Mapping[float, float | None], label_name: str, split: str) -> float:
    """Highest mean held-out AUROC; ties go to the smallest C (the strongest regularisation)."""
    scored = [(score, c) for c, score in cv_auroc.items() if score is not None]
    if not scored:
        raise SingleClassError(f"label `{label_name}` in split `{split}`: no cross-validation fold had both "
                               "classes on both sides, so C cannot be chosen; use fewer probes.cv_folds or more "
                               "questions")
    best_score = max(score for score, _ in scored)
    return min(c for score, c in scored if score == best_score)


# ---- thresholds that turn semantic entropy into a high-SE label ---------------------------------------
def best_split_threshold(values) -> float:
    """The threshold splitting ``values`` (n,) into a low and a high group with least within-group squared error.

    As in the SEP paper: sort the values, try every cut between two neighbours, and keep the cut that
    minimises SSE(low) + SSE(high). Equal values are never separated (a cut only falls between distinct
    neighbours); among equally good cuts the lowest wins. Returns the midpoint of the two neighbours, so
    ``value > threshold`` reproduces the split exactly.

    Raises ValueError when fewer than two distinct values exist (nothing to split).
    """
    values = np.sort(np.asarray(values, dtype=np.float64))
    if not np.all(np.isfinite(values)):
        raise ValueError("best_split_threshold: values contain non-finite entries")
    cuts = np.flatnonzero(np.diff(values) > 0) + 1  # cut k: low = values[:k], high = values[k:]
    if len(cuts) == 0:
        raise ValueError(f"best_split_threshold: need >= 2 distinct values, got {len(values)} values all equal"
                         if len(values) else "best_split_threshold: no values")
    # prefix sums give each side's SSE = sum(x^2) - (sum x)^2 / n in O(n); centred first for precision
    centred = values - values.mean()
    prefix_sum = np.r_[0.0, np.cumsum(centred)]
    prefix_square = np.r_[0.0, np.cumsum(centred ** 2)]
    n = len(values)
    low_sse = prefix_square[cuts] - prefix_sum[cuts] ** 2 / cuts
    high_sse = (prefix_square[n] - prefix_square[cuts]) - (prefix_sum[n] - prefix_sum[cuts]) ** 2 / (n - cuts)
    total = low_sse + high_sse
    best = cuts[int(np.flatnonzero(total <= total.min() + 1e-12 * max(1.0, abs(total.min())))[0])]
    return float((values[best - 1] + values[best]) / 2)


def median_threshold(values) -> float:
    """The median of ``values`` (n,); ``value > threshold`` is high."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        raise ValueError("median_threshold: no values")
    return float(np.median(values))


THRESHOLD_FUNCTIONS = {"best_split": best_split_threshold, "median": median_threshold}


# ---- one probe per (position, layer) ------------------------------------------------------------------
def location_features(hidden, rows, position_index: int, layer_index: int) -> np.ndarray:
    """Hidden states of ``rows`` at one (position, layer) as float32, shape (len(rows), hidden).

    ``hidden`` is the (runs, positions, layers, hidden) float16 array, usually memory-mapped: only the
    requested slice is read.
    """
    rows = np.asarray(rows, dtype=np.int64)
    return np.asarray(hidden[rows, position_index, layer_index, :], dtype=np.float32)


def probe_features(probe: LinearProbe, hidden, rows, positions: Sequence[str], layers: Sequence[int]) -> np.ndarray:
    """The features ``probe`` reads: its (position, layer), or its layers ``layer..layer_end`` concatenated in
    the array's layer order, shape (len(rows), hidden * n_layers) float32."""
    position_index = list(positions).index(probe.position)
    first = list(layers).index(probe.layer)
    last = first if probe.layer_end is None else list(layers).index(probe.layer_end)
    if last == first:
        return location_features(hidden, rows, position_index, first)
    rows = np.asarray(rows, dtype=np.int64)
    block = np.asarray(hidden[rows, position_index, first:last + 1, :], dtype=np.float32)
    return block.reshape(len(rows), block.shape[1] * block.shape[2])


def target_kind(values) -> str:
    """``logistic`` for a boolean label, ``ridge`` for a continuous target."""
    return "logistic" if np.asarray(values).dtype == bool else "ridge"


def probe_score(probe: LinearProbe, features, targets) -> float | None:
    """The probe's own metric on (features, targets): AUROC of its log-odds for a logistic probe, Spearman
    correlation of its prediction for a ridge probe; None when undefined (one class, constant, no rows)."""
    targets = np.asarray(targets)
    if len(targets) == 0:
        return None
    return probe._held_out_score(targets, probe.decision_function(features))


def fit_probe(hidden, rows, positions: Sequence[str], layers: Sequence[int], label_name: str, targets, groups,
              position: str, layer: int, layer_end: int | None = None, split: str = "train",
              **estimator) -> LinearProbe:
    """Fit one probe for ``targets`` (n,) on the given rows at ``position`` and ``layer`` (..``layer_end``).

    ``estimator`` holds c_grid, cv_folds, max_iter and random_state; the kind follows the targets' dtype.
    """
    probe = LinearProbe(label_name=label_name, position=position, layer=int(layer), kind=target_kind(targets),
                        layer_end=None if layer_end is None else int(layer_end), **estimator)
    return probe.fit(probe_features(probe, hidden, rows, positions, layers), targets, groups, split=split)


def fit_location_probes(hidden, rows, positions: Sequence[str], layers: Sequence[int],
                        labels: Mapping[str, np.ndarray], groups, *, c_grid: Sequence[float], cv_folds: int,
                        max_iter: int, random_state: int | None,
                        split: str = "train") -> dict[tuple[str, str, int], LinearProbe]:
    """Fit one probe per label and (position, layer) on the given rows of a hidden-state array.

    Parameters
    ----------
    hidden : (runs, positions, layers, hidden) array, float16 memmap
    rows : (n,) int, the array rows of the training runs
    positions, layers : names / hidden-state indices of the array's axes 1 and 2 (from the meta JSON)
    labels : label name -> (n,) targets aligned with ``rows``: bool for a logistic probe, float for ridge
    groups : (n,) question ids, for the grouped cross-validation of C
    c_grid, cv_folds, max_iter, random_state : passed to each LinearProbe

    Returns
    -------
    dict (label name, position, layer) -> fitted LinearProbe
    """
    for label_name, values in labels.items():
        if target_kind(values) == "logistic":
            require_two_classes(values, label_name, split)
    probes = {}
    locations = [(p, pos, i, layer) for p, pos in enumerate(positions) for i, layer in enumerate(layers)]
    for position_index, position, layer_index, layer in tqdm(locations, desc="probes per (position, layer)",
                                                           leave=False):
        features = location_features(hidden, rows, position_index, layer_index)
        for label_name, values in labels.items():
            probe = LinearProbe(c_grid=c_grid, cv_folds=cv_folds, max_iter=max_iter, random_state=random_state,
                                label_name=label_name, position=position, layer=int(layer),
                                kind=target_kind(values))
            probes[(label_name, position, int(layer))] = probe.fit(features, values, groups, split=split)
    log.info("fitted %d probes (%d labels x %d positions x %d layers) on %d runs",
             len(probes), len(labels), len(positions), len(layers), len(np.asarray(rows)))
    return probes


def score_location_probes(probes: Mapping[tuple[str, str, int], LinearProbe], hidden, rows,
                          positions: Sequence[str], layers: Sequence[int],
                          labels: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Each probe's own metric for its own label on the given rows (``probe_score``).

    Parameters
    ----------
    probes : output of ``fit_location_probes``
    hidden, rows, positions, layers : as in ``fit_location_probes`` (rows of the evaluated runs)
    labels : label name -> (n,) targets aligned with ``rows``

    Returns
    -------
    DataFrame with columns label, position, layer, metric (``auroc`` or ``spearman``), score (NaN when
    undefined: a single class, a constant target, or n = 0)
    """
    records = []
    for position_index, position in enumerate(positions):
        for layer_index, layer in enumerate(layers):
            features = location_features(hidden, rows, position_index, layer_index)
            for label_name, values in labels.items():
                probe = probes[(label_name, position, int(layer))]
                value = probe_score(probe, features, values)
                records.append({"label": label_name, "position": position, "layer": int(layer),
                                "metric": "auroc" if probe.kind == "logistic" else "spearman",
                                "score": np.nan if value is None else value})
    return pd.DataFrame.from_records(records, columns=["label", "position", "layer", "metric", "score"])
