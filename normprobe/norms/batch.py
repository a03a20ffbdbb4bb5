"""Normalizers that use statistics over the batch axes in train mode.

``batch`` and ``batch-train`` call ``torch.nn.functional.batch_norm`` so they
match ``torch.nn.BatchNorm1d/2d`` to the last bit; the others follow the
formulas of docs/definitions.md (BMLV and LMBV from Rao & Sohl-Dickstein 2020, Batch Renorm from
Ioffe 2017, mean-only batch norm from Salimans & Kingma via Arpit's lecture slides).

Microbatch ("ghost batch") normalization: every class here takes
``norm_batch`` (None, the default: the whole minibatch). With ``norm_batch =
g``, train mode splits a minibatch of N examples into N / g consecutive groups
of g examples and normalizes each group with its own statistics, exactly as if
the plain layer ran on each group separately (Ioffe 2017: minibatches of 32 in
microbatches of 4). The running statistics are updated once per forward pass,
with the average over the groups of the per-group statistics, each computed as
the plain layer computes it (for example ``batch``: the mean of the group means
and the mean of the groups' unbiased variances; one step of the counter). Eval
mode is unchanged (running statistics), except ``batch-train``, whose eval mode
uses batch statistics and so uses the same microbatches as training. N must be
a multiple of g (an error names the layer otherwise); ``norm_batch = N`` is the
plain layer bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from normprobe.norms.base import (
    EPS,
    Normalizer,
    batch_axes,
    channel_view,
    check_norm_batch,
    feature_axes,
    group_axes,
    microbatches,
)

__all__ = [
    "BatchNorm",
    "BatchTrainNorm",
    "BMLVNorm",
    "LMBVNorm",
    "BatchRenorm",
    "MeanOnlyBatchNorm",
]


def _ema_(running: torch.Tensor, value: torch.Tensor, momentum: float) -> None:
    """``running <- (1 - momentum) * running + momentum * value``, torch's BN convention."""
    with torch.no_grad():
        running.mul_(1.0 - momentum).add_(value.detach(), alpha=momentum)


def _count_per_channel(z: torch.Tensor) -> int:
    return z.numel() // z.shape[1]


class _RunningStats(Normalizer):
    """A normalizer with torch-style running statistics and a step counter.

    ``track_running_stats`` works as torch's flag does on a module that has
    running statistics: when False, train mode still normalizes with batch
    statistics but updates neither the running statistics nor the step
    counter (``normprobe.state.frozen_statistics`` sets it temporarily).
    """

    uses_batch_stats = True

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = EPS,
        momentum: float = 0.1,
        norm_batch: int | None = None,
    ) -> None:
        super().__init__(num_features, eps=eps)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.norm_batch = check_norm_batch(norm_batch)
        self.track_running_stats = True
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        ghost = f", norm_batch={self.norm_batch}" if self.norm_batch is not None else ""
        return f"{super().extra_repr()}, momentum={self.momentum}{ghost}"

    def _microbatches(self, z: torch.Tensor) -> torch.Tensor | None:
        """``z`` as (G, norm_batch, C, ...) when this pass uses microbatch statistics, else None."""
        if not self._batch_stats_now():
            return None
        return microbatches(z, self.norm_batch, self)

    @property
    def _updating(self) -> bool:
        """Whether this forward pass updates the running statistics (train mode, tracking)."""
        return self.training and self.track_running_stats

    def _ema_(self, running: torch.Tensor, value: torch.Tensor) -> None:
        if self._updating:
            _ema_(running, value, self.momentum)

    def _step(self) -> None:
        if self._updating:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)


class BatchNorm(_RunningStats):
    """``(z - mean_B z) / sqrt(var_B z + eps)``, running mean/var for eval; torch's BatchNorm exactly.

    The buffers and parameters have torch's names (``running_mean``,
    ``running_var``, ``num_batches_tracked``, ``weight``, ``bias``), so a
    ``torch.nn.BatchNorm2d`` state dict loads into it and back.
    """

    norm_name = "batch"

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = EPS,
        momentum: float = 0.1,
        norm_batch: int | None = None,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, norm_batch=norm_batch)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input(z)
        zg = self._microbatches(z)
        self._step()
        if zg is not None:
            return self._affine(self._ghost(zg).reshape(z.shape))
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            z,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
        )

    def _ghost(self, zg: torch.Tensor) -> torch.Tensor:
        """Normalize each microbatch of ``zg`` (G, g, C, ...); update the running stats once."""
        var, mean = torch.var_mean(zg, dim=group_axes(zg), correction=0, keepdim=True)
        n = zg[0].numel() // self.num_features
        self._ema_(self.running_mean, mean.mean(dim=0).reshape(-1))
        self._ema_(self.running_var, (var * (n / (n - 1))).mean(dim=0).reshape(-1))
        return (zg - mean) * torch.rsqrt(var + self.eps)


