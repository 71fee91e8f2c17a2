"""The three heads and how their hyper-parameters are chosen on the validation part (never on test).

* ``logreg``: full-softmax (multinomial) logistic regression, ``0.5 |W|^2 + C * sum_i w_i CE_i`` as in
  scikit-learn, minimised by L-BFGS in torch over training rows kept in chunks on the device (GPU when
  there is one). The preprocessing is folded into the weights, so only raw (float16) rows are held.
* ``svm``: linear SVM, one-vs-rest squared hinge with the same penalty (LinearSVC's objective, with an
  unpenalised intercept), minimised by a primal Newton-CG over the same chunks (:mod:`.newton`; the L-BFGS path
  stays selectable as ``svm_solver='lbfgs'``); probabilities by temperature scaling fitted on validation.
* ``knn``: cosine kNN through FAISS; the k nearest training items vote exp(similarity / T) for their
  class (DINO's kNN evaluation, T = 0.07); k is chosen on validation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..device import resolve_device
from ..errors import EmbedkitError
from ..metrics import balanced_accuracy, log_loss
from .features import CHUNK_ROWS, Preprocessor, class_weights
from .saved import LINEAR_HEADS, Probe, knn_proba, linear_scores, softmax

DEFAULT_C = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
DEFAULT_K = (1, 3, 5, 10, 20, 50, 100, 200)
DINO_TEMPERATURE = 0.07


def solver_device(device: str = "auto") -> torch.device:
    """Where the linear solver runs: 'auto' is the GPU when CUDA is present, the CPU otherwise."""
    return resolve_device(device, allow_mps=False)


@dataclass
class HeadOptions:
    """Search grids and solver settings shared by all runs of a probe."""

    c_grid: Sequence[float] = DEFAULT_C
    k_grid: Sequence[int] = DEFAULT_K
    temperature: float = DINO_TEMPERATURE
    max_iter: int = 300
    tol: float = 1e-6
    device: str = "auto"
    chunk_rows: int = CHUNK_ROWS
    svm_solver: str = "newton"  # 'newton' (embedkit.probe.newton) or 'lbfgs' (the shared L-BFGS path, kept as reference)


# --------------------------------------------------------------------------- selection on validation


def val_score(y: np.ndarray, proba: np.ndarray) -> tuple[float, float]:
    """What validation maximises: balanced accuracy, ties broken by lower log-loss."""
    return balanced_accuracy(y, proba.argmax(1)), -log_loss(y, proba)


# --------------------------------------------------------------------------- the linear solver


class LinearProblem:
    """Training rows held in device chunks (their stored dtype), with the preprocessing folded into W."""

    def __init__(self, x: np.ndarray, pos: np.ndarray, y: np.ndarray, weight: np.ndarray | None, pre: Preprocessor,
                 n_classes: int, device: str = "cpu", chunk_rows: int = CHUNK_ROWS):
        self.device = solver_device(device)
        self.n_classes = n_classes
        self.l2 = pre.l2
        a, shift = pre.fold()
        self.a = torch.from_numpy(a.astype(np.float32)).to(self.device)
        self.shift = torch.from_numpy(shift.astype(np.float32)).to(self.device)
        self.chunks = []
        self.converged = False  # of the last fit
        self._buffer: torch.Tensor | None = None
        w = np.ones(len(pos)) if weight is None else np.asarray(weight, dtype=np.float64)
        self.total_weight = float(w.sum())
        for s in range(0, len(pos), chunk_rows):
            xb = torch.from_numpy(np.ascontiguousarray(x[pos[s:s + chunk_rows]])).to(self.device)
            yb = torch.from_numpy(np.asarray(y[s:s + chunk_rows], dtype=np.int64)).to(self.device)
            wb = torch.from_numpy(w[s:s + chunk_rows].astype(np.float32)).to(self.device)
            self.chunks.append((xb, yb, wb))

    def _features(self, xb: torch.Tensor) -> torch.Tensor:
        """A float32 view of one chunk; float16 chunks are converted into one reused buffer (no allocation per pass)."""
        if xb.dtype != torch.float32:
            if self._buffer is None or self._buffer.shape[0] < xb.shape[0]:
                self._buffer = torch.empty(xb.shape, dtype=torch.float32, device=self.device)
            xb = self._buffer[:xb.shape[0]].copy_(xb)
        return F.normalize(xb, dim=1) if self.l2 else xb

    @staticmethod
    def chunk_loss_grad(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed weighted loss of one chunk's scores ``z`` [n, K] and its gradient with respect to ``z``, in closed form."""
        if loss == "softmax":
            logp = F.log_softmax(z, dim=1)
            value = -(logp.gather(1, y[:, None]).squeeze(1) * w).sum()
            dz = logp.exp_()
            dz[torch.arange(len(y), device=z.device), y] -= 1.0
            return value, dz.mul_(w[:, None])
        t = -torch.ones_like(z)
        t.scatter_(1, y[:, None], 1.0)
        margin = torch.clamp(1.0 - t * z, min=0.0)
        value = (margin.pow(2).sum(1) * w).sum()
        return value, (-2.0 * t * margin).mul_(w[:, None])

    def fit(self, c: float, loss: str, init: tuple[np.ndarray, np.ndarray] | None = None,
            max_iter: int = 300, tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray, int]:
        """Minimise (1/S) sum_i w_i loss_i + |W|^2 / (2 C S) (S = sum of weights); returns W [K, D'], b [K], iterations."""
        dim = self.a.shape[1]
        if init is None:
            w0, b0 = torch.zeros(self.n_classes, dim), torch.zeros(self.n_classes)
        else:
            w0, b0 = torch.from_numpy(init[0]), torch.from_numpy(init[1])
        weight = w0.to(self.device, torch.float32).clone().requires_grad_(True)
        bias = b0.to(self.device, torch.float32).clone().requires_grad_(True)
        opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                tolerance_grad=tol, tolerance_change=1e-12, line_search_fn="strong_wolfe")
        s = self.total_weight

        def closure():
            opt.zero_grad()
            w_eff = self.a @ weight.T  # [D, K]
            b_eff = self.shift @ weight.T + bias
            w_leaf, b_leaf = w_eff.detach(), b_eff.detach()
            grad_w = torch.zeros_like(w_leaf.T)  # [K, D]: dz.T @ x is several times faster than x.T @ dz on CPU
            grad_b = torch.zeros_like(b_leaf)
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            for xb, yb, wb in self.chunks:
                feats = self._features(xb)
                value, dz = self.chunk_loss_grad(feats @ w_leaf + b_leaf, yb, wb, loss)
                grad_w.addmm_(dz.T, feats, alpha=1.0 / s)
                grad_b.add_(dz.sum(0), alpha=1.0 / s)
                total += value.double() / s
            torch.autograd.backward([w_eff, b_eff], [grad_w.T, grad_b])
            reg = (weight * weight).sum() / (2.0 * c * s)
            reg.backward()
            return (total + reg.detach().double()).float()

        opt.step(closure)
        state = opt.state[opt._params[0]]
        n_iter = int(state.get("n_iter", 0))
        # L-BFGS also stops when its evaluation budget (max_iter * 5/4) runs out: that is not convergence either
        self.converged = n_iter < max_iter and int(state.get("func_evals", 0)) < opt.defaults["max_eval"]
        return weight.detach().cpu().numpy(), bias.detach().cpu().numpy(), n_iter


