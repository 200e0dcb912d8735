"""Lesion gating in the CIB example: the ``HEADS:gate-WEIGHTING`` rows.

Instead of blending with calibrated weights (Eq. 1/2, which pull a true lesion down with the false
positive that shares its window), a gated row keeps the prediction of **average** blending and drops
whole lesions by their confidence (:func:`patchblend.gate_lesions`):

==================  ===========================================================================
``gate-patch``,     a component of average's prediction (``p > 0.5``, 26-connected, ≥ 11 voxels:
``gate-grid``,      the metrics' lesions) is kept when the mean over it of the blended confidence
``gate-patch*grid`` ``C = Σ α / N`` of that weighting (Eq. 1/2 applied to the weights alone) is ≥ τ
``gate-lesion``     kept when a **lesion head** scores it ≥ τ: a logistic regression on what lies in
                    and around the component (:func:`feature_names`: size, probability, the three
                    confidence maps of the head set, both time points inside and in a 2-voxel ring,
                    the tissue around it in the baseline scan, and the network's last decoder feature,
                    average-blended, inside and in the ring)
==================  ===========================================================================

Everything is fitted on the calibration cases only (:func:`fit_gating`): the lesion heads on the
components of average's prediction there, labelled true or false positive by the MSSEG-2 rule, and
τ of every gated row by :func:`patchblend.choose_gate_threshold` (:data:`GATE_RULE`): the largest τ
on a grid over [0, 1] that keeps ≥ 95% of the lesions average detects in ≥ 90% of 1000 bootstrap
resamples of the calibration cases. The lesion head's scores used for τ are cross-fitted (each
calibration case scored by a head fitted on the other folds), so τ is not chosen on scores the
head was fitted to.
"""
from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from patchblend.lesions import GateThreshold, choose_gate_threshold, gate_lesions

__all__ = ["GATES", "GATE_RULE", "FEATURES", "CONFIDENCE_FEATURES", "TISSUE_FEATURES", "ATLAS_FEATURES",
           "ATLAS_INTERACTIONS", "DECODER", "LesionHead",
           "blended_confidence", "decoder_feature_map", "feature_names", "table_names", "tissue_classes",
           "lesion_components", "ComponentContext", "component_context", "confidence_features", "component_features",
           "component_truth", "fit_gating", "gated_prediction", "GatedComponents", "component_centres",
           "component_rows", "COMPONENT_COLUMNS"]

#: Gated blendings (``HEADS:gate-...``); the first three gate by the mean blended confidence of one weighting.
GATES = ("gate-patch", "gate-grid", "gate-patch*grid", "gate-lesion")
#: How τ is chosen (fixed before the first test run): grid of candidates, floor, bootstrap coverage.
GATE_RULE = {"candidates": tuple(np.round(np.arange(0, 1.0001, 0.01), 2)), "keep": 0.95, "coverage": 0.9,
             "n_boot": 1000, "seed": 0}
#: Components as the metrics count lesions: threshold, 26-connectivity, minimum size.
THRESHOLD, CONNECTIVITY, MIN_SIZE = 0.5, 3, 11
#: Cross-fitting folds of the lesion head's calibration scores.
FOLDS = 4
RING = 2  #: voxels around a component that form its ring
#: The lesion head's features that do not depend on the network (then, per decoder channel: :func:`feature_names`).
FEATURES = ("log_size", "p_mean", "p_max", "p_frac_0.9", "C_patch", "C_grid", "C_patch*grid", "C_grid_max",
            "t1", "t2", "diff", "diff_max", "t1_ring", "t2_ring", "diff_ring", "p_ring", "extent")