class BatchTrainNorm(BatchNorm):
    """BatchNorm that also uses the batch's own statistics in eval mode ("Batch-Train" of Rao & Sohl-Dickstein 2020).

    Train mode is ``batch`` exactly (running statistics are still tracked, so
    the two can be compared); eval mode normalizes with the eval batch's
    statistics and leaves the running statistics alone. With ``norm_batch``,
    eval mode uses the same microbatches of ``norm_batch`` examples as train
    mode (consistent with training; the eval batch size must then be a
    multiple of ``norm_batch``).
    """

    norm_name = "batch-train"

    def _batch_stats_now(self) -> bool:
        return True

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(z)
        self._check_input(z)
        zg = self._microbatches(z)
        if zg is not None:
            return self._affine(self._ghost(zg).reshape(z.shape))
        return F.batch_norm(z, None, None, self.weight, self.bias, True, 0.0, self.eps)


class BMLVNorm(_RunningStats):
    """Batch-Mean Layer-Variance (Rao & Sohl-Dickstein 2020): ``u = z - mean_B z``, then ``u / sqrt(var_F u + eps)``.

    Eval mode subtracts the running mean instead of ``mean_B``; the variance is
    always per example, so only the mean depends on the batch.
    """

    norm_name = "bmlv"

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = EPS,
        momentum: float = 0.1,
        norm_batch: int | None = None,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, norm_batch=norm_batch)
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input(z)
        zg = self._microbatches(z)
        if zg is not None:
            mean = zg.mean(dim=group_axes(zg), keepdim=True)
            self._ema_(self.running_mean, mean.mean(dim=0).reshape(-1))
            self._step()
            u = (zg - mean).reshape(z.shape)
        elif self.training:
            mean = z.mean(dim=batch_axes(z))
            self._ema_(self.running_mean, mean)
            self._step()
            u = z - channel_view(mean, z)
        else:
            u = z - channel_view(self.running_mean, z)
        var = u.var(dim=feature_axes(u), correction=0, keepdim=True)
        return self._affine(u * torch.rsqrt(var + self.eps))


class LMBVNorm(_RunningStats):
    """Layer-Mean Batch-Variance (Rao & Sohl-Dickstein 2020): ``u = z - mean_F z``, then ``u / sqrt(var_B u + eps)``.

    Eval mode divides by the running variance (tracked unbiased, as torch's
    BatchNorm does); the mean is always per example.
    """

    norm_name = "lmbv"

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = EPS,
        momentum: float = 0.1,
        norm_batch: int | None = None,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, norm_batch=norm_batch)
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input(z)
        u = z - z.mean(dim=feature_axes(z), keepdim=True)
        ug = self._microbatches(u)
        if ug is not None:
            var = ug.var(dim=group_axes(ug), correction=0, keepdim=True)
            n = ug[0].numel() // self.num_features
            self._ema_(self.running_var, (var * (n / (n - 1))).mean(dim=0).reshape(-1))
            self._step()
            return self._affine((ug * torch.rsqrt(var + self.eps)).reshape(z.shape))
        if self.training:
            var = u.var(dim=batch_axes(u), correction=0)
            n = _count_per_channel(u)
            self._ema_(self.running_var, var * (n / (n - 1)))
            self._step()
        else:
            var = self.running_var
        return self._affine(u * channel_view(torch.rsqrt(var + self.eps), u))


class MeanOnlyBatchNorm(_RunningStats):
    """Mean-only batch norm (Salimans & Kingma): ``z - mean_B z + beta``; running mean in eval.

    It has a shift ``bias`` but no scale: the scale is the weight norm's ``g``.
    """

    norm_name = "weight-meanbn"

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = EPS,
        momentum: float = 0.1,
        norm_batch: int | None = None,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, norm_batch=norm_batch)
        self.register_parameter("weight", None)
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input(z)
        zg = self._microbatches(z)
        if zg is not None:
            mean = zg.mean(dim=group_axes(zg), keepdim=True)
            self._ema_(self.running_mean, mean.mean(dim=0).reshape(-1))
            self._step()
            return self._shift((zg - mean).reshape(z.shape))
        if self.training:
            mean = z.mean(dim=batch_axes(z))
            self._ema_(self.running_mean, mean)
            self._step()
        else:
            mean = self.running_mean
        return self._shift(z - channel_view(mean, z))

    def _shift(self, u: torch.Tensor) -> torch.Tensor:
        return u if self.bias is None else u + channel_view(self.bias, u)