def fit_temperature(scores: np.ndarray, y: np.ndarray) -> float:
    """Temperature T minimising the validation log-loss of softmax(scores / T) (Guo et al., 2017)."""
    from scipy.optimize import minimize_scalar

    if len(y) == 0:
        return 1.0
    res = minimize_scalar(lambda lt: log_loss(y, softmax(scores / np.exp(lt))), bounds=(-7.0, 7.0), method="bounded")
    return float(np.exp(res.x))


# --------------------------------------------------------------------------- fitting heads


@dataclass
class FitInput:
    """What a head sees of one run: raw features, class indices and positions of train (balanced) and val."""

    x: np.ndarray
    y: np.ndarray  # class index per row of x (-1 unlabelled)
    train: np.ndarray  # row positions, repeated when oversampling
    train_weight: np.ndarray | None
    val: np.ndarray
    classes: list[str]
    class_vote_weight: np.ndarray = field(default=None)  # kNN: per-class vote weights (balance=weights)


def fit_head(head: str, data: FitInput, pre: Preprocessor, opts: HeadOptions,
             progress: Callable[[str], None] | None = None) -> Probe:
    """Fit one head on the train part, choosing its hyper-parameters on the val part only."""
    if head in LINEAR_HEADS:
        return _fit_linear(head, data, pre, opts, progress)
    if head == "knn":
        return _fit_knn(data, pre, opts, progress)
    raise EmbedkitError(f"unknown head {head!r}")


