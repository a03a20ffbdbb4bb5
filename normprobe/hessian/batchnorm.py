"""Train-mode batch norm with a lean second derivative, for the Hessian's forward pass only.

A Hessian-vector product by double backward goes through the backward of
every layer's backward. For ``F.batch_norm`` in train mode that is torch's
``batchnorm_double_backward``, which spends about 40 elementwise passes
over the activations per layer: 42% of a WRN-16-1 product's CPU time
(profiled, float32, one thread). Here the same function is one
``torch.autograd.Function`` whose forward and first backward are torch's
own kernels (``native_batch_norm`` and ``native_batch_norm_backward``: the
loss and the gradient are the same bits), and whose second derivative is
written out by hand in 11 passes: with ``xhat = (x - mean) * s``,
``s = 1 / sqrt(var + eps)`` per channel, ``n`` elements per channel,
``A = sum g`` and ``B = sum g * xhat`` (the bias and weight gradients),
the first backward is ``dx = gamma s / n * (n g - A - xhat B)``; for
cotangents ``u`` (of ``dx``), ``u_w``, ``u_b`` (of the weight and bias
gradients), with ``Su = sum u``, ``Sug = sum u g``, ``Sux = sum u xhat``:

- d/dg: ``gamma s (u - Su / n - xhat Sux / n) + u_w xhat + u_b``
- d/dgamma: ``s (Sug - A Su / n - B Sux / n)``
- d/dx: ``c_x xhat + c_u u + c_g g + c_0`` with per-channel
  ``c_x = -(gamma s^2 / n^2) (n Sug - A Su - 3 B Sux) - s u_w B / n``,
  ``c_u = -gamma s^2 B / n``, ``c_g = -gamma s^2 Sux / n + s u_w``,
  ``c_0 = gamma s^2 (B Su + A Sux) / n^2 - s u_w A / n``

(from ``d xhat_i / d x_k = s (delta_ik - 1/n - xhat_i xhat_k / n)`` and
``d s / d x_k = -s^2 xhat_k / n``). The products agree with torch's to
rounding (tests: float64, against the native products and the exact
Hessian). Running statistics are not updated inside the Hessian's pass
(they are clones there, and train mode does not read them).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.overrides import TorchFunctionMode

__all__ = ["LeanBatchNorm", "batch_norm_train", "LEAN_MIN_ELEMENTS"]


def _channel_shape(x: torch.Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def _batch_axes(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


class _BatchNormBackward(Function):
    """``(g, x, weight) -> (dx, dweight, dbias)`` of train-mode batch norm, with its derivative."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g, x, weight, mean, invstd, eps):  # type: ignore[override]
        return torch.ops.aten.native_batch_norm_backward(
            g, x, weight, None, None, mean, invstd, True, eps, [True, True, True]
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        g, x, weight, mean, invstd, _ = inputs
        _, dweight, dbias = output
        ctx.save_for_backward(g, x, weight, mean, invstd, dweight, dbias)

    @staticmethod
    def backward(ctx: Any, u, u_w, u_b):  # type: ignore[override]
        g, x, weight, mean, invstd, big_b, big_a = ctx.saved_tensors
        shape, axes = _channel_shape(x), _batch_axes(x)
        n = x.numel() // x.shape[1]
        s = invstd
        # (out-of-place addcmul with a per-channel input measured 4x slower than mul, add_)
        xhat = torch.mul(x, s.view(shape)).sub_((mean * s).view(shape))
        if u is None:
            u = torch.zeros_like(x)
        zero = torch.zeros_like(weight)
        u_w = zero if u_w is None else u_w
        u_b = zero if u_b is None else u_b
        su = u.sum(axes)
        sug = (u * g).sum(axes)
        sux = (u * xhat).sum(axes)
        k = weight * s
        # d/dg = k u + (u_w - k Sux / n) xhat + (u_b - k Su / n)
        gg = torch.mul(u, k.view(shape)).add_((u_b - k * su / n).view(shape))
        gg.addcmul_(xhat, (u_w - k * sux / n).view(shape))
        gw = s * (sug - big_a * su / n - big_b * sux / n)
        k2 = weight * s * s / n
        c_x = -(k2 / n) * (n * sug - big_a * su - 3 * big_b * sux) - s * u_w * big_b / n
        c_u = -k2 * big_b
        c_g = -k2 * sux + s * u_w
        c_0 = (k2 / n) * (big_b * su + big_a * sux) - s * u_w * big_a / n
        gx = torch.mul(xhat, c_x.view(shape)).add_(c_0.view(shape))
        gx.addcmul_(u, c_u.view(shape))
        gx.addcmul_(g, c_g.view(shape))
        return gg, gx, gw, None, None, None


class _BatchNormTrain(Function):
    """Train-mode batch norm with batch statistics: torch's kernels, a lean second derivative."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, eps):  # type: ignore[override]
        return torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, _, eps = inputs
        _, mean, invstd = output
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)

    @staticmethod
    def backward(ctx: Any, g, _mean, _invstd):  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        dx, dweight, dbias = _BatchNormBackward.apply(g, x, weight, mean, invstd, ctx.eps)
        return dx, dweight, dbias, None


def batch_norm_train(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)``, same value and gradient.

    >>> x = torch.randn(8, 3, dtype=torch.float64)
    >>> w, b = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    >>> torch.equal(batch_norm_train(x, w, b), F.batch_norm(x, None, None, w, b, True))
    True
    """
    return _BatchNormTrain.apply(x, weight, bias, eps)[0]


#: the fewest elements per call for which the lean form pays: below it the Python of its ~25
#: small ops costs more than torch's one fused node (measured, float32, one thread: 1.27x the
#: product's time with 16k elements per call, the quickstart's MLP; 0.77x with WRN-16-1's
#: 131k-524k)
LEAN_MIN_ELEMENTS = 2**16

_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


class LeanBatchNorm(TorchFunctionMode):
    """Route train-mode ``F.batch_norm`` with an affine through :func:`batch_norm_train`.

    Only for inputs of at least :data:`LEAN_MIN_ELEMENTS` elements (a rule
    of shapes, so every run takes the same path), inside the Hessian's
    forward pass only (:class:`~normprobe.hessian.hvp.HessianOperator`);
    every other call goes to torch unchanged.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is F.batch_norm:
            call = dict(zip(_ARGS, args))
            call.update(kwargs)
            x, weight, bias = call.get("input"), call.get("weight"), call.get("bias")
            if (
                call.get("training", False)
                and isinstance(x, torch.Tensor)
                and x.dim() >= 2
                and x.numel() >= LEAN_MIN_ELEMENTS
                and x.is_floating_point()
                and isinstance(weight, torch.Tensor)
                and isinstance(bias, torch.Tensor)
                and weight.dtype == bias.dtype == x.dtype
            ):
                return batch_norm_train(x, weight, bias, float(call.get("eps", 1e-5)))
        return func(*args, **kwargs)
