"""Hessian-vector products by double back-propagation, averaged over batches and ranks.

``HessianOperator`` holds a model, the batches this rank owns and a list of parameter
tensors (the analysed layers' weights). ``products(v)`` draws nothing itself: given one
vector per parameter it returns, for every parameter at once, vᵢᵀ(Hv)ᵢ from a single
HVP over all of them; ``block_hvp(i, vᵢ)`` returns Hᵢᵢvᵢ for one diagonal block (for
power iteration and Lanczos). The Hessian is that of the size-weighted mean loss over all
batches on all ranks: H = Σ_b n_b H_b / Σ_b n_b, with each H_b of the batch's mean loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from hessq._utils import move_to
from hessq._errors import ConfigError, InputDataError
from hessq.sensitivity import _distributed as D
from hessq.sensitivity._errors import check_double_backward, double_backward_error

Batch = tuple[Any, Any]


def batch_size(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    items = inputs.values() if isinstance(inputs, dict) else inputs
    for item in items:
        if isinstance(item, torch.Tensor) and item.dim():
            return int(item.shape[0])
    raise InputDataError("cannot tell the batch size: the batch's inputs hold no tensor with a batch dimension")


def run_model(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


class HessianOperator:
    """Products with the loss Hessian restricted to ``params`` (and optionally layer inputs).

    ``batches`` is a list of ``(global_index, (inputs, targets))`` that this rank owns.
    ``act_layers`` (module name -> module) adds each layer's input activation as an extra
    block, for HAWQ-V2's activation traces. With ``cache`` the first-order gradient graph
    of every batch is kept between products (one batch: what PyHessian does), otherwise
    each product recomputes forward and backward for each batch.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[tuple[int, Batch]],
        loss_fn: Callable[[Any, Any], torch.Tensor],
        params: Sequence[torch.Tensor],
        names: Sequence[str],
        *,
        act_layers: dict[str, nn.Module] | None = None,
        group=None,
        cache: bool = False,
    ) -> None:
        self.model, self.batches, self.loss_fn = model, list(batches), loss_fn
        self.params, self.names = list(params), list(names)
        self.act_layers = act_layers or {}
        self.group = group
        self.device = self.params[0].device
        self.cache = cache
        self._cached: dict[int, tuple] = {}
        self.hvp_count = 0
        local = torch.tensor([float(sum(batch_size(b[0]) for _, b in self.batches))], dtype=torch.float64, device=self.device)
        self.num_data = float(D.all_reduce_sum(local, group).item())
        if self.num_data == 0:
            raise InputDataError("no data: the batches hold no samples. Pass at least one (inputs, targets) batch.")
        self._checked = False

    # -- one batch ------------------------------------------------------------------

    def _grads(self, index: int, batch: Batch, which: Sequence[int] | None):
        """Forward and first backward with create_graph: (grads of params[which], acts, act grads)."""
        if self.cache and index in self._cached:
            grads, acts, act_grads = self._cached[index]
            return ([grads[i] for i in which] if which is not None else grads), acts, act_grads
        inputs, targets = move_to(batch[0], self.device), move_to(batch[1], self.device)
        acts: dict[str, torch.Tensor] = {}
        want_acts = which is None or self.cache
        hooks = [m.register_forward_pre_hook(self._capture(name, acts)) for name, m in self.act_layers.items()] if want_acts else []
        try:
            loss = self.loss_fn(run_model(self.model, inputs), targets)
        finally:
            for h in hooks:
                h.remove()
        self._check_loss(loss, index)
        pidx = list(range(len(self.params))) if (which is None or self.cache) else list(which)
        act_list = list(acts.values())
        out = torch.autograd.grad(loss, [self.params[i] for i in pidx] + act_list, create_graph=True, allow_unused=True)
        grads, act_grads = list(out[: len(pidx)]), dict(zip(acts, out[len(pidx):]))
        unused = [self.names[i] for i, g in zip(pidx, grads) if g is None]
        if unused:
            used = [n for n in self.names if n not in unused]
            raise ConfigError(
                f"the loss does not depend on the weights of {unused}: they are not used by the forward pass. "
                + (f"Analyse the others with layers={used}." if used else "Check that loss_fn computes the loss from the model's output.")
            )
        if not self._checked:
            check_double_backward(self.model, loss, self.params, self.names, batch, self.loss_fn, self.device)
            self._checked = True
        if self.cache:
            self._cached[index] = (grads, acts, act_grads)
            if which is not None:
                grads = [grads[i] for i in which]
        return grads, acts, act_grads

    @staticmethod
    def _capture(name: str, acts: dict[str, torch.Tensor]):
        def hook(module: nn.Module, args: tuple):
            if name in acts or not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
                return None
            x = args[0]
            if not x.requires_grad:  # the model's input: make it a leaf we can differentiate by
                x = x.detach().requires_grad_(True)
                acts[name] = x
                return (x,) + tuple(args[1:])
            acts[name] = x
            return None

        return hook

    def _check_loss(self, loss: Any, index: int) -> None:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ConfigError(
                f"loss_fn must return a scalar tensor (the batch's mean loss); got {type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
                + ". Reduce it with .mean()."
            )
        if not torch.isfinite(loss).all():
            raise ConfigError(
                f"the loss is {loss.item()} on batch {index}: the Hessian of a non-finite loss is meaningless. "
                "Check that batch's inputs and targets for NaN/inf and that the model's weights are finite "
                "(e.g. evaluate the model on it, or drop that batch)."
            )
        if not loss.requires_grad:
            raise ConfigError(
                "the loss does not depend on the model's parameters (it has no grad_fn): compute it from "
                "model(inputs) outside torch.no_grad(), without .detach()/.item(), and make sure the analysed "
                "layers' weights have requires_grad=True."
            )

    def _second(self, outputs: list, inputs: list, vectors: list, retain: bool = False) -> list[torch.Tensor]:
        """One double-backward pass: d(Σ gᵢ·vᵢ)/d inputs; missing second derivatives are zero."""
        keep = [j for j, g in enumerate(outputs) if g is not None and g.requires_grad]
        self.hvp_count += 1
        if not keep:
            return [torch.zeros_like(x) for x in inputs]
        try:
            hv = torch.autograd.grad(
                [outputs[j] for j in keep], inputs, grad_outputs=[vectors[j] for j in keep],
                retain_graph=self.cache or retain, allow_unused=True,
            )
        except RuntimeError as exc:  # NotImplementedError is a RuntimeError
            raise double_backward_error(exc, self.model, self.params, self.names, self.batches[0][1], self.loss_fn, self.device) from exc
        return [torch.zeros_like(x) if h is None else h for x, h in zip(inputs, hv)]

    # -- products over all data -------------------------------------------------------

    def products(self, vectors: Sequence[torch.Tensor], act_vector: Callable[[int, str, torch.Tensor], torch.Tensor] | None = None):
        """vᵢᵀ(Hv)ᵢ for every parameter i from ONE HVP per batch; float64, summed over ranks.

        ``act_vector(batch_index, layer, activation)`` draws the activation blocks' vectors.
        Returns (dots of shape [len(params)], activation dots {layer: float}).
        """
        act_names = list(self.act_layers)
        acc = torch.zeros(len(self.params) + 2 * len(act_names), dtype=torch.float64, device=self.device)
        for index, batch in self.batches:
            grads, acts, act_grads = self._grads(index, batch, None)
            names = [n for n in act_names if n in acts]
            avs = [act_vector(index, n, acts[n]) for n in names] if act_vector else []
            hv = self._second(grads + [act_grads[n] for n in names], self.params + [acts[n] for n in names], list(vectors) + avs)
            w = float(batch_size(batch[0]))
            for i, (v, h) in enumerate(zip(vectors, hv)):
                acc[i] += w * torch.dot(v.reshape(-1).double(), h.reshape(-1).double())
            for n, v, h in zip(names, avs, hv[len(self.params):]):
                j = len(self.params) + 2 * act_names.index(n)
                acc[j] += w * torch.dot(v.reshape(-1).double(), h.reshape(-1).double())
                acc[j + 1] += w * (v[0].numel() if v.dim() else 1)  # activation elements per sample
        D.all_reduce_sum(acc, self.group)
        acc /= self.num_data
        if not torch.isfinite(acc).all():
            raise ConfigError(
                "the Hessian-vector product is not finite although the loss is: the gradients overflow or "
                "the inputs hold NaN/inf that the model saturates (e.g. tanh(inf)). Check the batches and "
                "the weights for NaN/inf."
            )
        dots = acc[: len(self.params)].cpu()
        act = {n: (float(acc[len(self.params) + 2 * k]), float(acc[len(self.params) + 2 * k + 1])) for k, n in enumerate(act_names)}
        return dots, act

    def block_dots(self, indices: Sequence[int], vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """vᵢᵀHᵢᵢvᵢ for each parameter i in ``indices``, each from a double backward restricted to its block.

        No cross-block terms: the sample's variance is that of the layer's own block (PyHessian per
        layer), while the first-order graph of each batch is built once for all of them. An index may
        repeat, with vectors on parts of its block (rows of an embedding table).
        Float64, over all data and ranks.
        """
        acc = torch.zeros(len(indices), dtype=torch.float64, device=self.device)
        unique = list(dict.fromkeys(indices))
        for index, batch in self.batches:
            grads, _, _ = self._grads(index, batch, unique)
            grad_of = dict(zip(unique, grads))
            w = float(batch_size(batch[0]))
            for k, (i, v) in enumerate(zip(indices, vectors)):
                (h,) = self._second([grad_of[i]], [self.params[i]], [v], retain=k < len(indices) - 1)
                acc[k] += w * torch.dot(v.reshape(-1).double(), h.reshape(-1).double())
        D.all_reduce_sum(acc, self.group)
        acc /= self.num_data
        if not torch.isfinite(acc).all():
            raise ConfigError("the Hessian-vector product is not finite although the loss is: the gradients overflow; "
                              "check the batches and the weights for NaN/inf.")
        return acc.cpu()

    def block_trace(self, i: int, small: int = 1 << 16) -> float:
        """Σ_j e_jᵀH_iie_j, the exact trace of parameter i's block: one product per weight; float64, over
        all data and ranks. On a small batch (at most ``small`` input elements) 128 products at a time go
        through one batched (vmapped) double backward, several times faster there; on a large one vmap's
        overhead and memory (every intermediate gets that batch dimension) make it slower, so one at a time."""
        p, n = self.params[i], self.params[i].numel()
        acc = torch.zeros(1, dtype=torch.float64, device=self.device)
        for index, batch in self.batches:
            chunk = 128 if _numel(batch[0]) <= small else 1
            (g,), _, _ = self._grads(index, batch, [i])
            for start in range(0, n, chunk):
                idx = torch.arange(start, min(start + chunk, n), device=p.device)
                e = torch.zeros(len(idx), n, dtype=p.dtype, device=p.device)
                e[torch.arange(len(idx)), idx] = 1
                h = None
                if chunk > 1:
                    try:
                        (h,) = torch.autograd.grad(g, p, e.reshape(len(idx), *p.shape), retain_graph=True, is_grads_batched=True)
                        self.hvp_count += len(idx)
                    except RuntimeError:  # an op without a batching rule
                        h = None
                if h is None:
                    h = torch.stack([self._second([g], [p], [v.reshape(p.shape)], retain=True)[0] for v in e])
                acc += float(batch_size(batch[0])) * h.reshape(len(idx), n)[torch.arange(len(idx)), idx].double().sum()
        D.all_reduce_sum(acc, self.group)
        return float(acc / self.num_data)

    def block_hvp(self, i: int, v: torch.Tensor) -> torch.Tensor:
        """Hᵢᵢv for the diagonal block of parameter i (float64 on the model's device, over all data)."""
        acc = torch.zeros(v.numel(), dtype=torch.float64, device=self.device)
        for index, batch in self.batches:
            (g,), _, _ = self._grads(index, batch, [i])
            (h,) = self._second([g], [self.params[i]], [v.to(self.params[i].dtype).reshape(self.params[i].shape)])
            acc += float(batch_size(batch[0])) * h.reshape(-1).double()
        D.all_reduce_sum(acc, self.group)
        return acc / self.num_data

    def full_hvp(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """H v over all the parameters (for the whole-model spectral density)."""
        acc = [torch.zeros(p.numel(), dtype=torch.float64, device=self.device) for p in self.params]
        for index, batch in self.batches:
            grads, _, _ = self._grads(index, batch, None)
            hv = self._second(grads, self.params, [v.to(p.dtype).reshape(p.shape) for v, p in zip(vectors, self.params)])
            for a, h in zip(acc, hv):
                a += float(batch_size(batch[0])) * h.reshape(-1).double()
        flat = D.all_reduce_sum(torch.cat(acc), self.group) / self.num_data
        return list(flat.split([p.numel() for p in self.params]))


def _numel(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.numel()
    items = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (list, tuple)) else []
    return sum(_numel(x) for x in items)


def rademacher(shape: torch.Size, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """±1 entries drawn on the CPU from ``generator`` (so every device and rank draws the same)."""
    return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(dtype=like.dtype, device=like.device)


def sub_generator(*keys: int) -> torch.Generator:
    """A generator seeded from several integers (e.g. seed, sample, batch), well mixed."""
    h = 1469598103934665603
    for k in keys:
        h = ((h ^ (k & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return torch.Generator().manual_seed(h % (2**63 - 1))
