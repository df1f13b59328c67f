"""A fast DP-SGD engine: per-sample gradient norms and the clipped sum without Opacus hooks.

Every :class:`~clients.clipping.ClippingRule` needs only the per-sample gradient *norms*,
so most per-sample gradients never have to exist:

* ``nn.Linear`` on (B, d) inputs — "ghost" norm ‖g_i‖² = ‖δ_i‖²·(‖a_i‖² + 1) (the 1 for the
  bias), and the clipped sum Σ_i w_i g_i is one weighted matmul (w∘δ)ᵀa;
* ``nn.Linear`` on (B, T, d) inputs and ``nn.Conv2d`` (via ``unfold``) — per-sample
  gradients δ_iᵀU_i are materialised when they fit in memory (fewest flops: the clipped sum
  is then a mat-vec), else the norm comes from the Gram trick Σ_{t,s}(δ_it·δ_is)(U_it·U_is)
  and the clipped sum from one weighted matmul;
* ``nn.GroupNorm`` / ``nn.LayerNorm`` affine parameters — per-sample gradients are tiny
  and are materialised.

Activations are captured by forward hooks and output gradients by tensor hooks; while
:class:`GhostGradModule` runs a forward pass its parameters are marked as not needing
gradients, so autograd computes only the output gradients (δ) and never the
non-private weight gradients, which would be thrown away. There is no second backward.

:class:`GhostDPOptimizer` then adds N(0, σ²C²) noise to the clipped sum and divides by the
expected batch size exactly as Opacus's ``DPOptimizer`` does (same noise order, same
draws from the :class:`~clients.randomness.RandomSource`), so with the same seeded source
both give the same update up to rounding.
A trainable parameter in a layer type this engine does not know raises
:class:`~accounting.errors.ConfigError` at construction; nothing is skipped silently.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer

from privfl.accounting.errors import ConfigError
from privfl.clients.clipping import ClippingRule, FlatClipping
from privfl.clients.randomness import RandomSource, SecureRandom

log = logging.getLogger("privfl.clients")

#: Materialise conv / sequence per-sample gradients while they take at most this many bytes;
#: above it, use the Gram trick (more flops, memory B·L² instead of B·|W|).
MATERIALISE_LIMIT_BYTES = 256 * 2**20

#: How conv per-sample weight gradients are materialised: "unfold" (strided unfold + bmm),
#: "grouped" (one grouped weight-gradient convolution), or "auto": grouped when a kernel has
#: at least GROUPED_CONV_MIN_COLS input columns (C_in·kh·kw), where it measured faster on CPU.
CONV_METHOD = "auto"
GROUPED_CONV_MIN_COLS = 32

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)


@dataclass
class _Record:
    """What one layer saw in the current step: its input and its output gradient."""

    activation: torch.Tensor | None = None
    backprop: torch.Tensor | None = None
    cache: Any = None

    def clear(self) -> None:
        self.activation = None
        self.backprop = None
        self.cache = None


class _State:
    """Mutable per-step flags of a :class:`GhostGradModule`."""

    __slots__ = ("capturing", "batch_size")

    def __init__(self) -> None:
        self.capturing = False
        self.batch_size: int | None = None


class _Layer:
    """Per-sample norm² and clipped-sum computation for one supported module."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.record = _Record()
        self.params: list[nn.Parameter] = [p for p in module.parameters(recurse=False) if p.requires_grad]

    def norm_sq(self, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """(B,) squared norms of this layer's per-sample gradients (of the summed loss)."""
        raise NotImplementedError

    def clipped_sum(self, a: torch.Tensor, d: torch.Tensor, coef: torch.Tensor,
                    noise: dict[nn.Parameter, torch.Tensor]) -> None:
        """Write ``noise[p] + Σ_i coef_i g_i(p)`` into ``p.grad`` for each parameter."""
        raise NotImplementedError


def _trained(p: torch.Tensor | None) -> nn.Parameter | None:
    """A layer's weight or bias if it is trained, else None (torch annotates them as Tensor;
    a module's registered weight and bias are nn.Parameter)."""
    return cast(nn.Parameter, p) if p is not None and p.requires_grad else None


def _vdot(x: torch.Tensor) -> torch.Tensor:
    """Row-wise squared norm of a (B, k) tensor; big ones without a (B, k) temporary."""
    if x.numel() < 65536:
        return torch.linalg.vecdot(x, x)
    return torch.linalg.vector_norm(x, dim=1).square_()


class _Linear(_Layer):
    """``nn.Linear``: ghost norm on 2-D inputs, materialise/Gram on (B, T, d) inputs."""

    def __init__(self, name: str, module: nn.Linear) -> None:
        super().__init__(name, module)
        self.w = _trained(module.weight)
        self.b = _trained(module.bias)

    def norm_sq(self, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        if a.dim() == 2:
            d_sq = _vdot(d)
            if self.w is None:
                return d_sq
            a_sq = _vdot(a)
            return torch.addcmul(d_sq, d_sq, a_sq) if self.b is not None else d_sq * a_sq
        b = a.shape[0]
        aT = a.reshape(b, -1, a.shape[-1]).transpose(1, 2)  # (B, K, T)
        dT = d.reshape(b, -1, d.shape[-1]).transpose(1, 2)  # (B, O, T)
        self.record.cache = _SeqCache(dT, aT.shape[1] if self.w is not None else 0, self.b is not None,
                                      lambda: aT)
        return self.record.cache.norm_sq()

    def clipped_sum(self, a: torch.Tensor, d: torch.Tensor, coef: torch.Tensor,
                    noise: dict[nn.Parameter, torch.Tensor]) -> None:
        if a.dim() == 2:
            dt = d.t()  # (O, B)
            if self.w is not None:
                self.w.grad = noise[self.w].addmm_(dt * coef, a)
            if self.b is not None:
                self.b.grad = noise[self.b].addmv_(dt, coef)
            return
        self.record.cache.clipped_sum(coef, self.w, self.b, noise)


class _Conv2d(_Layer):
    """``nn.Conv2d`` (groups=1, zero padding): unfold, then materialise or Gram."""

    def __init__(self, name: str, module: nn.Conv2d) -> None:
        super().__init__(name, module)
        if module.groups != 1:
            raise ConfigError(f"dp.engine 'fast': layer {name!r} is a grouped Conv2d (groups={module.groups}); "
                              "use dp.engine 'opacus' for it")
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ConfigError(f"dp.engine 'fast': layer {name!r} uses padding {module.padding!r} / mode "
                              f"{module.padding_mode!r}; only numeric zero padding is supported")
        self.w = _trained(module.weight)
        self.b = _trained(module.bias)
        self._placeholder: torch.Tensor | None = None  # see _weight_placeholder

    def _weight_placeholder(self, a: torch.Tensor, o: int) -> torch.Tensor:
        """A contiguous (B·O, C, kh, kw) tensor standing for the grouped convolution's weight.

        Only its shape matters (the weight gradient never reads the weight), but an expanded
        one-element tensor made oneDNN copy it and take a ~4× slower path. One zeroed buffer of
        the largest batch seen so far is kept (Poisson batches vary in size) and viewed.
        """
        m: nn.Conv2d = self.module  # type: ignore[assignment]
        shape = (a.shape[0] * o, a.shape[1], *m.kernel_size)
        n = math.prod(shape)
        buf = self._placeholder
        if buf is None or buf.numel() < n or buf.dtype != a.dtype or buf.device != a.device:
            buf = self._placeholder = a.new_zeros(n)
        return buf[:n].view(shape)

    def norm_sq(self, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        m: nn.Conv2d = self.module  # type: ignore[assignment]
        b = a.shape[0]
        dT = d.reshape(b, d.shape[1], -1)  # (B, O, L)
        k = a.shape[1] * m.kernel_size[0] * m.kernel_size[1] if self.w is not None else 0
        method = CONV_METHOD if CONV_METHOD != "auto" else ("grouped" if k >= GROUPED_CONV_MIN_COLS else "unfold")
        grouped = ((lambda: _grouped_weight_grad(a, d, m, self._weight_placeholder(a, d.shape[1])))
                   if method == "grouped" else None)
        self.record.cache = _SeqCache(dT, k, self.b is not None, lambda: _unfold(a, m), grouped)
        return self.record.cache.norm_sq()

    def clipped_sum(self, a: torch.Tensor, d: torch.Tensor, coef: torch.Tensor,
                    noise: dict[nn.Parameter, torch.Tensor]) -> None:
        self.record.cache.clipped_sum(coef, self.w, self.b, noise)


def _grouped_weight_grad(x: torch.Tensor, d: torch.Tensor, m: nn.Conv2d,
                         weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample weight gradients (B·O, C, kh, kw): the batch as B convolution groups.

    One weight-gradient convolution (oneDNN on CPU) with no explicit unfold; it costs about
    what the non-private weight gradient costs, which the fast engine never computes.
    ``weight``: a contiguous tensor of that shape whose values are never read (made here if
    not given; a layer passes its reused one).
    """
    b, c = x.shape[:2]
    o = d.shape[1]
    if weight is None:
        weight = x.new_zeros((b * o, c, *m.kernel_size))
    return torch.ops.aten.convolution_backward(
        d.reshape(1, b * o, *d.shape[2:]), x.reshape(1, b * c, *x.shape[2:]),
        weight, None, list(m.stride), list(m.padding), list(m.dilation),  # type: ignore[arg-type]
        False, [0, 0], b, [False, True, False])[1]


def _unfold(x: torch.Tensor, m: nn.Conv2d) -> torch.Tensor:
    """``F.unfold(x)`` for ``m``'s geometry, as one strided copy (≈2× faster than im2col on CPU)."""
    kh, kw = m.kernel_size
    sh, sw = m.stride
    dh, dw = m.dilation
    ph, pw = cast(tuple[int, int], m.padding)  # numeric: _Conv2d refuses string padding
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    b, c, h, w = xp.shape
    ho = (h - dh * (kh - 1) - 1) // sh + 1
    wo = (w - dw * (kw - 1) - 1) // sw + 1
    s0, s1, s2, s3 = xp.stride()
    patches = xp.as_strided((b, c, kh, kw, ho, wo), (s0, s1, s2 * dh, s3 * dw, s2 * sh, s3 * sw))
    return patches.reshape(b, c * kh * kw, ho * wo)


class _SeqCache:
    """Per-sample gradients δ_iᵀU_i summed over positions (conv / sequence layers).

    ``unfolded()`` gives U as (B, K, L); ``grouped()``, when given, gives the materialised
    per-sample weight gradients (B, O·K) directly.
    """

    def __init__(self, dT: torch.Tensor, k: int, bias: bool, unfolded: Callable[[], torch.Tensor],
                 grouped: Callable[[], torch.Tensor] | None = None) -> None:
        self.dT = dT  # (B, O, L)
        self.k, self.bias = k, bias
        self.unfolded, self.grouped = unfolded, grouped
        self.aT: torch.Tensor | None = None
        self.g_w: torch.Tensor | None = None
        self.g_b: torch.Tensor | None = None
        b, o, _ = dT.shape
        self.materialise = b * o * k * dT.element_size() <= MATERIALISE_LIMIT_BYTES

    def norm_sq(self) -> torch.Tensor:
        b = self.dT.shape[0]
        total = torch.zeros(b, dtype=self.dT.dtype, device=self.dT.device)
        if self.k:
            if self.materialise:
                if self.grouped is not None:
                    self.g_w = self.grouped().reshape(b, -1)
                else:
                    self.g_w = torch.bmm(self.dT, self.unfolded().transpose(1, 2)).reshape(b, -1)  # (B, O·K)
                total = _vdot(self.g_w)
            else:
                self.aT = self.unfolded()
                dd = torch.bmm(self.dT.transpose(1, 2), self.dT)  # (B, L, L)
                aa = torch.bmm(self.aT.transpose(1, 2), self.aT)
                total = (dd * aa).sum(dim=(1, 2))
        if self.bias:
            self.g_b = self.dT.sum(dim=2)  # (B, O)
            total = total + _vdot(self.g_b)
        return total

    def clipped_sum(self, coef: torch.Tensor, w: nn.Parameter | None, bias: nn.Parameter | None,
                    noise: dict[nn.Parameter, torch.Tensor]) -> None:
        if w is not None:
            if self.g_w is not None:
                w.grad = noise[w].reshape(-1).addmv_(self.g_w.t(), coef).view_as(w)
            else:
                assert self.aT is not None
                b, o, length = self.dT.shape
                dc = (self.dT * coef[:, None, None]).transpose(0, 1).reshape(o, b * length)
                at = self.aT.transpose(1, 2).reshape(b * length, -1)
                w.grad = noise[w].reshape(o, -1).addmm_(dc, at).view_as(w)
        if bias is not None:
            assert self.g_b is not None
            bias.grad = noise[bias].addmv_(self.g_b.t(), coef)


class _Norm(_Layer):
    """``nn.GroupNorm`` / ``nn.LayerNorm`` affine parameters: materialised per-sample grads."""

    def __init__(self, name: str, module: nn.GroupNorm | nn.LayerNorm) -> None:
        super().__init__(name, module)
        self.w = _trained(module.weight)
        self.b = _trained(module.bias)

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, None, None, m.eps)
        assert isinstance(m, nn.LayerNorm)
        return F.layer_norm(x, m.normalized_shape, None, None, m.eps)

    def norm_sq(self, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        m = self.module
        b = a.shape[0]
        if isinstance(m, nn.GroupNorm):  # params per channel (dim 1); sum over the rest
            shape, dim = (b, d.shape[1], -1), 2
        else:  # params over the trailing normalized_shape; sum over the middle dims
            assert isinstance(m, nn.LayerNorm)
            shape, dim = (b, -1, m.weight.numel() if m.weight is not None else m.bias.numel()), 1
        dr = d.reshape(shape)
        # Σ over the summed dims of δ·x̂ as one dot product (no δ·x̂ temporary)
        g_w = torch.linalg.vecdot(dr, self._normalised(a).reshape(shape), dim=dim) if self.w is not None else None
        g_b = dr.sum(dim) if self.b is not None else None
        self.record.cache = (g_w, g_b)
        total = torch.zeros(b, dtype=d.dtype, device=d.device)
        for g in (g_w, g_b):
            if g is not None:
                total = total + _vdot(g)
        return total

    def clipped_sum(self, a: torch.Tensor, d: torch.Tensor, coef: torch.Tensor,
                    noise: dict[nn.Parameter, torch.Tensor]) -> None:
        g_w, g_b = self.record.cache
        for p, g in ((self.w, g_w), (self.b, g_b)):
            if p is not None:
                p.grad = noise[p].reshape(-1).addmv_(g.t(), coef).view_as(p)


def _make_layer(name: str, module: nn.Module) -> _Layer:
    if isinstance(module, nn.Linear):
        return _Linear(name, module)
    if isinstance(module, nn.Conv2d):
        return _Conv2d(name, module)
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
        return _Norm(name, module)
    raise ConfigError(f"dp.engine 'fast' cannot compute per-sample gradients of layer {name!r} "
                      f"({type(module).__name__}); supported: "
                      f"{', '.join(t.__name__ for t in SUPPORTED_LAYERS)} — use dp.engine 'opacus'")


class GhostGradModule(nn.Module):
    """Wraps a model; a forward pass with grad enabled records what per-sample norms need.

    The wrapped model's parameters are the wrapper's parameters; outside the wrapper's
    forward the model behaves exactly as before (hooks do nothing then).
    """

    def __init__(self, module: nn.Module, loss_reduction: str = "mean") -> None:
        super().__init__()
        if loss_reduction not in ("mean", "sum"):
            raise ConfigError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self._module = module
        self.loss_reduction = loss_reduction
        self.layers: list[_Layer] = []
        for name, m in module.named_modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if type(m) not in SUPPORTED_LAYERS:  # exact type: a subclass may change forward
                raise ConfigError(f"dp.engine 'fast' cannot compute per-sample gradients of layer "
                                  f"{name or '<root>'!r} ({type(m).__name__}); supported: "
                                  f"{', '.join(t.__name__ for t in SUPPORTED_LAYERS)} — use dp.engine 'opacus'")
            self.layers.append(_make_layer(name, m))
        if not self.layers:
            raise ConfigError("dp.engine 'fast': the model has no trainable parameters")
        self.trainable: list[nn.Parameter] = [p for layer in self.layers for p in layer.params]
        self._state = _State()  # written every step: a plain object, not nn.Module.__setattr__
        self._handles = [layer.module.register_forward_hook(self._forward_hook(layer)) for layer in self.layers]

    @property
    def batch_size(self) -> int | None:
        """Rows of the batch recorded this step (None before a recording forward)."""
        return self._state.batch_size

    @property
    def module(self) -> nn.Module:
        """The wrapped model."""
        return self._module

    def _forward_hook(self, layer: _Layer) -> Callable[..., torch.Tensor | None]:
        rec = layer.record
        state = self._state

        def set_backprop(grad: torch.Tensor) -> None:
            if rec.backprop is not None:
                raise RuntimeError(f"layer {layer.name!r} got a second backward pass before optimizer.step(); "
                                   "the fast DP engine needs exactly one forward and one backward per step")
            rec.backprop = grad.detach()

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
            if not state.capturing:
                return None
            if rec.activation is not None:
                raise RuntimeError(f"layer {layer.name!r} ran twice in one step (shared or reused layer, or a "
                                   "second forward before optimizer.step()/zero_grad()); the fast DP engine "
                                   "does not support that — use dp.engine 'opacus'")
            rec.activation = inputs[0].detach()
            replaced = None
            if not output.requires_grad:  # no trainable path below: start the graph here
                output = replaced = output.detach().requires_grad_(True)
            output.register_hook(set_backprop)
            return replaced

        return hook

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self._module(*args, **kwargs)
        state = self._state
        if state.batch_size is not None:
            raise RuntimeError("a second forward pass before optimizer.step()/zero_grad(): the fast DP engine "
                               "does not accumulate batches (Poisson sampling forbids it)")
        for p in self.trainable:  # autograd then skips the non-private weight gradients
            p.requires_grad_(False)
        state.capturing = True
        try:
            out = self._module(*args, **kwargs)
        except BaseException:
            self.clear()  # a failed forward leaves nothing half-recorded behind
            raise
        finally:
            state.capturing = False
            for p in self.trainable:
                p.requires_grad_(True)
        acts = [layer.record.activation for layer in self.layers if layer.record.activation is not None]
        state.batch_size = int(acts[0].shape[0]) if acts else 0
        return out

    def clear(self) -> None:
        """Drop what the last forward/backward recorded."""
        for layer in self.layers:
            layer.record.clear()
        self._state.batch_size = None

    def _live(self) -> list[_Layer]:
        """Layers that got both an activation and an output gradient this step."""
        live = [la for la in self.layers if la.record.activation is not None and la.record.backprop is not None]
        if not live and self.batch_size:
            raise RuntimeError("optimizer.step() after a forward pass but no loss.backward()")
        return live

    def per_sample_norms(self) -> torch.Tensor:
        """(B,) L2 norms of the per-sample gradients over all trainable parameters."""
        live = self._live()
        n = self.batch_size or 0
        if not live or n == 0:
            return torch.zeros(0, device=self.trainable[0].device)
        total: torch.Tensor | None = None
        for la in live:
            a, d = la.record.activation, la.record.backprop
            assert a is not None and d is not None
            s = la.norm_sq(a, d)
            total = s if total is None else total.add_(s)  # the first layer's fresh (B,) tensor, summed into
        assert total is not None
        k = n if self.loss_reduction == "mean" else 1  # δ is the gradient of the *mean* loss: undo the 1/n
        if total.device.type == "cpu":  # a fresh (B,) tensor: numpy's sqrt and product, the same IEEE ops
            t = total.numpy()
            np.sqrt(t, out=t)
            if k != 1:
                t *= k
            return total
        return total.sqrt_().mul_(k)

    def write_clipped_sum(self, coef: torch.Tensor, noise: dict[nn.Parameter, torch.Tensor]) -> None:
        """Set ``p.grad = noise[p] + Σ_i coef_i·δ-level per-sample gradient`` for every trainable p.

        Must follow :meth:`per_sample_norms` in the same step (it reuses its caches).
        Parameters of layers the loss did not reach get the noise alone.
        """
        done: set[int] = set()
        for la in (self._live() if coef.numel() else []):
            a, d = la.record.activation, la.record.backprop
            assert a is not None and d is not None
            la.clipped_sum(a, d, coef, noise)
            done.update(id(p) for p in la.params)
        for p in self.trainable:
            if id(p) not in done:
                p.grad = noise[p]


class GhostDPOptimizer(Optimizer):
    """DP-SGD step on a :class:`GhostGradModule`: clip by rule, add σ·C noise, divide by E[B].

    Mirrors Opacus's ``DPOptimizer``: noise N(0, σ²C²) per parameter in the optimizer's
    parameter order from ``random_source`` (secure unless a seeded source is given), then
    division by ``expected_batch_size`` when
    ``loss_reduction='mean'``. Interface: ``zero_grad``, ``step``, ``state_dict``,
    ``load_state_dict``, ``attach_step_hook``; ``param_groups``/``state`` are the wrapped
    optimizer's.
    """

    def __init__(self, optimizer: Optimizer, module: GhostGradModule, *, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int | None,
                 clipping: ClippingRule | None = None, random_source: RandomSource | None = None,
                 loss_reduction: str = "mean") -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ConfigError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if loss_reduction == "mean" and not expected_batch_size:
            raise ConfigError("expected_batch_size must be a positive integer when loss_reduction='mean'")
        if loss_reduction != module.loss_reduction:
            raise ConfigError(f"loss_reduction {loss_reduction!r} differs from the module's {module.loss_reduction!r}")
        if not noise_multiplier >= 0:
            raise ConfigError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if not max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.original_optimizer = optimizer
        self.module = module
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = expected_batch_size
        self.loss_reduction = loss_reduction
        self.clipping: ClippingRule = clipping or FlatClipping()
        self.random_source: RandomSource = random_source or SecureRandom()
        self.step_hook: Callable[[GhostDPOptimizer], None] | None = None
        self.last_per_sample_norms: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None
        self.params: list[nn.Parameter] = [p for g in optimizer.param_groups for p in g["params"]
                                           if p.requires_grad]
        mine = {id(p) for p in module.trainable}
        theirs = {id(p) for p in self.params}
        if mine != theirs:
            raise ConfigError("dp.engine 'fast': the optimizer must hold exactly the model's trainable "
                              f"parameters ({len(theirs)} given, the model has {len(mine)})")

    # ---- delegation to the wrapped optimizer (as Opacus's DPOptimizer does) ------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.original_optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.original_optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.original_optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.original_optimizer.defaults = value

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self.original_optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"GhostDPOptimizer({self.original_optimizer!r})"

    def attach_step_hook(self, fn: Callable[[GhostDPOptimizer], None]) -> None:
        """Call ``fn(self)`` after noising, before the parameter update (e.g. accounting)."""
        self.step_hook = fn

    # ---- the DP step ------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and what the module recorded."""
        self.module.clear()
        self.original_optimizer.zero_grad(set_to_none)

    def _noise(self, scale: float) -> dict[nn.Parameter, torch.Tensor]:
        """N(0, (σC·scale)²) per parameter, in Opacus's order (the same draws for a seeded source)."""
        std = self.noise_multiplier * self.max_grad_norm
        if std == 0:
            return {p: torch.zeros_like(p) for p in self.params}
        return dict(zip(self.params, self.random_source.normal_like_each(std * scale, list(self.params))))

    def pre_step(self) -> None:
        """Set every ``p.grad`` to (Σ_i w_i g_i + N(0, σ²C²)) / E[B]."""
        norms = self.module.per_sample_norms()
        scale = 1.0 / self.expected_batch_size if self.loss_reduction == "mean" else 1.0  # type: ignore[operator]
        if norms.numel() == 0:
            weights = norms
            coef = norms
        else:
            weights = self.clipping.weights(norms, self.max_grad_norm)
            n = self.module.batch_size or 1
            # δ is the gradient of the mean loss (1/n); the per-sample gradient is n·δ-level
            coef = weights * (scale * n if self.loss_reduction == "mean" else scale)
        self.last_per_sample_norms = norms.detach()
        self.last_weights = weights.detach()
        noise = self._noise(scale)
        self.module.write_clipped_sum(coef, noise)
        if self.step_hook is not None:
            self.step_hook(self)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One DP step: clipped, noised, averaged gradient, then the wrapped optimizer's update."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        self.pre_step()
        self.module.clear()
        return self.original_optimizer.step()


def make_ghost_private(module: nn.Module, optimizer: Optimizer, *, noise_multiplier: float,
                       max_grad_norm: float, expected_batch_size: int, clipping: ClippingRule | None = None,
                       random_source: RandomSource | None = None,
                       loss_reduction: str = "mean") -> tuple[GhostGradModule, GhostDPOptimizer]:
    """Wrap ``module`` and ``optimizer`` for fast DP-SGD; train through the returned pair."""
    gm = GhostGradModule(module, loss_reduction=loss_reduction)
    opt = GhostDPOptimizer(optimizer, gm, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                           expected_batch_size=expected_batch_size, clipping=clipping,
                           random_source=random_source,
                           loss_reduction=loss_reduction)
    log.debug("fast DP engine on %d layers (%d parameters)", len(gm.layers), len(gm.trainable))
    return gm, opt