#: The tissue the component lies in, from the baseline scan (``t1``) read with FLAIR contrast (CSF darkest, white
#: matter below grey matter): the baseline's brain voxels outside every component are clustered by intensity into
#: three classes (k-means, :func:`tissue_classes`); then the fraction of each class in the shell up to
#: :data:`NEAR` voxels around the component and in the shell from :data:`NEAR` to :data:`FAR` voxels, the mean
#: distance (voxels) of the component's voxels to the nearest CSF-class voxel, and the fraction of its voxels whose
#: baseline lies nearer the white-matter level than the grey-matter level. New MS lesions lie in white matter;
#: a follow-up hyperintensity in or against the cortex is a likelier false positive.
TISSUE_FEATURES = ("csf_near", "wm_near", "gm_near", "csf_far", "wm_far", "gm_far", "csf_distance", "t1_wm_like")
NEAR, FAR = 3, 6
#: The template's white-matter probability at the component's centre (:func:`.atlas.template_white_matter`; the
#: table has this column when :func:`component_context` is given the registered map).
ATLAS_FEATURES = ("atlas_wm",)
#: Columns a lesion head multiplies by ``atlas_wm`` (its evidence counts most where the template says deep white
#: matter): chosen in a cross-fit on calibration phantoms only (the demo's calibration cases and 32 more).
ATLAS_INTERACTIONS = ("log_size", "p_mean", "p_max", "p_frac_0.9", "C_patch", "C_grid", "C_patch*grid",
                      "C_grid_max", "t1", "t2", "diff", "diff_max")
#: ``CalibratedPredictor.start(DECODER, replay=True)`` replays the network's last decoder feature.
DECODER = "decoder"


def feature_names(channels: int, atlas: bool = False) -> Tuple[str, ...]:
    """The lesion head's features with a ``channels``-channel decoder feature: :data:`FEATURES`,
    :data:`TISSUE_FEATURES`, with ``atlas`` :data:`ATLAS_FEATURES`, then the mean of each decoder channel inside
    the component (``dec_k``) and in its ring (``dec_k_ring``): the columns of :func:`component_features`."""
    return FEATURES + TISSUE_FEATURES + (ATLAS_FEATURES if atlas else ()) + _decoder_names(channels)


def _decoder_names(channels: int) -> Tuple[str, ...]:
    return tuple(f"dec_{k}" for k in range(channels)) + tuple(f"dec_{k}_ring" for k in range(channels))


def table_names(width: int) -> Tuple[str, ...]:
    """The column names of a component table ``width`` columns wide: :func:`feature_names` of its decoder
    width (with the one atlas column when ``width - len(FEATURES) - len(TISSUE_FEATURES)`` is odd: the decoder
    adds columns in pairs), or :data:`FEATURES` alone (``width == len(FEATURES)``, the table of heads saved
    before the tissue and decoder columns)."""
    if width == len(FEATURES):
        return FEATURES
    channels, atlas = divmod(width - len(FEATURES) - len(TISSUE_FEATURES), 2)  # (one atlas column: odd)
    if channels < 0:
        raise ValueError(f"features must have {len(FEATURES)} or {len(FEATURES) + len(TISSUE_FEATURES)} + 2w "
                         f"(+ {len(ATLAS_FEATURES)}) columns (feature_names), got {width}")
    return feature_names(channels, bool(atlas))


