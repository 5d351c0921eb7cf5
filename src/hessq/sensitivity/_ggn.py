"""Hessian-block traces of layers the output is linear in, by plain backward passes (no double back-prop).

For such a layer (see :mod:`._linearity`) the block of the loss Hessian is its Gauss-Newton block,
H_ll = Σ_n J_nᵀ H_n J_n, with J_n = ∂f_n/∂W_l and H_n the Hessian of the loss with respect to
sample n's output f_n. Writing H_n = Σ_c λ_{n,c} q_{n,c} q_{n,c}ᵀ (its eigen-decomposition),

    Tr(H_ll) = Σ_n Σ_c λ_{n,c} ‖J_nᵀ q_{n,c}‖²,

and J_nᵀ u is sample n's weight gradient when u is fed back at the output: a backward pass with
output gradient U (one direction per sample) gives every layer's δ = ∂(U·f)/∂y_l at once, and the
per-sample weight gradient is δ_n ⊗ a_n (a_n the layer's input). No cross-layer term appears.

* exact: one backward pass per eigen-direction c (K of them for K outputs; softmax
  cross-entropy has a zero eigenvalue, so 9 for 10 classes);
* sampled: one backward per draw with u_n = Q_n |Λ_n|^½ ε_n (Rademacher ε_n), for which
  E[u_n u_nᵀ] = Q_n |Λ_n| Q_nᵀ; negative eigenvalues (a non-convex loss) get their own direction,
  subtracted, so the estimate stays unbiased.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hessq._utils import move_to
from hessq.sensitivity._hvp import batch_size, rademacher, run_model, sub_generator

#: Outputs per sample up to which the output Hessian is decomposed (K×K eigh per sample).
MAX_OUTPUTS = 256
#: Output gradients of several directions are stacked up to this many elements per layer, so that the
#: per-sample gradients of all of them come from one batched product (a small layer's alone is inefficient).
STACK_ELEMENTS = 1 << 24


class OutputHessian:
    """The per-sample Hessians H_n of ``loss_fn(f, targets)`` w.r.t. the output f, eigen-decomposed.

    ``separable`` is False when the loss couples samples (its Hessian w.r.t. f is not block
    diagonal per sample), and the Gauss-Newton route does not apply.
    """

    def __init__(self, f: torch.Tensor, targets: Any, loss_fn: Callable) -> None:
        n = int(f.shape[0])
        leaf = f.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(loss_fn(leaf, targets), leaf, create_graph=True)
        k = leaf[0].numel()
        cols = []
        for c in range(k):
            e = torch.zeros(n, k, dtype=f.dtype, device=f.device)
            e[:, c] = 1
            cols.append(self._hvp(g, leaf, e.reshape(f.shape)).reshape(n, k))
        h = torch.stack(cols, dim=2).double()  # h[n, :, c] = H_n e_c, if separable
        h = (h + h.transpose(1, 2)) / 2
        # Separable iff H r = blockdiag(H_n) r for a random r (one more product on the loss alone).
        r = rademacher(torch.Size((n, k)), torch.Generator().manual_seed(0), leaf)
        hr = self._hvp(g, leaf, r.reshape(f.shape)).reshape(n, k).double()
        want = torch.einsum("nij,nj->ni", h, r.double())
        scale = float(want.abs().max()) + float(hr.abs().max())
        self.separable = bool((hr - want).abs().max() <= 1e-4 * max(scale, 1e-30) + 1e-30) if scale > 0 else True
        self.lam, self.q = torch.linalg.eigh(h)  # (n, k), (n, k, k): H_n = Q diag(λ) Qᵀ
        self.shape, self.dtype = f.shape, f.dtype

    @staticmethod
    def _hvp(g: torch.Tensor, leaf: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not g.requires_grad:  # the loss is linear in the output
            return torch.zeros_like(leaf)
        (hv,) = torch.autograd.grad(g, leaf, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(leaf) if hv is None else hv

    def exact_directions(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(U, sign) per eigen-direction that is non-zero for some sample: U_n = √|λ_{n,c}| q_{n,c}."""
        tiny = 10 * torch.finfo(self.dtype).eps * self.lam.shape[1] * float(self.lam.abs().max().clamp_min(1e-300))
        out = []
        for c in range(self.lam.shape[1]):
            lam = self.lam[:, c]
            if float(lam.abs().max()) <= tiny:
                continue  # e.g. softmax cross-entropy's direction (1, ..., 1)
            u = self.q[:, :, c] * lam.abs().sqrt()[:, None]
            out.append((u.reshape(self.shape), torch.sign(lam)))
        return out

    def sampled_directions(self, generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One Rademacher draw: U = Q|Λ₊|^½ε with sign +1, and Q|Λ₋|^½ε with sign −1 when some λ < 0."""
        eps = rademacher(self.lam.shape, generator, self.lam)
        out = []
        for sign, part in ((1.0, self.lam.clamp_min(0)), (-1.0, (-self.lam).clamp_min(0))):
            if float(part.max()) > 0:
                u = torch.einsum("nkc,nc->nk", self.q, part.sqrt() * eps)
                out.append((u.reshape(self.shape), torch.full_like(self.lam[:, 0], sign)))
        return out


def _padded(m: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """The conv's input with its padding applied, as the conv sees it."""
    if m.padding_mode != "zeros":
        return F.pad(a, m._reversed_padding_repeated_twice, mode=m.padding_mode)
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return a
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]  # "same": the odd extra goes right/bottom
        return F.pad(a, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
    return F.pad(a, (m.padding[1], m.padding[1], m.padding[0], m.padding[0]))


def per_sample_sq_norms(m: nn.Module, a: torch.Tensor, deltas: torch.Tensor, cache: dict, reuse: int = 1) -> torch.Tensor:
    """‖∂(u_n·f_n)/∂W‖² per sample n and direction d: (D, N) from the layer's input ``a`` and
    ``deltas`` (D, N, *output shape), the gradients at its output for D directions. ``cache`` keeps
    what depends on ``a`` alone for the next call, ``reuse`` says for how many directions in all."""
    d, n = deltas.shape[0], deltas.shape[1]
    if isinstance(m, nn.Linear):
        if a.dim() == 2:  # the gradient is the outer product δ_n a_nᵀ: ‖δ_n‖²‖a_n‖²
            return deltas.pow(2).sum(-1) * a.pow(2).sum(-1)
        x = a.reshape(n, -1, a.shape[-1])  # tokens: Σ_t δ_t a_tᵀ
        dl = deltas.reshape(d, n, -1, deltas.shape[-1])
        g = torch.einsum("dnto,nti->dnoi", dl, x)
        return g.pow(2).sum((-1, -2))
    x = cache.get("patches")
    if x is None:  # (N, C·kh·kw, P), in the order of the flattened weight
        x = cache["patches"] = F.unfold(_padded(m, a), m.kernel_size, dilation=m.dilation, stride=m.stride)
    p, groups = x.shape[-1], m.groups
    dl = deltas.reshape(d, n, groups, -1, p)  # (D, N, G, O/G, P)
    o, i = dl.shape[3], x.shape[1] // groups
    if groups == 1 and p * p * (o + i / (d * reuse)) < p * o * i and n * p * p <= 1 << 24:
        # Gram form ‖Σ_p δ_p a_pᵀ‖² = Σ_{p,q} (δ_p·δ_q)(a_p·a_q): cheaper when P² < O·I (late layers)
        ga = cache.get("gram")
        if ga is None:
            ga = cache["gram"] = torch.bmm(x.transpose(1, 2), x)  # (N, P, P)
        dd = dl[:, :, 0]  # (D, N, O, P)
        return (torch.matmul(dd.transpose(-1, -2), dd) * ga).sum((-1, -2))
    # the per-sample gradients themselves, one batched product: (D, N, G, O/G, C/G·kh·kw)
    g = torch.einsum("dngop,ngip->dngoi", dl, x.reshape(n, groups, -1, p))
    return g.pow(2).sum((-1, -2, -3))


def ggn_supported(m: nn.Module) -> bool:
    """Plain Conv2d/Linear modules, whose weight gradient is δ ⊗ input (no parametrisation, no subclass)."""
    return type(m) in (nn.Conv2d, nn.Linear) and not hasattr(m, "parametrizations")


class GGNTraces:
    """Per-layer Gauss-Newton traces of ``modules`` over one rank's batches (float64, summed, not averaged).

    With ``cache`` each batch's forward graph and output Hessian are kept between draws (one batch:
    what the HVP engine does too); :meth:`keep` hands in a forward already run.
    """

    def __init__(self, model: nn.Module, modules: Sequence[nn.Module], loss_fn: Callable, device: torch.device,
                 check_loss: Callable[[Any, int], None], cache: bool = False) -> None:
        self.model, self.modules, self.loss_fn, self.device = model, list(modules), loss_fn, device
        self.check_loss = check_loss  # the HVP engine's checks: a scalar, finite loss that depends on the model
        self.cache, self._kept = cache, {}
        self.backward_passes = 0

    def forward(self, inputs: Any, modules: Sequence[nn.Module] | None = None):
        """The model output and each module's input (detached) and output (in the graph)."""
        modules = self.modules if modules is None else modules
        acts: list[Any] = [None] * len(modules)
        outs: list[Any] = [None] * len(modules)

        def hook(i):
            def fn(module, args, output):
                acts[i], outs[i] = args[0].detach(), output
                return output.clone()  # what follows may work in place (ReLU(inplace=True)): keep this one intact
            return fn

        handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
        try:
            with torch.enable_grad():
                f = run_model(self.model, inputs)
        finally:
            for h in handles:
                h.remove()
        return f, acts, outs

    def keep(self, index: int, f: torch.Tensor, acts: list, outs: list) -> None:
        """Use this forward of batch ``index`` (its loss already checked) instead of running one."""
        self._kept[index] = (f, acts, outs, None)

    def batch(self, index: int, batch: tuple[Any, Any], directions: Callable[[OutputHessian], list]) -> torch.Tensor:
        """Σ over the batch's samples and the given directions of sign·‖J_nᵀ u_n‖², times the batch size, per layer."""
        targets = move_to(batch[1], self.device)
        kept = self._kept.get(index) if self.cache else self._kept.pop(index, None)
        if kept is None:
            f, acts, outs = self.forward(move_to(batch[0], self.device))
            with torch.enable_grad():
                self.check_loss(self.loss_fn(f, targets), index)
            hout = None
        else:
            f, acts, outs, hout = kept
        hout = hout or OutputHessian(f, targets, self.loss_fn)
        if self.cache:
            self._kept[index] = (f, acts, outs, hout)
        weight = float(batch_size(batch[0]))
        total = torch.zeros(len(self.modules), dtype=torch.float64, device=self.device)
        caches: list[dict] = [{} for _ in self.modules]
        pending: list[list] = [[] for _ in self.modules]  # (δ, sign) per layer, stacked into one product
        dirs = directions(hout)

        def flush(i: int) -> None:
            sq = per_sample_sq_norms(self.modules[i], acts[i], torch.stack([dl for dl, _ in pending[i]]), caches[i], len(dirs))
            total[i] += weight * (sq.double() * torch.stack([s for _, s in pending[i]]).double()).sum()
            pending[i].clear()

        for k, (u, sign) in enumerate(dirs):
            deltas = torch.autograd.grad(f, outs, u.to(f.dtype), retain_graph=self.cache or k < len(dirs) - 1, allow_unused=True)
            self.backward_passes += 1
            for i, dl in enumerate(deltas):
                if dl is not None:
                    pending[i].append((dl, sign))
                    if len(pending[i]) * dl.numel() >= STACK_ELEMENTS:
                        flush(i)
        for i in range(len(self.modules)):
            if pending[i]:
                flush(i)
        return total


def separable_output(f: Any, targets: Any, loss_fn: Callable) -> str | None:
    """None when the Gauss-Newton route applies to the model output ``f`` and the loss; else why not."""
    if not isinstance(f, torch.Tensor) or f.dim() < 1 or not f.is_floating_point():
        return f"the model returns {type(f).__name__}, not one tensor of outputs"
    if f[0].numel() > MAX_OUTPUTS:
        return f"{f[0].numel()} outputs per sample (more than {MAX_OUTPUTS})"
    if not OutputHessian(f, targets, loss_fn).separable:
        return "the loss couples the samples (its Hessian in the outputs is not block diagonal per sample)"
    return None


def draw_generator(seed: int, draw: int, batch_index: int) -> torch.Generator:
    """The same draw for a batch on whichever rank holds it."""
    return sub_generator(seed, 0x6619, draw, batch_index)