def _fit_linear(head: str, data: FitInput, pre: Preprocessor, opts: HeadOptions, progress) -> Probe:
    k = len(data.classes)
    problem = LinearProblem(data.x, data.train, data.y[data.train], data.train_weight, pre, k, opts.device,
                            opts.chunk_rows)
    loss = "softmax" if head == "logreg" else "squared_hinge"
    solver = problem
    if head == "svm" and opts.svm_solver == "newton":
        from .newton import SquaredHingeNewton

        solver = SquaredHingeNewton(problem)
    elif head == "svm" and opts.svm_solver != "lbfgs":
        raise EmbedkitError(f"unknown SVM solver {opts.svm_solver!r}; choose newton or lbfgs")
    yv = data.y[data.val]
    search, best, init = [], None, None
    for c in sorted(opts.c_grid):
        t0 = time.perf_counter()
        if solver is problem:
            w, b, n_iter = problem.fit(float(c), loss, init=init, max_iter=opts.max_iter, tol=opts.tol)
        else:
            w, b, n_iter = solver.fit(float(c), init=init, max_iter=opts.max_iter)
        init = (w, b)  # warm start along the regularisation path
        scores = linear_scores(data.x, pre, w, b, data.val)
        temp = fit_temperature(scores, yv) if head == "svm" else 1.0
        proba = softmax(scores / temp)
        score = val_score(yv, proba) if len(yv) else (0.0, 0.0)
        search.append({"C": float(c), "val_balanced_accuracy": score[0], "val_log_loss": -score[1],
                       "iterations": n_iter, "converged": solver.converged,
                       "seconds": round(time.perf_counter() - t0, 3)})
        if progress:
            progress(f"{head} C={c:g}: val balanced accuracy {score[0]:.3f}")
        if best is None or score > best[0]:
            best = (score, float(c), w, b, temp, proba)
    _, c, w, b, temp, proba = best
    calibration = {"method": "temperature", "temperature": temp, "fitted_on": "validation"} if head == "svm" \
        else {"method": "none"}
    return Probe(head=head, classes=list(data.classes), pre=pre,
                 params={"C": c, "search": search, "penalty": "l2", "loss": loss},
                 arrays={"weight": w.astype(np.float32), "bias": b.astype(np.float32), **_val_arrays(yv, proba)},
                 calibration=calibration, validation=_validation(yv, proba, data.classes))


def _fit_knn(data: FitInput, pre: Preprocessor, opts: HeadOptions, progress) -> Probe:
    from ..neighbors import search

    k_classes = len(data.classes)
    bank = pre.transform(data.x, data.train)
    bank_labels = data.y[data.train].astype(np.int64)
    vote_weight = data.class_vote_weight if data.class_vote_weight is not None else np.ones(k_classes)
    grid = sorted({int(k) for k in opts.k_grid if 1 <= k <= len(bank)}) or [min(len(bank), 1)]
    yv = data.y[data.val]
    sims, nbr = search(bank, pre.transform(data.x, data.val), max(grid))
    search_log, best = [], None
    for k in grid:
        proba = knn_proba(sims, nbr, bank_labels, k, opts.temperature, vote_weight)
        score = val_score(yv, proba) if len(yv) else (0.0, 0.0)
        search_log.append({"k": k, "val_balanced_accuracy": score[0], "val_log_loss": -score[1]})
        if best is None or score > best[0]:
            best = (score, k, proba)
    _, k, proba = best
    if progress:
        progress(f"knn k={k}: val balanced accuracy {best[0][0]:.3f}")
    return Probe(head="knn", classes=list(data.classes), pre=pre,
                 params={"k": k, "temperature": opts.temperature, "metric": "cosine", "search": search_log},
                 arrays={"bank": bank, "bank_labels": bank_labels, "vote_weight": vote_weight.astype(np.float64),
                         **_val_arrays(yv, proba)},
                 validation=_validation(yv, proba, data.classes))


def _validation(y: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> dict:
    """Validation confusion (rows true, columns predicted) kept with the probe for adjusted counts."""
    from ..metrics import confusion

    cm = confusion(y, proba.argmax(1), len(classes)) if len(y) else np.zeros((len(classes), len(classes)))
    return {"n": int(len(y)), "confusion": cm.astype(int).tolist(),
            "balanced_accuracy": balanced_accuracy(y, proba.argmax(1)) if len(y) else None}


def _val_arrays(y: np.ndarray, proba: np.ndarray) -> dict[str, np.ndarray]:
    """Validation probabilities and labels, so an ensemble of probes can build its own confusion matrix."""
    return {"val_proba": proba.astype(np.float32), "val_labels": y.astype(np.int64)}


def class_vote_weights(y_train: np.ndarray, n_classes: int, mode: str) -> np.ndarray:
    """kNN vote weights: 'balanced' class weights when --balance weights, ones otherwise."""
    return class_weights(y_train, n_classes) if mode == "weights" else np.ones(n_classes)