class BatchRenorm(_RunningStats):
    """Batch Renormalization (Ioffe 2017).

    Train mode: ``(z - mean_B) / sigma_B * r + d`` with
    ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and
    ``d = clip((mean_B - mu) / sigma, -d_max, d_max)``, both treated as
    constants by autograd, and ``sigma_B = sqrt(var_B + eps)``. The moving
    ``mu`` (``running_mean``) and ``sigma`` (``running_std``) are updated after
    use at rate ``momentum`` (Ioffe's alpha, default 0.01). Eval mode:
    ``(z - mu) / sigma``.

    ``r_max`` and ``d_max`` follow a schedule over the step counter
    ``num_batches_tracked`` and the run length ``total_steps`` (a buffer, so a
    reloaded model resumes the schedule): pure BatchNorm (``r_max = 1``,
    ``d_max = 0``) for the first ``warmup`` fraction of steps, then relaxed
    linearly to the final values at ``r_max_at`` and ``d_max_at`` of the run.
    The training loop sets ``total_steps`` with :func:`set_total_steps`.

    With ``norm_batch``, each microbatch has its own ``mean_B`` and
    ``sigma_B``, and its own ``r`` and ``d`` computed against the shared moving
    ``mu`` and ``sigma`` as they were before this forward pass (one ``r_max``,
    ``d_max`` for all groups); afterwards ``mu`` moves towards the mean of the
    group means and ``sigma`` towards the mean of the group ``sigma_B``, once.
    """

    norm_name = "batch-renorm"

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = EPS,
        momentum: float = 0.01,
        r_max: float = 3.0,
        d_max: float = 5.0,
        total_steps: int = 1000,
        warmup: float = 0.1,
        r_max_at: float = 0.5,
        d_max_at: float = 0.8,
        norm_batch: int | None = None,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, norm_batch=norm_batch)
        if r_max < 1.0 or d_max < 0.0:
            raise ValueError(f"need r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
        if not 0.0 <= warmup <= min(r_max_at, d_max_at) <= max(r_max_at, d_max_at) <= 1.0:
            raise ValueError(
                "the Batch Renorm schedule needs 0 <= warmup <= r_max_at, d_max_at <= 1, got "
                f"warmup={warmup}, r_max_at={r_max_at}, d_max_at={d_max_at}"
            )
        self.r_max_final = float(r_max)
        self.d_max_final = float(d_max)
        self.warmup = float(warmup)
        self.r_max_at = float(r_max_at)
        self.d_max_at = float(d_max_at)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))
        self.register_buffer("total_steps", torch.tensor(int(total_steps), dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max_final}, d_max={self.d_max_final}, "
            f"total_steps={int(self.total_steps)}"
        )

    def clip_limits(self, step: int | None = None) -> tuple[float, float]:
        """``(r_max, d_max)`` at ``step`` (default: the current step counter)."""
        t = int(self.num_batches_tracked) if step is None else int(step)
        total = max(int(self.total_steps), 1)

        def ramp(start: float, end: float, at: float) -> float:
            t0, t1 = self.warmup * total, at * total
            if t < t0:
                return start
            if t >= t1 or t1 <= t0:
                return end
            return start + (end - start) * (t - t0) / (t1 - t0)

        return ramp(1.0, self.r_max_final, self.r_max_at), ramp(
            0.0, self.d_max_final, self.d_max_at
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input(z)
        if not self.training:
            u = (z - channel_view(self.running_mean, z)) / channel_view(self.running_std, z)
            return self._affine(u)
        zg = self._microbatches(z)
        if zg is not None:
            return self._affine(self._ghost(zg).reshape(z.shape))
        var_b, mean_b = torch.var_mean(z, dim=batch_axes(z), correction=0)
        sigma_b = torch.sqrt(var_b + self.eps)
        r_max, d_max = self.clip_limits()
        with torch.no_grad():
            r = (sigma_b / self.running_std).clamp(1.0 / r_max, r_max)
            d = ((mean_b - self.running_mean) / self.running_std).clamp(-d_max, d_max)
        u = (z - channel_view(mean_b, z)) / channel_view(sigma_b, z)
        u = u * channel_view(r, z) + channel_view(d, z)
        self._ema_(self.running_mean, mean_b)
        self._ema_(self.running_std, sigma_b)
        self._step()
        return self._affine(u)

    def _ghost(self, zg: torch.Tensor) -> torch.Tensor:
        """Renormalize each microbatch of ``zg`` (G, g, C, ...) against the shared moving stats."""
        var_b, mean_b = torch.var_mean(zg, dim=group_axes(zg), correction=0, keepdim=True)
        sigma_b = torch.sqrt(var_b + self.eps)
        mu = channel_view(self.running_mean, zg[0])
        sigma = channel_view(self.running_std, zg[0])
        r_max, d_max = self.clip_limits()
        with torch.no_grad():
            r = (sigma_b / sigma).clamp(1.0 / r_max, r_max)
            d = ((mean_b - mu) / sigma).clamp(-d_max, d_max)
        u = (zg - mean_b) / sigma_b * r + d
        self._ema_(self.running_mean, mean_b.mean(dim=0).reshape(-1))
        self._ema_(self.running_std, sigma_b.mean(dim=0).reshape(-1))
        self._step()
        return u