def _known_names(names: Sequence[str]) -> bool:
    """Whether ``names`` is a layout a lesion head was ever fitted on: this version's (with or without the atlas
    column), or an earlier one (:data:`FEATURES` alone, or with decoder columns and no tissue columns)."""
    names = tuple(names)
    channels = max(len(names) - len(FEATURES), 0) // 2
    rest = len(names) - len(FEATURES) - len(TISSUE_FEATURES)
    return names in (feature_names(rest // 2), feature_names((rest - 1) // 2, atlas=True),
                     FEATURES + _decoder_names(channels))


def tissue_classes(t1: np.ndarray, brain: np.ndarray, ids: np.ndarray,
                   iterations: int = 30) -> Tuple[np.ndarray, np.ndarray]:
    """``(classes [D, H, W] int64, levels [3])``: each voxel's nearest of three intensity levels of the baseline
    scan ``t1``, found by k-means on the ``brain`` voxels outside every component (``ids == 0``), levels in
    increasing order; in FLAIR order class 0 is CSF (and everything outside ``brain``), 1 white matter, 2 grey
    matter."""
    values = t1[brain & (ids == 0)].astype(np.float64)
    if values.size < 3:
        return np.zeros(t1.shape, np.int64), np.zeros(3)
    levels = np.percentile(values, [10, 50, 90])
    for _ in range(iterations):
        nearest = np.abs(values[:, None] - levels[None]).argmin(1)
        levels = np.array([values[nearest == k].mean() if (nearest == k).any() else levels[k] for k in range(3)])
    levels = np.sort(levels)
    classes = np.abs(t1[..., None].astype(np.float64) - levels).argmin(-1)
    classes[~brain] = 0
    return classes, levels


def blended_confidence(predictor, inputs: torch.Tensor, roi, sw_batch_size: int, overlap: float, heads: str,
                       weighting: str) -> np.ndarray:
    """``C = Σ_i α_i / N(x)`` ``[D, H, W]`` with the weights of ``heads`` and ``weighting``: the driver's
    confidence map (``confidence=True``), replaying the predictor's recorded windows."""
    from patchblend.inference import sliding_window_inference

    predictor.start(heads, replay=True)
    _, c = sliding_window_inference(inputs, list(roi), sw_batch_size, predictor, overlap=overlap, mode="constant",
                                    weighting=weighting, normalize="count", confidence=True, weigh_prediction=False)
    return c[0, 0].double().cpu().numpy()


def decoder_feature_map(predictor, inputs: torch.Tensor, roi, sw_batch_size: int, overlap: float) -> np.ndarray:
    """The network's last decoder feature ``[w, D, H, W]``, average-blended by the driver, replaying the
    predictor's recorded windows (no second run of the network)."""
    from patchblend.inference import sliding_window_inference

    predictor.start(DECODER, replay=True)
    out = sliding_window_inference(inputs, list(roi), sw_batch_size, predictor, overlap=overlap, mode="constant")
    return out[0].double().cpu().numpy()


def lesion_components(prob: np.ndarray):
    """Components of ``prob > 0.5`` as the metrics count lesions: ``(ids [D, H, W] int64, sizes [n])``,
    components under 11 voxels already dropped (id 0)."""
    gate = gate_lesions(torch.from_numpy(np.ascontiguousarray(prob)), torch.zeros(prob.shape), -math.inf,
                        threshold=THRESHOLD, connectivity=CONNECTIVITY, min_size=MIN_SIZE)
    ids = gate.components_map.numpy()
    kept = np.array([c.kept for c in gate.components], dtype=bool)
    lut = np.zeros(len(kept) + 1, dtype=np.int64)
    lut[1:][kept] = np.arange(1, int(kept.sum()) + 1)
    ids = lut[ids]
    return ids, np.bincount(ids.ravel(), minlength=int(kept.sum()) + 1)[1:]


def _means(ids: np.ndarray, n: int, values: np.ndarray) -> np.ndarray:
    sizes = np.bincount(ids.ravel(), minlength=n + 1)[1:]
    return np.bincount(ids.ravel(), weights=values.ravel().astype(np.float64), minlength=n + 1)[1:] / np.maximum(sizes, 1)


def _maxima(ids: np.ndarray, n: int, values: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return np.asarray(ndimage.maximum(values, ids, np.arange(1, n + 1)), dtype=np.float64)


class ComponentContext(NamedTuple):
    """What the lesion head reads of one case's components that does not depend on the head set
    (:func:`component_context`): computed once per case, then completed per head set by
    :func:`confidence_features`."""

    ids: np.ndarray  #: ``[D, H, W]`` component ids (:func:`lesion_components`)
    table: np.ndarray  #: ``[n, len(feature_names(w))]`` every column but :data:`CONFIDENCE_FEATURES` (left 0)


#: The columns of :data:`FEATURES` read from the blended confidence maps of a head set (:func:`confidence_features`).
CONFIDENCE_FEATURES = ("C_patch", "C_grid", "C_patch*grid", "C_grid_max")


def component_context(ids: np.ndarray, prob: np.ndarray, t1: np.ndarray, t2: np.ndarray,
                      decoder: Optional[np.ndarray] = None,
                      white_matter: Optional[np.ndarray] = None) -> ComponentContext:
    """The head-independent columns of :func:`component_features` (its distance transforms, tissue classes and
    decoder pooling; with ``white_matter`` ``[D, H, W]``, the registered template's white matter
    (:func:`.atlas.template_white_matter`), the :data:`ATLAS_FEATURES` column), for :func:`confidence_features`
    to complete with each head set's confidence maps."""
    from scipy import ndimage

    decoder = np.zeros((0,) + ids.shape) if decoder is None else np.asarray(decoder)
    if decoder.ndim != 4 or decoder.shape[1:] != ids.shape:
        raise ValueError(f"decoder must be [w, *{ids.shape}], got {decoder.shape}")
    if white_matter is not None and np.shape(white_matter) != ids.shape:
        raise ValueError(f"white_matter must be {list(ids.shape)}, got {list(np.shape(white_matter))}")
    n = int(ids.max())
    if n == 0:
        return ComponentContext(ids, np.zeros((0, len(feature_names(len(decoder), white_matter is not None)))))
    diff = t2 - t1
    sizes = np.bincount(ids.ravel(), minlength=n + 1)[1:]
    # ring: voxels within RING of a component, outside every component, given to the nearest one
    dist, nearest = ndimage.distance_transform_edt(ids == 0, return_indices=True)
    owner = ids[tuple(nearest)]
    ring = np.where((ids == 0) & (dist <= RING), owner, 0)
    objects = ndimage.find_objects(ids)
    extent = np.array([sizes[k] / np.prod([s.stop - s.start for s in objects[k]]) for k in range(n)])
    known = {"log_size": np.log(sizes), "p_mean": _means(ids, n, prob), "p_max": _maxima(ids, n, prob),
             "p_frac_0.9": _means(ids, n, prob > 0.9), "t1": _means(ids, n, t1), "t2": _means(ids, n, t2),
             "diff": _means(ids, n, diff), "diff_max": _maxima(ids, n, diff), "t1_ring": _means(ring, n, t1),
             "t2_ring": _means(ring, n, t2), "diff_ring": _means(ring, n, diff), "p_ring": _means(ring, n, prob),
             "extent": extent}
    # the CONFIDENCE_FEATURES are left 0 here, for confidence_features; every other name of FEATURES is in known
    cols = [np.zeros(n) if name in CONFIDENCE_FEATURES else known[name] for name in FEATURES]
    cols += _tissue_columns(ids, n, t1, (t1 != 0) | (t2 != 0), dist, owner)
    if white_matter is not None:
        centre = np.clip(np.round(component_centres(ids)).astype(np.int64), 0, np.array(ids.shape) - 1)
        cols.append(np.asarray(white_matter, np.float64)[tuple(centre.T)])
    cols += [_means(ids, n, f) for f in decoder] + [_means(ring, n, f) for f in decoder]
    return ComponentContext(ids, np.stack(cols, 1))


def confidence_features(context: ComponentContext, conf: Dict[str, np.ndarray]) -> np.ndarray:
    """``[n, len(feature_names(w))]``: ``context``'s table with the :data:`CONFIDENCE_FEATURES` of ``conf``, the
    blended confidence of each weighting (``patch``, ``grid``, ``patch*grid``) of one head set."""
    ids, table = context.ids, context.table.copy()
    n = len(table)
    if n == 0:
        return table
    cols = (_means(ids, n, conf["patch"]), _means(ids, n, conf["grid"]), _means(ids, n, conf["patch*grid"]),
            _maxima(ids, n, conf["grid"]))
    for name, col in zip(CONFIDENCE_FEATURES, cols):
        table[:, FEATURES.index(name)] = col
    return table


def component_features(ids: np.ndarray, prob: np.ndarray, conf: Dict[str, np.ndarray], t1: np.ndarray,
                       t2: np.ndarray, decoder: Optional[np.ndarray] = None,
                       white_matter: Optional[np.ndarray] = None) -> np.ndarray:
    """``[n, len(feature_names(w, atlas))]`` per component (``ids`` from :func:`lesion_components`); ``conf`` the
    blended confidence of each weighting (``patch``, ``grid``, ``patch*grid``); ``decoder`` the blended
    decoder feature ``[w, D, H, W]`` (:func:`decoder_feature_map`; ``None``: ``w = 0``); ``white_matter`` the
    registered template's white matter (``None``: no atlas column). The same as :func:`confidence_features` of
    :func:`component_context`, which computes the head-independent part once for several head sets."""
    return confidence_features(component_context(ids, prob, t1, t2, decoder, white_matter), conf)


def _tissue_columns(ids: np.ndarray, n: int, t1: np.ndarray, brain: np.ndarray, dist: np.ndarray,
                    owner: np.ndarray) -> List[np.ndarray]:
    """The :data:`TISSUE_FEATURES` columns; ``dist``: each voxel's distance to the nearest component voxel,
    ``owner``: that component's id."""
    from scipy import ndimage

    classes, levels = tissue_classes(t1, brain, ids)
    cols = []
    for lo, hi in ((0, NEAR), (NEAR, FAR)):
        shell = np.where((ids == 0) & (dist > lo) & (dist <= hi), owner, 0)
        cols += [_means(shell, n, classes == k) for k in range(3)]
    cols.append(_means(ids, n, ndimage.distance_transform_edt(classes != 0)))
    cols.append(_means(ids, n, np.abs(t1 - levels[1]) < np.abs(t1 - levels[2])))
    return cols


def component_truth(ids: np.ndarray, label: np.ndarray) -> np.ndarray:
    """``[n]`` bool: is each component a true lesion (MSSEG-2 rule, predicted side; ground truth
    filtered to ≥ 11 voxels as in the metrics)?"""
    from .metrics import _detected, label_components, remove_small_components

    g = remove_small_components(label > 0)
    gl, _ = label_components(g)
    return _detected(ids.astype(np.int32), int(ids.max()), gl, ids > 0, 0.1, 0.7, 0.65)


class LesionHead:
    """Logistic regression on standardized component features (:func:`feature_names`; L2 penalty ``l2``;
    1.0: the best of 0.01, 0.1, 1 in a 4-fold cross-fit on the demo's calibration cases), fitted with
    L-BFGS: the probability that a component of average's prediction is a true lesion. On a table with the
    ``atlas_wm`` column it also reads the products ``atlas_wm * f`` of the :data:`ATLAS_INTERACTIONS`."""

    def __init__(self, mean=None, std=None, weight=None, bias: float = 0.0, l2: float = 1.0, features=None):
        self.mean, self.std, self.weight, self.bias, self.l2 = mean, std, weight, float(bias), float(l2)
        self.features = tuple(features) if features is not None else None

    def fit(self, features: np.ndarray, truth: np.ndarray) -> "LesionHead":
        x = np.asarray(features, np.float64)
        y = np.asarray(truth, np.float64)
        if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(f"features [n, F] and truth [n] must match and be non-empty, got {x.shape}, {y.shape}")
        self.features = table_names(x.shape[1])
        x = self._design(x)
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6
        xt = torch.from_numpy((x - self.mean) / self.std)
        yt = torch.from_numpy(y)
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)  # (x: the design matrix)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + self.l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.weight, self.bias = w.detach().numpy().copy(), float(b.detach())
        return self

    def score(self, features: np.ndarray) -> np.ndarray:
        """``[n]`` the probability that each component is a true lesion; ``features`` ``[n, F]``: a table of
        :func:`table_names` (this head's columns are read by name: a head fitted before the tissue or decoder
        columns reads its own from a newer table)."""
        x = np.asarray(features, np.float64)
        if x.ndim == 2 and x.shape[1] != len(self.features):
            try:
                columns = table_names(x.shape[1])
            except ValueError:
                columns = ()
            if set(self.features) <= set(columns):
                x = x[:, [columns.index(name) for name in self.features]]
        if x.ndim != 2 or x.shape[1] != len(self.features):
            raise ValueError(f"this lesion head reads {len(self.features)} features per component "
                             f"({self.features[-1]} last), got {x.shape}")
        x = (self._design(x) - self.mean) / self.std
        return 1.0 / (1.0 + np.exp(-(x @ self.weight + self.bias)))

    def _design(self, x: np.ndarray) -> np.ndarray:
        """``x`` ``[n, len(self.features)]`` and, when the features include ``atlas_wm``, its products with the
        :data:`ATLAS_INTERACTIONS`."""
        if ATLAS_FEATURES[0] not in self.features:
            return x
        atlas = x[:, [self.features.index(ATLAS_FEATURES[0])]]
        return np.concatenate([x, atlas * x[:, [self.features.index(f) for f in ATLAS_INTERACTIONS]]], 1)

    def state(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "weight": self.weight.tolist(),
                "bias": self.bias, "l2": self.l2, "features": list(self.features)}

    @classmethod
    def from_state(cls, state: dict) -> "LesionHead":
        names = list(state.get("features", []))
        if not _known_names(names):
            raise ValueError("this lesion head was fitted on other features")
        return cls(np.asarray(state["mean"]), np.asarray(state["std"]), np.asarray(state["weight"]), state["bias"],
                   state["l2"], names)


def gated_prediction(prob: np.ndarray, ids: np.ndarray, score: np.ndarray, tau: float) -> np.ndarray:
    """``prob`` with the components (``ids``) whose ``score`` is below ``tau`` set to 0."""
    drop = np.concatenate([[False], np.asarray(score) < tau])
    return np.where(drop[ids], 0.0, prob).astype(prob.dtype, copy=False)


def component_scores(gate: str, features: np.ndarray, lesion_head: Optional[LesionHead]) -> np.ndarray:
    """The statistic a gated blending thresholds, per component."""
    if gate == "gate-lesion":
        if lesion_head is None:
            raise ValueError("gate-lesion needs a fitted lesion head")
        return lesion_head.score(features) if len(features) else np.zeros(0)
    return features[:, FEATURES.index("C_" + gate[len("gate-"):])] if len(features) else np.zeros(0)


def detected_lesions(prob: np.ndarray, label: np.ndarray) -> int:
    """Ground-truth lesions detected by ``prob`` as :func:`.metrics.evaluate_case` counts them (without
    its distances)."""
    from .metrics import lesion_detection, remove_small_components

    return lesion_detection(remove_small_components(prob > THRESHOLD, MIN_SIZE),
                            remove_small_components(label > 0, MIN_SIZE))["detected"]


def fit_gating(per_case: Dict[str, List[dict]], log=print) -> dict:
    """Lesion heads and τ of every gated row from calibration cases.

    ``per_case[head set]``: one dict per calibration case ``{"prob", "ids", "features", "truth", "label"}``
    (average's probability, :func:`lesion_components`, :func:`component_features`,
    :func:`component_truth`, the ground truth). Returns ``{"lesion_heads": {head set: LesionHead},
    "thresholds": {(head set, gate): GateThreshold}}``."""
    rule = GATE_RULE
    cand = np.asarray(rule["candidates"])
    out = {"lesion_heads": {}, "thresholds": {}}
    for heads, cases in per_case.items():
        x = np.concatenate([c["features"] for c in cases])
        y = np.concatenate([c["truth"] for c in cases])
        gates = list(GATES[:3])
        if heads != "oracle" and 0 < y.sum() < len(y):
            out["lesion_heads"][heads] = LesionHead().fit(x, y)
            # cross-fitted scores: each case scored by a head fitted on the other folds
            fold = np.arange(len(cases)) % FOLDS
            for c in cases:
                c["cross"] = None
            for f in range(FOLDS):
                train = [c for c, k in zip(cases, fold) if k != f]
                xt = np.concatenate([c["features"] for c in train])
                yt = np.concatenate([c["truth"] for c in train])
                head = LesionHead().fit(xt, yt) if 0 < yt.sum() < len(yt) else out["lesion_heads"][heads]
                for c, k in zip(cases, fold):
                    if k == f:
                        c["cross"] = head.score(c["features"]) if len(c["features"]) else np.zeros(0)
            gates.append("gate-lesion")
        reference = np.array([detected_lesions(c["prob"], c["label"]) for c in cases])
        for gate in gates:
            detected = np.zeros((len(cases), len(cand)))
            for i, c in enumerate(cases):
                score = c["cross"] if gate == "gate-lesion" else component_scores(gate, c["features"], None)
                cache: Dict[bytes, float] = {}
                for j, t in enumerate(cand):
                    key = (np.asarray(score) >= t).tobytes()
                    if key not in cache:
                        cache[key] = detected_lesions(gated_prediction(c["prob"], c["ids"], score, t), c["label"])
                    detected[i, j] = cache[key]
            th = choose_gate_threshold(cand, detected, reference, keep=rule["keep"], coverage=rule["coverage"],
                                       n_boot=rule["n_boot"], seed=rule["seed"])
            out["thresholds"][(heads, gate)] = th
            log(f"      {heads}:{gate} tau {th.tau:.2f} (bootstrap 5-95%: {th.low:.2f}-{th.high:.2f}), keeps "
                f"{100 * th.kept_fraction:.1f}% of average's detected calibration lesions")
    return out


class GatedComponents(NamedTuple):
    """One case's components of average's prediction under one gated row (``n`` components)."""

    case: str
    size: np.ndarray  #: ``[n]`` voxels
    centre: np.ndarray  #: ``[n, 3]`` centre of mass, voxels of the case's grid
    score: np.ndarray  #: ``[n]`` the statistic the row thresholds
    truth: np.ndarray  #: ``[n]`` bool, a true lesion (:func:`component_truth`)
    tau: float  #: the row's threshold (kept: ``score >= tau``)


def component_centres(ids: np.ndarray) -> np.ndarray:
    """``[n, 3]`` centre of mass of each component of ``ids`` (:func:`lesion_components`), voxels."""
    from scipy import ndimage

    n = int(ids.max())
    return np.array(ndimage.center_of_mass(np.ones(ids.shape), ids, np.arange(1, n + 1))).reshape(n, ids.ndim)


#: Columns of ``components.csv`` (:func:`component_rows`).
COMPONENT_COLUMNS = ("case", "component", "size", "centre_0", "centre_1", "centre_2", "true_lesion", "row", "score",
                     "tau", "kept", "phantom_object", "phantom_intensity")


def component_rows(lesion_pairs: Dict[Tuple[str, str], List[GatedComponents]], objects=None) -> List[dict]:
    """One row per component and gated row (:data:`COMPONENT_COLUMNS`): its size, centre, truth, score and
    whether the row keeps it. ``objects(case name, centres [n, 3])``, when given, names what each component
    lies on (for phantoms: :func:`.phantom.match_phantom_objects`), as ``[(kind, intensity)]``."""
    rows, matched = [], {}
    for (heads, gate), items in lesion_pairs.items():
        for g in items:
            if objects is not None and g.case not in matched:
                matched[g.case] = objects(g.case, g.centre)
            names = matched.get(g.case) or [("", math.nan)] * len(g.size)
            for k in range(len(g.size)):
                rows.append({"case": g.case, "component": k + 1, "size": int(g.size[k]),
                             **{f"centre_{a}": round(float(g.centre[k, a]), 2) for a in range(3)},
                             "true_lesion": int(g.truth[k]), "row": f"{heads}:{gate}", "score": float(g.score[k]),
                             "tau": g.tau, "kept": int(g.score[k] >= g.tau), "phantom_object": names[k][0],
                             "phantom_intensity": names[k][1]})
    return rows


def gating_state(gating: dict) -> dict:
    """What :func:`fit_gating` returns, as plain data (saved with the post-hoc heads)."""
    return {"lesion_heads": {h: head.state() for h, head in gating["lesion_heads"].items()},
            "thresholds": {f"{h}:{g}": t._asdict() for (h, g), t in gating["thresholds"].items()},
            "rule": {k: (list(v) if isinstance(v, tuple) else v) for k, v in GATE_RULE.items()}}


def gating_from_state(state: Optional[dict]) -> dict:
    """Inverse of :func:`gating_state` (empty when ``state`` is ``None``)."""
    if not state:
        return {"lesion_heads": {}, "thresholds": {}}
    return {"lesion_heads": {h: LesionHead.from_state(s) for h, s in state["lesion_heads"].items()},
            "thresholds": {tuple(k.split(":", 1)): GateThreshold(**t) for k, t in state["thresholds"].items()}}


def lesion_quality_rows(pairs: Dict[Tuple[str, str], List[GatedComponents]]) -> List[dict]:
    """``head_quality.csv`` rows ``head = "lesion:STATISTIC"``: the statistic of each gated blending
    (mean confidence of a weighting, or the lesion head's score) as a score for "this component of
    average's prediction is a true lesion" (AUROC: false positives scored below true lesions)."""
    from patchblend.head_metrics import head_quality

    rows = []
    for (heads, gate), items in pairs.items():
        score = np.concatenate([g.score for g in items]) if items else np.zeros(0)
        truth = np.concatenate([g.truth for g in items]).astype(np.float64) if items else np.zeros(0)
        if len(score) == 0:
            continue
        rows.append({"heads": heads, "head": "lesion:" + gate[len("gate-"):],
                     **head_quality(score, truth)})
    return rows
