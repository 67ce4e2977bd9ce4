"""Linear probes on hidden states: the scikit-learn estimators and their weights as arrays (the SE thresholds, the
features at a location and the per-location fit are in ``fitting.py``).

Used by the train_probes, evaluate and analysis stages; no stage logic lives here.

- ``LogisticProbe`` (binary label) and ``RidgeProbe`` (a continuous target such as semantic entropy itself):
  scikit-learn estimators sharing the base ``LinearProbe``. Each standardises, then fits an L2 linear model,
  with C chosen by ``GridSearchCV`` over a ``StandardScaler`` + ``LogisticRegression`` / ``Ridge`` pipeline on
  folds grouped by question (``GroupKFold``: runs of one question never sit on both sides of a fold). Their
  features are one (position, layer) of the hidden states, or a contiguous range of layers at one position,
  concatenated (``layer_end``), as in the SEP paper.
- ``LinearProbe.to_arrays`` / ``LinearProbe.from_arrays``: one probe as (JSON-ready metadata, float64 weights),
  so it can be stored without pickle; ``stages.lib.probes.store`` is the one writer and reader of the files.
- ``best_split_threshold`` / ``median_threshold``: turn semantic entropy into a binary high-SE label.
- ``fit_location_probes`` / ``score_location_probes``: one probe per (position, layer) of a hidden-state
  array; the single code path both train_probes and evaluate use, so their probes are identical.
- ``probe_features`` / ``fit_probe`` / ``probe_score``: the features a probe reads from a hidden-state array,
  fitting one probe there, and its own metric (AUROC for logistic, Spearman for ridge).

Where a probe reads its features (``label_name``, ``feature``, ``position``, ``layer``, ``layer_end``) are
constructor params that ``fit`` never reads (``label_name`` only names the label in error messages): they travel
with the estimator through ``get_params``, ``clone`` and the probe files, so a saved probe says what it is.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import make_scorer
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import check_is_fitted, validate_data

from stages.lib.errors import UserError
from stages.lib.evaluation.metrics import auroc, single_class_reason
from stages.lib.evaluation.selective import spearman

log = logging.getLogger(__name__)

PROBE_FORMAT = "sep-linear-probe"
PROBE_FORMAT_VERSION = 2  # 2: weights as arrays beside the JSON metadata (1 held them in the JSON)
WEIGHT_NAMES = ("scaler_mean", "scaler_scale", "coef", "intercept")
FIT_DTYPES = {"float64": np.float64, "float32": np.float32}
"""``LinearProbe(dtype=...)``: the floating types a probe can be fitted in."""
"""The arrays ``to_arrays`` returns: (n_features,) float64 each, ``intercept`` of shape ()."""


class SingleClassError(UserError):
    """Training labels hold one class, so no classifier can be fitted."""


def require_two_classes(labels, label_name: str, split: str) -> None:
    """Raise SingleClassError naming ``label_name`` and ``split`` unless ``labels`` (n,) holds both classes."""
    reason = single_class_reason(labels, label_name)
    if reason is not None:
        raise SingleClassError(f"label `{label_name}` in split `{split}`: {reason}; a probe needs both classes")


def held_out_score(metric: str, targets, decision) -> float | None:
    """A probe's own metric (``auroc`` for a binary label, ``spearman`` for a continuous target) of ``decision``
    (n,) for ``targets`` (n,). A constant prediction of a varying target ranks nothing, like AUROC's 0.5, so it
    scores 0 rather than undefined; None when the targets hold one class / one value."""
    if metric == "auroc":
        return auroc(targets, decision)
    if len(np.unique(targets)) > 1 and np.ptp(decision) == 0:
        return 0.0
    return spearman(targets, decision)


class LinearProbe(BaseEstimator):
    """Standardised L2 linear model with C chosen by question-grouped cross-validation; the base of
    ``LogisticProbe`` and ``RidgeProbe`` (use those).

    Parameters
    ----------
    c_grid : sequence of float
        Inverse regularisation strengths to try; a single value skips the cross-validation.
    cv_folds : int
        Folds of the grouped CV, clamped to the number of distinct groups (questions) in the training data.
    max_iter : int
        lbfgs iterations per logistic fit.
    random_state : int or None
        Seeds the fold shuffling and the solver.
    dtype : ``float64`` or ``float32``
        Floating type the features are fitted in. float32 halves the memory traffic of every solver step (about
        twice as fast at a real model's width); the stored weights are float64 either way.
    label_name, feature, position, layer, layer_end : where the probe reads and what it predicts; ``fit``
        ignores them (``label_name`` names the label in errors). ``layer_end`` is the last layer (inclusive) of a
        concatenated layer range starting at ``layer``; None for one layer.

    Attributes
    ----------
    scaler_mean_, scaler_scale_ : (n_features,) standardisation fitted on the training data
    coef_ : (n_features,) weights in the standardised space
    intercept_ : float
    C_ : float, the chosen C
    cv_scores_ : dict C -> mean held-out score over the usable folds (AUROC for logistic, Spearman for ridge);
        None for every C when ``c_grid`` holds one value (no cross-validation)
    n_features_in_ : int
    """

    kind: ClassVar[str]
    """``logistic``, ``ridge`` or ``mean_difference``: which subclass (the key of PROBE_CLASSES)."""
    metric: ClassVar[str]
    """The probe's own held-out metric: ``auroc`` (binary label) or ``spearman`` (continuous target)."""

    def __init__(self, c_grid: Sequence[float] = (1.0,), cv_folds: int = 5, max_iter: int = 1000,
                 random_state: int | None = None, dtype: str = "float64", label_name: str = "label",
                 feature: str = "hidden_state", position: str | None = None, layer: int | None = None,
                 layer_end: int | None = None):
        self.c_grid = c_grid
        self.cv_folds = cv_folds
        self.max_iter = max_iter
        self.random_state = random_state
        self.dtype = dtype
        self.label_name = label_name
        self.feature = feature
        self.position = position
        self.layer = layer
        self.layer_end = layer_end

    # ---- what the subclasses define ---------------------------------------------------------------
    def _targets(self, labels, split: str) -> np.ndarray:
        raise NotImplementedError

    def _pipeline(self, c: float) -> Pipeline:
        raise NotImplementedError

    def _c_search_grid(self, c_grid: list[float]) -> dict[str, list[float]]:
        """The GridSearchCV parameter grid over the pipeline, one candidate per C of ``c_grid``, in its order."""
        raise NotImplementedError

    def _usable(self, labels: np.ndarray, fit_rows: np.ndarray, held_out_rows: np.ndarray) -> bool:
        """Whether a fold's score is defined whatever C is (a fold that says nothing about C is skipped)."""
        raise NotImplementedError

    def _fold_score(self, targets, output) -> float:
        """The held-out score of one fold (``held_out_score``), defined on every usable fold."""
        raise NotImplementedError

    def _set_extras(self, model) -> None:
        """Fitted attributes beyond the weights, from the final fitted ``model`` (the pipeline's last step)."""

    def _extras_metadata(self) -> dict[str, Any]:
        """Those attributes as JSON-ready metadata (``to_arrays``)."""
        return {}

    def _restore_extras(self, metadata: Mapping[str, Any]) -> None:
        """Set those attributes from the metadata (``from_arrays``)."""

    # ---- fitting ---------------------------------------------------------------------------------
    def fit(self, X, y, groups=None, split: str = "train") -> "LinearProbe":
        """Fit on ``X`` (n, n_features) and ``y`` (n,) (bool; float targets for ridge); ``groups`` (n,) are
        question ids. Without groups every row is its own group. ``split`` only names the data in error messages.
        """
        if self.dtype not in FIT_DTYPES:
            raise ValueError(f"dtype {self.dtype!r}; expected one of {tuple(FIT_DTYPES)}")
        X, y = validate_data(self, X, y, dtype=FIT_DTYPES[self.dtype], y_numeric=self.kind == "ridge")
        y = self._targets(y, split)
        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        if len(groups) != len(y):
            raise ValueError(f"{len(y)} rows but {len(groups)} groups")
        c_grid = sorted(float(c) for c in self.c_grid)  # ascending: GridSearchCV breaks ties by the first C
        if len(c_grid) == 1:
            self.C_, self.cv_scores_ = c_grid[0], {c_grid[0]: None}
            pipeline = self._pipeline(self.C_).fit(X, y)
        else:
            search = GridSearchCV(self._pipeline(c_grid[0]), self._c_search_grid(c_grid),
                                  scoring=make_scorer(self._fold_score, response_method=self._response_method),
                                  cv=self._folds(y, groups, split), refit=True, error_score="raise")
            search.fit(X, y)
            scores = search.cv_results_["mean_test_score"]
            self.C_ = c_grid[int(search.best_index_)]  # highest mean score; ties go to the smallest C
            self.cv_scores_ = {c: float(score) for c, score in zip(c_grid, scores)}
            pipeline = search.best_estimator_
        scaler, model = pipeline.named_steps["scale"], pipeline.named_steps["model"]
        self.scaler_mean_ = scaler.mean_.astype(np.float64)
        self.scaler_scale_ = scaler.scale_.astype(np.float64)
        self.coef_ = np.ravel(model.coef_).astype(np.float64)
        self.intercept_ = float(np.ravel(model.intercept_)[0])
        self._set_extras(model)
        return self

    def _folds(self, y: np.ndarray, groups: np.ndarray, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """The usable folds of a shuffled GroupKFold over ``groups``, clamped to the number of groups."""
        n_groups = len(np.unique(groups))
        if n_groups < 2:
            raise ValueError(f"label `{self.label_name}` in split `{split}`: grouped cross-validation over "
                             f"c_grid needs >= 2 questions, got {n_groups}")
        splitter = GroupKFold(n_splits=min(self.cv_folds, n_groups), shuffle=True, random_state=self.random_state)
        folds = [(fit_rows, held_out_rows) for fit_rows, held_out_rows in splitter.split(y, y, groups)
                 if self._usable(y, fit_rows, held_out_rows)]
        if not folds:
            raise SingleClassError(f"label `{self.label_name}` in split `{split}`: no cross-validation fold had "
                                   "both classes on both sides, so C cannot be chosen; use fewer probes.cv_folds "
                                   "or more questions")
        return folds

    # ---- prediction ------------------------------------------------------------------------------
    def _linear_output(self, X) -> np.ndarray:
        """The linear function of the standardised features, shape (n,): ``decision_function`` of the logistic
        probe (log-odds of the positive class), ``predict`` of the ridge probe (the predicted value)."""
        check_is_fitted(self)
        # zero rows are fine here: an empty split (no OOD questions) scores nothing
        X = validate_data(self, X, reset=False, dtype=np.float64, ensure_min_samples=0)
        return ((X - self.scaler_mean_) / self.scaler_scale_) @ self.coef_ + self.intercept_

    # ---- weights as arrays -----------------------------------------------------------------------
    def to_arrays(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(metadata, weights): JSON-ready metadata (format, kind, ``get_params()``, chosen C, CV scores,
        n_features) and the WEIGHT_NAMES float64 arrays; ``from_arrays`` rebuilds the probe exactly."""
        check_is_fitted(self)
        metadata = {
            "format": PROBE_FORMAT,
            "format_version": PROBE_FORMAT_VERSION,
            "kind": self.kind,
            "params": _json_params(self.get_params()),
            "C": float(self.C_),
            "cv_scores": [{"C": float(c), "score": score} for c, score in self.cv_scores_.items()],
            "n_features": int(self.n_features_in_),
            **self._extras_metadata(),
        }
        weights = {"scaler_mean": self.scaler_mean_, "scaler_scale": self.scaler_scale_, "coef": self.coef_,
                   "intercept": np.asarray(self.intercept_, dtype=np.float64)}
        return metadata, weights

    @classmethod
    def from_arrays(cls, metadata: Mapping[str, Any], weights: Mapping[str, np.ndarray]) -> "LinearProbe":
        """Rebuild a fitted probe (of the class its ``kind`` names) from ``to_arrays`` output; ValueError on a
        foreign or inconsistent record."""
        if metadata.get("format") != PROBE_FORMAT or metadata.get("format_version") != PROBE_FORMAT_VERSION:
            raise ValueError(f"not a {PROBE_FORMAT} v{PROBE_FORMAT_VERSION} record: format="
                             f"{metadata.get('format')!r} version={metadata.get('format_version')!r}; "
                             "rerun train_probes")
        probe_class = PROBE_CLASSES.get(metadata.get("kind"))
        if probe_class is None:
            raise ValueError(f"probe kind {metadata.get('kind')!r}; expected one of {PROBE_KINDS}")
        params = dict(metadata["params"])
        unknown = sorted(set(params) - set(probe_class().get_params()))
        if unknown:
            raise ValueError(f"unknown probe params {unknown}")
        probe = probe_class(**params)
        probe.C_ = float(metadata["C"])
        probe.cv_scores_ = {float(row["C"]): row["score"] for row in metadata["cv_scores"]}
        probe.n_features_in_ = int(metadata["n_features"])
        for name in WEIGHT_NAMES:
            if name not in weights:
                raise ValueError(f"weights `{name}` missing")
            array = np.asarray(weights[name])
            expected = () if name == "intercept" else (probe.n_features_in_,)
            if array.dtype != np.float64 or array.shape != expected:
                raise ValueError(f"weights `{name}` are {array.dtype} of shape {array.shape}; expected float64 "
                                 f"of shape {expected}")
            setattr(probe, f"{name}_", array)
        probe.intercept_ = float(probe.intercept_)
        probe._restore_extras(metadata)
        return probe


class LogisticProbe(ClassifierMixin, LinearProbe):
    """L2 logistic regression of a binary label on standardised features, scored by AUROC.

    The project's labels are bool, so ``classes_`` = [False, True] and the positive class is True (any two
    labels work: the positive class is ``classes_[1]``). ``predict_proba`` is (n, 2) in ``classes_`` order;
    ``margin`` is the signed distance to the decision boundary. See ``LinearProbe`` for the parameters and the
    shared fitted attributes; ``classes_`` (2,) and ``n_iter_`` (lbfgs iterations of the final fit) are its own.
    """

    kind = "logistic"
    metric = "auroc"
    _response_method = "decision_function"

    def _targets(self, labels, split: str) -> np.ndarray:
        labels = np.asarray(labels)
        target_type = type_of_target(labels, input_name="y", raise_unknown=True)
        if target_type != "binary":
            raise ValueError(f"label `{self.label_name}` in split `{split}`: Only binary classification is "
                             f"supported. The type of the target is {target_type}.")
        classes = np.unique(labels)
        if len(classes) < 2:
            raise SingleClassError(f"label `{self.label_name}` in split `{split}`: one class only: all "
                                   f"{len(labels)} runs have `{self.label_name}` = {classes[0]}; a probe needs "
                                   "both classes")
        self.classes_ = classes  # set before the search: its scorer needs the positive class, classes_[1]
        return labels

    def _set_extras(self, model) -> None:
        self.classes_ = model.classes_
        self.n_iter_ = int(np.max(model.n_iter_))

    def _extras_metadata(self) -> dict[str, Any]:
        return {"classes": self.classes_.tolist(), "n_iter": self.n_iter_}

    def _restore_extras(self, metadata: Mapping[str, Any]) -> None:
        self.classes_ = np.asarray(metadata["classes"])
        self.n_iter_ = int(metadata["n_iter"])
        if self.classes_.shape != (2,):
            raise ValueError(f"`classes` {metadata['classes']!r}; expected two labels")

    def _fold_score(self, targets, output) -> float:
        score = held_out_score(self.metric, np.asarray(targets) == self.classes_[1], output)
        if score is None:  # _usable keeps only folds with both classes held out
            raise ValueError(f"probe `{self.label_name}`: held-out AUROC undefined on a fold kept as usable")
        return score

    def _pipeline(self, c: float) -> Pipeline:
        return Pipeline([("scale", StandardScaler()),
                         ("model", LogisticRegression(C=c, max_iter=self.max_iter, random_state=self.random_state))])

    def _c_search_grid(self, c_grid: list[float]) -> dict[str, list[float]]:
        return {"model__C": c_grid}

    def _usable(self, labels, fit_rows, held_out_rows) -> bool:
        # one class on either side of a fold says nothing about C
        return len(np.unique(labels[fit_rows])) == 2 and len(np.unique(labels[held_out_rows])) == 2

    def decision_function(self, X) -> np.ndarray:
        """Log-odds of the positive class ``classes_[1]``, shape (n,)."""
        return self._linear_output(X)

    def predict_proba(self, X) -> np.ndarray:
        """P(classes_[0]), P(classes_[1]) per row, shape (n, 2); rows sum to 1."""
        probability = expit(self.decision_function(X))
        return np.column_stack([1 - probability, probability])

    def predict(self, X) -> np.ndarray:
        """The more likely class (``classes_[1]`` when P > 0.5), shape (n,)."""
        positive = self.decision_function(X) > 0
        return self.classes_[positive.astype(int)]

    def margin(self, X) -> np.ndarray:
        """Signed distance to the decision boundary in the standardised space: decision / ||w||, shape (n,).

        0 for every row when all weights are 0 (no boundary to measure from).
        """
        norm = float(np.linalg.norm(self.coef_))
        decision = self.decision_function(X)
        return decision / norm if norm > 0 else np.zeros_like(decision)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False  # one binary label per probe
        return tags


class RidgeProbe(RegressorMixin, LinearProbe):
    """Ridge regression (alpha = 1 / C) of a continuous target on standardised features, scored by Spearman
    correlation; ``predict`` is the predicted value. See ``LinearProbe``."""

    kind = "ridge"
    metric = "spearman"
    _response_method = "predict"

    def _targets(self, labels, split: str) -> np.ndarray:
        labels = np.asarray(labels, dtype=np.float64)
        if not np.all(np.isfinite(labels)) or len(np.unique(labels)) < 2:
            raise SingleClassError(f"target `{self.label_name}` in split `{split}`: a ridge probe needs finite, "
                                   f"non-constant values; got n_samples = {len(labels)}, "
                                   f"{len(np.unique(labels))} distinct")
        return labels

    def _pipeline(self, c: float) -> Pipeline:
        return Pipeline([("scale", StandardScaler()), ("model", Ridge(alpha=1.0 / c))])

    def _c_search_grid(self, c_grid: list[float]) -> dict[str, list[float]]:
        return {"model__alpha": [1.0 / c for c in c_grid]}

    def _usable(self, labels, fit_rows, held_out_rows) -> bool:
        # Spearman is undefined for a constant held-out target, whatever the prediction
        return len(np.unique(labels[held_out_rows])) > 1

    def _fold_score(self, targets, output) -> float:
        score = held_out_score(self.metric, targets, output)
        if score is None:  # _usable keeps only folds with a varying held-out target
            raise ValueError(f"probe `{self.label_name}`: held-out Spearman undefined on a fold kept as usable")
        return score

    def predict(self, X) -> np.ndarray:
        """The predicted target, shape (n,)."""
        return self._linear_output(X)


class MeanDifferenceProbe(LinearProbe):
    """Difference-in-means probe: the direction along which the label's classes differ, with no solver.

    On standardised features z, the weights are the covariance of each feature with the target,
    ``coef_j = mean_i(z_ij * (y_i - mean(y)))``: for a bool label that is p (1 - p) (mu_true - mu_false), the
    difference of the class means (the "mass-mean" probe of Marks & Tegmark, 2023); for a continuous target, the
    first partial-least-squares direction. ``intercept_`` is 0 (the train mean maps to 0). One pass over the
    features (and two for the standardisation): see docs/benchmarks.md for its cost against a logistic fit and
    scikit-learn's ``PLSRegression(n_components=1)`` (which fits the same direction, in float64), so every location
    of a real model can be screened in seconds (``probes.screen_method``).

    Its output ranks (scored by AUROC for a bool label, Spearman for a continuous target, ``metric``); it is not a
    probability, so it has no ``predict_proba``. ``c_grid``, ``cv_folds`` and ``max_iter`` are not used (C_ records
    the one C given, for the record only).
    """

    kind = "mean_difference"
    _response_method = "decision_function"

    @property
    def metric(self) -> str:  # set by fit from the target's type
        check_is_fitted(self, "metric_")
        return self.metric_

    def fit(self, X, y, groups=None, split: str = "train") -> "MeanDifferenceProbe":
        """Fit on ``X`` (n, n_features) and ``y`` (n,): bool (metric AUROC) or float (metric Spearman)."""
        if self.dtype not in FIT_DTYPES:
            raise ValueError(f"dtype {self.dtype!r}; expected one of {tuple(FIT_DTYPES)}")
        binary = np.asarray(y).dtype == bool
        X, y = validate_data(self, X, y, dtype=FIT_DTYPES[self.dtype], y_numeric=True)
        y = np.asarray(y, dtype=np.float64)
        if len(np.unique(y)) < 2:
            raise SingleClassError(f"label `{self.label_name}` in split `{split}`: one value only in "
                                   f"{len(y)} runs; a probe needs both classes / a varying target")
        self.metric_ = "auroc" if binary else "spearman"
        # sum_i (x_ij - mean_j) * c_i = sum_i x_ij * c_i, since the centred target c sums to 0
        products = (X.T @ (y - y.mean()).astype(X.dtype)).astype(np.float64)
        # StandardScaler's mean and (population) scale in two numpy passes: 0.012 s against StandardScaler.fit's
        # 0.067 s at 3,000 x 2,560 float32 (medians of 5, one process)
        self.scaler_mean_ = X.mean(axis=0, dtype=np.float64)
        deviations = X - self.scaler_mean_.astype(X.dtype)
        scale = np.sqrt(np.square(deviations, out=deviations).sum(axis=0, dtype=np.float64) / len(y))
        scale[scale < 10 * np.finfo(np.float64).eps] = 1.0  # a constant feature: scale 1, as StandardScaler
        self.scaler_scale_ = scale
        self.coef_ = products / (len(y) * self.scaler_scale_)
        self.intercept_ = 0.0
        self.C_ = float(min(self.c_grid))  # recorded only: no C enters the direction
        self.cv_scores_ = {self.C_: None}
        return self

    def _extras_metadata(self) -> dict[str, Any]:
        return {"metric": self.metric_}

    def _restore_extras(self, metadata: Mapping[str, Any]) -> None:
        if metadata.get("metric") not in ("auroc", "spearman"):
            raise ValueError(f"`metric` {metadata.get('metric')!r}; expected auroc or spearman")
        self.metric_ = metadata["metric"]

    def decision_function(self, X) -> np.ndarray:
        """The projection on the direction, shape (n,): larger means more like the positive class / a larger
        target."""
        return self._linear_output(X)


PROBE_CLASSES: dict[str, type[LinearProbe]] = {"logistic": LogisticProbe, "ridge": RidgeProbe,
                                               "mean_difference": MeanDifferenceProbe}
PROBE_KINDS = tuple(PROBE_CLASSES)


def probe_output(probe: LinearProbe, features) -> np.ndarray:
    """What a probe's own metric ranks, shape (n,): the predicted value (``predict``) of a ridge probe, else
    ``decision_function`` (a logistic probe's log-odds, a mean-difference probe's projection)."""
    return probe.predict(features) if probe.kind == "ridge" else probe.decision_function(features)


def _json_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``get_params()`` as plain JSON values; ValueError for a param JSON cannot hold (a RandomState, ...)."""
    out = {}
    for name, value in params.items():
        if name == "c_grid":
            value = [float(c) for c in value]
        elif isinstance(value, np.integer):
            value = int(value)
        if value is not None and not isinstance(value, (str, int, float, list)):
            raise ValueError(f"probe param `{name}` = {value!r} cannot be stored as JSON")
        out[name] = value
    return out
