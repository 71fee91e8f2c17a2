"""The SVM head's solver: primal truncated Newton (Newton-CG) for one-vs-rest squared hinge, every class at once.

It minimises the same objective as the L-BFGS path of :class:`~embedkit.probe.heads.LinearProblem` (LinearSVC's
``sum_i w_i max(0, 1 - t_ik z_ik)^2 / S + |W_k|^2 / (2 C S)`` per class, unpenalised intercept), over the same
device chunks with the preprocessing folded into the weights, as LIBLINEAR's trust-region Newton does
(Keerthi and DeCoste, 2005; Lin, Weng and Keerthi, 2008):

* the squared hinge is piecewise quadratic, so its generalised Hessian is ``2/S X_A^T diag(w) X_A + I/(C S)`` over the
  rows with a positive margin ``A``; conjugate gradients solve each Newton system with Hessian-vector products
  (two passes over the rows each, all K classes in the same matrix products);
* each class stops on its own when its gradient norm falls below ``tol`` times its norm at W = 0 (a relative test
  that means the same at every C), and the step length comes from a backtracking search on cached margins;
* along a C grid each fit starts from the previous solution, so later values of C take a few Newton steps.
"""

from __future__ import annotations

import torch

#: Relative gradient norm at which a class has converged (LIBLINEAR's primal solvers default to 1e-2; see bench_probe.py).
NEWTON_TOL = 1e-3
MAX_CG = 200  # conjugate-gradient steps per Newton step


class SquaredHingeNewton:
    """Newton-CG for the one-vs-rest squared hinge over a :class:`~embedkit.probe.heads.LinearProblem`'s chunks."""

    def __init__(self, problem):
        self.p = problem
        k = problem.n_classes
        s = problem.total_weight
        self.targets, self.weights = [], []
        for _, yb, wb in problem.chunks:
            t = -torch.ones((len(yb), k), device=problem.device)
            t.scatter_(1, yb[:, None], 1.0)
            self.targets.append(t)
            self.weights.append((wb / s)[:, None])
        g0_w, g0_b = self._back([-2.0 * w * t for t, w in zip(self.targets, self.weights)])
        self.g0 = torch.sqrt((g0_w * g0_w).sum(1) + g0_b * g0_b).clamp_min(1e-30)
        self.converged = False

    # the linear map z = X_s W^T + b and its transpose, with X_s = features @ A + shift never formed
    def _forward(self, w: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
        w_eff = self.p.a @ w.T
        b_eff = self.p.shift @ w.T + b
        return [self.p._features(xb) @ w_eff + b_eff for xb, _, _ in self.p.chunks]

    def _back(self, grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        k, d = self.p.n_classes, self.p.a.shape[0]
        acc = torch.zeros((k, d), device=self.p.device)
        gb = torch.zeros(k, device=self.p.device)
        for (xb, _, _), g in zip(self.p.chunks, grads):
            acc.addmm_(g.T, self.p._features(xb))
            gb += g.sum(0)
        return acc @ self.p.a + gb[:, None] * self.p.shift[None, :], gb

    def fit(self, c: float, init: tuple | None = None, max_iter: int = 50, tol: float = NEWTON_TOL):
        """Minimise for one C, from ``init`` (W, b) or zero; returns W [K, D'], b [K] (NumPy) and Newton steps."""
        p = self.p
        k, dim = p.n_classes, p.a.shape[1]
        if init is None:
            w, b = torch.zeros((k, dim), device=p.device), torch.zeros(k, device=p.device)
        else:
            w = torch.as_tensor(init[0], dtype=torch.float32).to(p.device).clone()
            b = torch.as_tensor(init[1], dtype=torch.float32).to(p.device).clone()
        reg = 1.0 / (c * p.total_weight)
        z = self._forward(w, b)
        self.converged = False
        n_iter = 0
        for n_iter in range(max_iter + 1):
            margins = [1.0 - t * zc for t, zc in zip(self.targets, z)]
            active = [(m > 0).float() * wt for m, wt in zip(margins, self.weights)]  # w_i / S on rows with a margin
            gw, gb = self._back([-2.0 * t * m * a for t, m, a in zip(self.targets, margins, active)])
            gw += reg * w
            gnorm = torch.sqrt((gw * gw).sum(1) + gb * gb)
            todo = gnorm > tol * self.g0
            if not todo.any():
                self.converged = True
                break
            if n_iter == max_iter:
                break
            dw, db = self._newton_direction(gw, gb, active, reg, gnorm, todo)
            dz = self._forward(dw, db)
            step = self._line_search(w, dw, dz, margins, reg, (gw * dw).sum(1) + gb * db)
            w += step[:, None] * dw
            b += step * db
            z = [zc + dzc * step for zc, dzc in zip(z, dz)]
        return w.cpu().numpy(), b.cpu().numpy(), n_iter

    def _hess(self, vw: torch.Tensor, vb: torch.Tensor, active: list[torch.Tensor], reg: float):
        q = self._forward(vw, vb)
        hw, hb = self._back([2.0 * a * qc for a, qc in zip(active, q)])
        return hw + reg * vw, hb

    def _newton_direction(self, gw, gb, active, reg, gnorm, todo):
        """Conjugate gradients on H d = -g per class (inexact: stop at a residual of min(0.5, sqrt(|g|/|g0|)) |g|)."""
        xw, xb = torch.zeros_like(gw), torch.zeros_like(gb)
        rw, rb = -gw * todo[:, None], -gb * todo
        pw, pb = rw.clone(), rb.clone()
        rz = (rw * rw).sum(1) + rb * rb
        target = (torch.clamp(torch.sqrt(gnorm / self.g0), max=0.5) * gnorm) ** 2
        live = todo & ((rw * rw).sum(1) + rb * rb > target)
        for _ in range(MAX_CG):
            if not live.any():
                break
            hw, hb = self._hess(pw, pb, active, reg)
            php = (pw * hw).sum(1) + pb * hb
            alpha = torch.where(live & (php > 0), rz / php.clamp_min(1e-30), torch.zeros_like(rz))
            xw += alpha[:, None] * pw
            xb += alpha * pb
            rw -= alpha[:, None] * hw
            rb -= alpha * hb
            live = live & (php > 0) & ((rw * rw).sum(1) + rb * rb > target)
            rz_new = (rw * rw).sum(1) + rb * rb
            beta = torch.where(live, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
            pw = rw + beta[:, None] * pw
            pb = rb + beta * pb
            rz = rz_new
        return xw, xb

    def _line_search(self, w, dw, dz, margins, reg, slope, shrink: float = 0.5, tries: int = 30):
        """Per-class step s with the Armijo condition, on the cached margins and score changes ``dz`` (no pass over
        the features)."""
        u = [t * d for t, d in zip(self.targets, dz)]

        def objective(s: torch.Tensor) -> torch.Tensor:
            loss = sum((wt * torch.clamp(m - s * uc, min=0.0) ** 2).sum(0) for m, uc, wt in zip(margins, u, self.weights))
            ws = w + s[:, None] * dw
            return loss + 0.5 * reg * (ws * ws).sum(1)

        f0 = objective(torch.zeros_like(slope))
        step = torch.ones_like(slope)
        ok = torch.zeros_like(slope, dtype=torch.bool)
        for _ in range(tries):
            ok = ok | (objective(step) <= f0 + 1e-4 * step * slope)
            if ok.all():
                break
            step = torch.where(ok, step, step * shrink)
        return torch.where(ok, step, torch.zeros_like(step))
