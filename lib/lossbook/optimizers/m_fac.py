r"""M-FAC: matrix-free inverse-Fisher-vector products from a window of gradients {cite}`frantar2021mfac`.

The curvature is the damped empirical Fisher of :math:`m` gradients :math:`g_1, \dots, g_m \in \mathbb R^d`
(the rows of :math:`G \in \mathbb R^{m \times d}`),

.. math::
    \hat F = \lambda I_d + \frac1m \sum_{i=1}^m g_i g_i^\top = \lambda I_d + \frac1m G^\top G ,

and everything here multiplies vectors by :math:`\hat F^{-1}` without ever forming a
:math:`d \times d` matrix. Adding the :math:`g_i` one at a time (Sherman–Morrison),

.. math::
    \hat F_0^{-1} = \lambda^{-1} I, \qquad
    \hat F_i^{-1} = \hat F_{i-1}^{-1} - \frac{v_i v_i^\top}{m + g_i^\top v_i}, \qquad v_i = \hat F_{i-1}^{-1} g_i ,

so :math:`\hat F^{-1} x = \lambda^{-1} x - \sum_i v_i (v_i^\top x) / (m + g_i^\top v_i)`.

- :class:`StaticIHVP` (the paper's static algorithm, for pruning): stores the :math:`v_i` themselves,
  :math:`O(dm^2)` to build, :math:`O(dm)` per product, :math:`O(m)` per diagonal entry.
- :class:`SlidingWindowIHVP` (the dynamic algorithm, for optimization): stores :math:`G`, the
  :math:`m \times m` Gram matrix :math:`GG^\top` and coefficients :math:`B` with :math:`v_i = \sum_j B_{ij} g_j`;
  :math:`O(dm + m^2)` per product and :math:`O(dm + m^3)` to replace the oldest gradient.
- :class:`MFAC`: the optimizer :math:`\theta \leftarrow \theta - \eta\, \hat F^{-1} \nabla L(\theta)`
  over a sliding window of the last :math:`m` gradients.
- :func:`empirical_fisher`: the dense :math:`\hat F` (for checks at small :math:`d` only).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Iterable

import torch

__all__ = ["MFAC", "SlidingWindowIHVP", "StaticIHVP", "empirical_fisher", "paper_coefficients"]


def _check_damp(damp: float) -> float:
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not (math.isfinite(damp) and damp > 0):
        raise ValueError(f"damp must be a finite number > 0, got {damp!r}")
    return float(damp)


def _check_grads(grads: torch.Tensor) -> torch.Tensor:
    if not isinstance(grads, torch.Tensor) or grads.dim() != 2 or grads.shape[0] < 1 or grads.shape[1] < 1:
        raise ValueError(f"grads must be a 2-d tensor of shape (m, d) with m, d >= 1, got "
                         f"{tuple(grads.shape) if isinstance(grads, torch.Tensor) else type(grads).__name__}")
    if not grads.is_floating_point():
        raise ValueError(f"grads must be floating point, got dtype {grads.dtype}")
    return grads


def _check_vec(x: torch.Tensor, d: int, name: str = "x") -> None:
    if x.dim() < 1 or x.shape[-1] != d:
        raise ValueError(f"{name} must have shape (..., {d}), got {tuple(x.shape)}")


def empirical_fisher(grads: torch.Tensor, damp: float) -> torch.Tensor:
    r"""The dense damped empirical Fisher :math:`\lambda I + \frac1m G^\top G`, shape ``(d, d)``.

    A reference for small :math:`d`: it costs :math:`O(d^2)` memory, which is what M-FAC avoids.

    Args:
        grads: :math:`G`, shape ``(m, d)``, one gradient per row.
        damp: :math:`\lambda > 0`.
    """
    g = _check_grads(grads)
    lam = _check_damp(damp)
    m, d = g.shape
    return lam * torch.eye(d, dtype=g.dtype, device=g.device) + g.T @ g / m


class StaticIHVP:
    r"""The static M-FAC algorithm: :math:`\hat F^{-1}` of a fixed set of :math:`m` gradients.

    Builds :math:`v_i = \hat F_{i-1}^{-1} g_i` by the recursion

    .. math::
        v_i = \lambda^{-1} g_i - \sum_{j < i} \frac{v_j^\top g_i}{m + g_j^\top v_j}\, v_j ,

    in :math:`O(dm^2)` time and :math:`O(dm)` memory (``m`` rows of length ``d``), then answers

    .. math::
        \hat F^{-1} x = \lambda^{-1} x - \sum_{i=1}^m \frac{v_i^\top x}{m + g_i^\top v_i}\, v_i
        \quad (O(dm)), \qquad
        [\hat F^{-1}]_{qq} = \lambda^{-1} - \sum_{i=1}^m \frac{v_{iq}^2}{m + g_i^\top v_i}
        \quad (O(m)).

    Args:
        grads: :math:`G`, shape ``(m, d)``; not modified. Computation happens in its dtype and on its device.
        damp: :math:`\lambda > 0` (the official code's default is ``1e-5``).

    Example::

        >>> G = torch.randn(8, 100, dtype=torch.float64)
        >>> h = StaticIHVP(G, damp=0.1)
        >>> x = torch.randn(100, dtype=torch.float64)
        >>> torch.allclose(h.mul(x), torch.linalg.solve(empirical_fisher(G, 0.1), x))
        True
    """

    def __init__(self, grads: torch.Tensor, damp: float = 1e-5) -> None:
        g = _check_grads(grads)
        self.damp = _check_damp(damp)
        self.m, self.d = g.shape
        inv_lam = 1.0 / self.damp
        v = torch.empty_like(g)
        denom = torch.empty(self.m, dtype=g.dtype, device=g.device)
        for i in range(self.m):
            gi = g[i]
            vi = inv_lam * gi
            if i:
                coef = (v[:i] @ gi) / denom[:i]                  # (v_j . g_i) / (m + g_j . v_j), j < i
                vi = vi - coef @ v[:i]
            v[i] = vi
            denom[i] = self.m + gi @ vi
        self.v, self.denom = v, denom

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\hat F^{-1} x` for ``x`` of shape ``(..., d)`` (each row on its own), in :math:`O(dm)` per row."""
        _check_vec(x, self.d)
        return x / self.damp - ((x @ self.v.T) / self.denom) @ self.v

    def diag(self, index: torch.Tensor | None = None) -> torch.Tensor:
        r"""Diagonal entries :math:`[\hat F^{-1}]_{qq}`: all ``d`` of them, or those at ``index`` (:math:`O(m)` each)."""
        v = self.v if index is None else self.v[:, index]
        return 1.0 / self.damp - (v.square() / self.denom.unsqueeze(1)).sum(0)


def _factor_dtype(t: torch.Tensor) -> torch.dtype:
    # the m x m coefficient algebra runs in float64 where the device has it: it is O(m^3), independent of d
    return torch.float32 if t.device.type == "mps" else torch.float64


def _coefficients(dots: torch.Tensor, damp: float, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The dynamic algorithm's coefficients from the Gram matrix :math:`GG^\top`.

    :math:`K = mI + \lambda^{-1} GG^\top = L\,\mathrm{diag}(c)\,L^\top` with :math:`L` unit lower
    triangular; then :math:`c_i = m + g_i^\top v_i` and :math:`B = \lambda^{-1} L^{-1}`
    (so :math:`v_i = \sum_j B_{ij} g_j`). The paper's Gaussian-elimination recursion for
    :math:`D_{ij} = g_i^\top \hat F_{i-1}^{-1} g_j` computes the same factorization: :math:`D + mI` is
    its upper factor :math:`\mathrm{diag}(c) L^\top`. Returns ``(B, c)`` in the dtype of ``dots``.
    """
    work = _factor_dtype(dots)
    k = dots.to(work) / damp
    k.diagonal().add_(m)
    chol = torch.linalg.cholesky_ex(k)[0]                     # K = C C^T; K >= m I, so it never fails
    cdiag = chol.diagonal()
    unit_lower = chol / cdiag                                  # L = C diag(C)^-1
    eye = torch.eye(m, dtype=work, device=dots.device)
    b = torch.linalg.solve_triangular(unit_lower, eye / damp, upper=False, unitriangular=True)
    return b.to(dots.dtype), cdiag.square().to(dots.dtype)


def paper_coefficients(grads: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The dynamic algorithm's matrices computed literally by the paper's recursions, in :math:`O(m^3)` after :math:`GG^\top`.

    With :math:`D_{ij} = g_i^\top \hat F_{i-1}^{-1} g_j` (:math:`i \le j`), the Sherman–Morrison step gives

    .. math::
        D_{ij} = \lambda^{-1} g_i^\top g_j - \sum_{k < i} \frac{D_{ki} D_{kj}}{m + D_{kk}}, \qquad
        B_{i\cdot} = \lambda^{-1} e_i - \sum_{k < i} \frac{D_{ki}}{m + D_{kk}} B_{k\cdot} ,

    with :math:`v_i = \sum_j B_{ij} g_j`. Plain loops: for tests and for reading; the library uses
    the equivalent factorization of :func:`_coefficients`.

    Returns:
        ``(D, B, denom)``: ``D`` upper triangular ``(m, m)``, ``B`` lower triangular ``(m, m)``,
        ``denom`` :math:`= m + \operatorname{diag} D`, shape ``(m,)``.
    """
    g = _check_grads(grads)
    lam = _check_damp(damp)
    m = g.shape[0]
    dots = g @ g.T
    D = torch.zeros(m, m, dtype=g.dtype, device=g.device)
    B = torch.zeros(m, m, dtype=g.dtype, device=g.device)
    for i in range(m):
        for j in range(i, m):
            D[i, j] = dots[i, j] / lam - sum(D[k, i] * D[k, j] / (m + D[k, k]) for k in range(i))
        B[i, i] = 1.0 / lam
        for k in range(i):
            B[i] -= D[k, i] / (m + D[k, k]) * B[k]
    return D, B, m + D.diagonal()


class SlidingWindowIHVP:
    r"""The dynamic M-FAC algorithm: :math:`\hat F^{-1}` over a sliding window of the last :math:`m` gradients.

    Keeps a ring buffer :math:`G \in \mathbb R^{m \times d}` (initially zero: rows not yet filled
    contribute nothing, while the :math:`\frac1m` normalisation uses the full :math:`m`, as in the
    official code), the Gram matrix :math:`GG^\top`, and coefficients :math:`B` (lower triangular)
    and :math:`c` with :math:`v_i = \hat F_{i-1}^{-1} g_i = \sum_j B_{ij} g_j`, :math:`c_i = m + g_i^\top v_i`. Then

    .. math::
        \hat F^{-1} x = \lambda^{-1} x - G^\top B^\top \Big( \frac{B\, G x}{c} \Big)
        \qquad (O(dm + m^2)),

    and replacing the oldest gradient costs one new row and column of :math:`GG^\top`
    (:math:`O(dm)`) and a refactorization of an :math:`m \times m` matrix (:math:`O(m^3)`).
    The ordering of the window does not matter: :math:`\hat F` is a sum.

    Args:
        d: dimension.
        m: window size (number of gradients).
        damp: :math:`\lambda > 0`.
        dtype, device: of the buffer :math:`G` (the :math:`m \times m` factorization runs in float64).

    Example::

        >>> h = SlidingWindowIHVP(d=100, m=4, damp=0.1, dtype=torch.float64)
        >>> for g in torch.randn(10, 100, dtype=torch.float64):
        ...     step = h.update_mul(g)        # add g (dropping the oldest) and return F^-1 g
    """

    def __init__(self, d: int, m: int, damp: float = 1e-5, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device | None = None) -> None:
        for name, v in (("d", d), ("m", m)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.d, self.m, self.damp = d, m, _check_damp(damp)
        self.grads = torch.zeros(m, d, dtype=dtype, device=device)
        self.dots = torch.zeros(m, m, dtype=dtype, device=device)
        self.last = 0            # ring-buffer index of the slot to overwrite next
        self.coef, self.denom = _coefficients(self.dots, self.damp, m)

    @classmethod
    def from_grads(cls, grads: torch.Tensor, damp: float = 1e-5) -> "SlidingWindowIHVP":
        """A full window holding the rows of ``grads`` (shape ``(m, d)``), in order."""
        g = _check_grads(grads)
        h = cls(g.shape[1], g.shape[0], damp, dtype=g.dtype, device=g.device)
        h.grads.copy_(g)
        h.dots = g @ g.T
        h.coef, h.denom = _coefficients(h.dots, h.damp, h.m)
        return h

    def _insert(self, g: torch.Tensor) -> torch.Tensor:
        if g.shape != (self.d,):
            raise ValueError(f"g must have shape ({self.d},), got {tuple(g.shape)}")
        g = g.to(self.grads.dtype)
        self.grads[self.last] = g
        row = self.grads @ g                                   # G g: the new row and column of G G^T, O(dm)
        self.dots[self.last] = row
        self.dots[:, self.last] = row
        self.coef, self.denom = _coefficients(self.dots, self.damp, self.m)   # O(m^3)
        self.last = (self.last + 1) % self.m
        return row

    def update(self, g: torch.Tensor) -> None:
        """Replace the oldest gradient in the window by ``g`` (shape ``(d,)``): :math:`O(dm + m^3)`."""
        self._insert(g)

    def mul(self, x: torch.Tensor, gx: torch.Tensor | None = None) -> torch.Tensor:
        r""":math:`\hat F^{-1} x` for ``x`` of shape ``(..., d)``; ``gx`` = :math:`G x` if already known."""
        _check_vec(x, self.d)
        x = x.to(self.grads.dtype)
        gx = x @ self.grads.T if gx is None else gx            # (..., m): O(dm)
        p = gx @ self.coef.T                                   # v_i . x = (B G x)_i: O(m^2)
        w = (p / self.denom) @ self.coef                       # B^T (p / c): O(m^2)
        return x / self.damp - w @ self.grads                  # O(dm)

    def update_mul(self, g: torch.Tensor) -> torch.Tensor:
        r"""Add ``g`` to the window, then return :math:`\hat F^{-1} g` (reusing :math:`G g`)."""
        row = self._insert(g)
        return self.mul(g, row)


class MFAC(torch.optim.Optimizer):
    r"""The M-FAC optimizer {cite}`frantar2021mfac`: preconditioned SGD with the dynamic algorithm.

    At each step, with :math:`g_t` the gradient of all parameters (concatenated, plus
    ``weight_decay`` :math:`\cdot\, \theta` where set), the window of the last :math:`m` gradients gives
    :math:`\hat F_t = \lambda I + \frac1m \sum_{s=t-m+1}^{t} g_s g_s^\top` and

    .. math::
        u_t = \hat F_t^{-1} g_t, \qquad
        b_t = \beta\, b_{t-1} + (1 - \beta)\, u_t \ (\text{if } \beta > 0), \qquad
        \theta_{t+1} = \theta_t - \eta\, b_t .

    The gradient enters the window before it is preconditioned, as in the official code, so
    :math:`u_t` always lies in the span of the window.

    Args:
        params: parameters or parameter groups. ``lr``, ``momentum`` and ``weight_decay`` may
            differ between groups; ``ngrads`` and ``damp`` describe the one preconditioner shared by
            all parameters and must be the same in every group.
        lr: :math:`\eta` (official default ``1e-3``).
        ngrads: :math:`m`, the window size (official default 1024; memory :math:`m \times d`).
        damp: :math:`\lambda` (official default ``1e-5``).
        momentum: :math:`\beta`, an exponential moving average of the preconditioned steps
            (the official code's form, with the :math:`1 - \beta` factor).
        weight_decay: added to the gradient before preconditioning (L2, as in the official code).

    State: each parameter keeps its slice ``grads`` (shape ``(m, numel)``) of the window (and a
    ``momentum_buffer``); the first parameter also keeps the shared ``dots`` (:math:`GG^\top`),
    ``coef``, ``denom`` and ``step``. All of it round-trips through ``state_dict``. A parameter
    whose ``.grad`` is ``None`` counts as a zero gradient and is not moved. The step never waits on
    the host (no ``.item()``), and works on any device.

    Example::

        >>> model = torch.nn.Linear(10, 2)
        >>> opt = MFAC(model.parameters(), lr=1e-3, ngrads=32, damp=1e-4)
        >>> model(torch.randn(4, 10)).square().mean().backward(); opt.step()
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, ngrads: int = 1024, damp: float = 1e-5,
                 momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        if not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
        if isinstance(ngrads, bool) or not isinstance(ngrads, int) or ngrads < 1:
            raise ValueError(f"ngrads must be a positive integer, got {ngrads!r}")
        _check_damp(damp)
        if not (isinstance(momentum, numbers.Real) and 0.0 <= momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not (isinstance(weight_decay, numbers.Real) and math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        super().__init__(params, dict(lr=lr, ngrads=ngrads, damp=damp, momentum=momentum, weight_decay=weight_decay))
        first = self.param_groups[0]
        for group in self.param_groups:
            if group["ngrads"] != first["ngrads"] or group["damp"] != first["damp"]:
                raise ValueError("ngrads and damp must be the same in every parameter group "
                                 "(one preconditioner is shared by all parameters)")
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError("MFAC does not support complex parameters")
        if not self._params():
            raise ValueError("MFAC got no parameters")

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One M-FAC step; ``closure`` (optional) re-evaluates the loss with gradients enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params()
        m, damp = self.param_groups[0]["ngrads"], self.param_groups[0]["damp"]
        shared = self.state[params[0]]
        if "step" not in shared:
            ref = params[0]
            shared["step"] = 0
            shared["dots"] = torch.zeros(m, m, dtype=ref.dtype, device=ref.device)
        slot = shared["step"] % m                               # ring-buffer slot (a Python int: no sync)

        # 1. the new gradient enters every parameter's slice of the window; G g accumulates
        row = None
        flat_grads = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if "grads" not in state:
                    state["grads"] = torch.zeros(m, p.numel(), dtype=p.dtype, device=p.device)
                if p.grad is None:
                    g = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                else:
                    if p.grad.is_sparse:
                        raise RuntimeError("MFAC does not support sparse gradients")
                    g = p.grad.reshape(-1)
                    if group["weight_decay"]:
                        g = g + group["weight_decay"] * p.reshape(-1)
                state["grads"][slot] = g
                contrib = state["grads"] @ g
                row = contrib if row is None else row + contrib.to(row.device)
                flat_grads.append(g)

        # 2. refresh G G^T and the coefficients: O(m^3), independent of d
        dots = shared["dots"]
        row = row.to(dots.device, dots.dtype)
        dots[slot] = row
        dots[:, slot] = row
        coef, denom = _coefficients(dots, damp, m)
        shared["coef"], shared["denom"] = coef, denom
        w = ((row @ coef.T) / denom) @ coef                     # B^T (B G g / c), shape (m,)

        # 3. u = g / lambda - G^T w, slice by slice; momentum and the step
        i = 0
        for group in self.param_groups:
            beta = group["momentum"]
            for p in group["params"]:
                state = self.state[p]
                g = flat_grads[i]
                i += 1
                if p.grad is None:
                    continue
                u = g / damp - w.to(p.device, p.dtype) @ state["grads"]
                if beta > 0:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.zeros_like(u)
                    buf.mul_(beta).add_(u, alpha=1 - beta)
                    u = buf
                p.add_(u.view_as(p), alpha=-group["lr"])
        shared["step"] += 1
        return loss
