"""All experts of a layer as one grouped computation: E identical-structure experts run as grouped
convolutions over a ``[capacity, E * C, H, W]`` buffer (expert e's tokens in channel group e).

One kernel per layer of the expert instead of E, which is what makes small per-expert batches cheap. The
experts stay separate modules (their parameters are concatenated per step, so gradients, checkpoints and
expert parallelism see the same tensors); supported building blocks: ``Sequential``, ``Conv2d``,
``BatchNorm2d`` (statistics over each expert's valid slots only, as :class:`MaskedBatchNorm2d`), ``ReLU``,
``Identity`` and :class:`~harness.models.resnet_moe.NarrowBasicBlock`-style blocks (``conv1, bn1, conv2,
bn2, shortcut``). :func:`groupable` says whether a list of experts qualifies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

BASIC_BLOCK_PARTS = ("conv1", "bn1", "conv2", "bn2", "shortcut")


def _is_basic_block(module: nn.Module) -> bool:
    return all(hasattr(module, part) for part in BASIC_BLOCK_PARTS) and not isinstance(module, nn.Sequential)


def groupable(experts: Sequence[nn.Module]) -> bool:
    """Whether :func:`grouped_forward` can run these experts: same structure, supported modules only."""
    first = experts[0]
    if any(type(e) is not type(first) for e in experts):
        return False
    if isinstance(first, nn.Sequential):
        return all(len(e) == len(first) for e in experts) and all(
            groupable([e[i] for e in experts]) for i in range(len(first))
        )
    if isinstance(first, nn.Conv2d):
        return all(
            e.weight.shape == first.weight.shape
            and (e.bias is None) == (first.bias is None)
            and (e.stride, e.padding, e.dilation, e.groups)
            == (first.stride, first.padding, first.dilation, first.groups)
            and e.padding_mode == "zeros"
            for e in experts
        )
    if isinstance(first, nn.BatchNorm2d):
        # one eps and momentum for the group: masked_batch_norm takes them from the first expert
        return first.momentum is not None and all(
            e.num_features == first.num_features
            and e.affine
            and e.track_running_stats
            and (e.eps, e.momentum) == (first.eps, first.momentum)
            for e in experts
        )
    if isinstance(first, (nn.ReLU, nn.Identity)):
        return True
    if _is_basic_block(first):
        return all(groupable([getattr(e, part) for e in experts]) for part in BASIC_BLOCK_PARTS)
    return False


def grouped_forward(experts: Sequence[nn.Module], x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x: [S, E * C, H, W]`` (slot s of expert e in channel group e), ``valid: [S, E]`` bool (which slots
    hold a token; BatchNorm statistics use only those) -> ``[S, E * C_out, H', W']``."""
    first = experts[0]
    if isinstance(first, nn.Sequential):
        for i in range(len(first)):
            x = grouped_forward([e[i] for e in experts], x, valid)
        return x
    if isinstance(first, nn.Conv2d):
        weight = torch.cat([e.weight for e in experts])
        bias = torch.cat([e.bias for e in experts]) if first.bias is not None else None
        return F.conv2d(x, weight, bias, first.stride, first.padding, first.dilation, first.groups * len(experts))
    if isinstance(first, nn.BatchNorm2d):
        return _grouped_batch_norm(experts, x, valid)
    if isinstance(first, nn.ReLU):
        return torch.relu(x)
    if isinstance(first, nn.Identity):
        return x
    if _is_basic_block(first):
        part = lambda name: [getattr(e, name) for e in experts]  # noqa: E731
        out = torch.relu(grouped_forward(part("bn1"), grouped_forward(part("conv1"), x, valid), valid))
        out = grouped_forward(part("bn2"), grouped_forward(part("conv2"), out, valid), valid)
        return torch.relu(out + grouped_forward(part("shortcut"), x, valid))
    raise TypeError(f"cannot group {type(first).__name__} experts")


def _grouped_batch_norm(norms: Sequence[nn.BatchNorm2d], x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-expert BatchNorm on a grouped buffer: :func:`masked_batch_norm` in training, the running
    statistics in evaluation."""
    if norms[0].training:
        return masked_batch_norm(norms, x, valid)
    weight = torch.cat([n.weight for n in norms]).view(1, -1, 1, 1)
    bias = torch.cat([n.bias for n in norms]).view(1, -1, 1, 1)
    mean = torch.cat([n.running_mean for n in norms]).view(1, -1, 1, 1)
    var = torch.cat([n.running_var for n in norms]).view(1, -1, 1, 1)
    scale = weight * torch.rsqrt(var + norms[0].eps)
    return x * scale.to(x.dtype) + (bias - mean * scale).to(x.dtype)


def masked_batch_norm(norms: Sequence[nn.BatchNorm2d], x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Training-mode BatchNorm of G experts whose rows are partly padding: G BatchNorms with C channels
    each (same eps, affine and momentum), ``x: [S, G * C, H, W]`` (expert g in channel group g; G = 1 for
    one expert's slice), ``valid: [S, G]`` bool -> ``[S, G * C, H, W]``.

    Batch mean and biased variance over each expert's valid rows (x H x W) as ``F.batch_norm`` takes them;
    the running statistics (unbiased variance) and ``num_batches_tracked`` move only for experts with at
    least one valid row, as when the reference skips an expert that got no token. Padding rows leave as
    zeros, so a following bias-free convolution keeps them out of the next sums. Forward and backward are
    :class:`MaskedBatchNormFunction`.
    """
    groups, first = len(norms), norms[0]
    slots, channels = x.shape[0], x.shape[1] // groups
    mask = valid.to(x.dtype).view(slots, groups, 1, 1, 1)
    count = valid.sum(dim=0).float() * (x.shape[2] * x.shape[3])  # [G]
    weight = torch.stack([n.weight for n in norms]) if first.affine else None
    bias = torch.stack([n.bias for n in norms]) if first.affine else None
    out, mean, var = MaskedBatchNormFunction.apply(
        x.view(slots, groups, channels, *x.shape[2:]), mask, count, weight, bias, first.eps
    )
    with torch.no_grad():
        seen = (count > 0).view(-1, 1)
        exact = count.to(var.dtype)  # n / (n - 1) in float32 is off by ~1e-7 for float64 models
        unbiased = var * (exact / (exact - 1).clamp_min(1.0)).view(-1, 1)
        _update_running_stats(norms, seen, mean, unbiased)
    return out.view_as(x)


def _update_running_stats(
    norms: Sequence[nn.BatchNorm2d], seen: torch.Tensor, mean: torch.Tensor, unbiased_var: torch.Tensor
) -> None:
    """Move the G norms' running statistics as ``F.batch_norm`` does (``(1 - m) r + m x``), only where
    ``seen: [G, 1]`` bool; ``mean, unbiased_var: [G, C]``. A fixed handful of ops for all G experts (the
    stacked update, then one foreach copy per buffer kind): a loop over experts cost ~11 G ops per layer,
    about a third of a padded E=10 step's ops, each a kernel launch on a GPU."""
    momentum = norms[0].momentum
    for name, batch_value in (("running_mean", mean), ("running_var", unbiased_var)):
        buffers = [getattr(n, name) for n in norms]
        running = torch.stack(buffers)  # [G, C]
        moved = torch.add(running * (1 - momentum), batch_value.to(running.dtype), alpha=momentum)
        torch._foreach_copy_(buffers, list(torch.where(seen, moved, running).unbind(0)))
    torch._foreach_add_([n.num_batches_tracked for n in norms], list(seen.view(-1).long().unbind(0)))


class MaskedBatchNormFunction(torch.autograd.Function):
    """The normalisation of :func:`masked_batch_norm` with its gradient written out, so backward takes a
    few passes over the activations instead of autograd's one per composing op (and one full-size
    temporary each): ``x: [S, G, C, H, W]``, ``mask: [S, G, 1, 1, 1]`` (1 = valid row, x's dtype),
    ``count: [G]`` valid values per channel, ``weight, bias: [G, C]`` or None ->
    ``(out [S, G, C, H, W], mean [G, C], biased var [G, C])``; mean and var carry no gradient.

    With xhat the normalised input over the valid rows, g the output gradient (zeroed on padding) and n
    the count: dweight = sum(g xhat), dbias = sum(g), dx = weight rstd (g - sum(g) / n - xhat sum(g xhat) / n)
    on valid rows and 0 on padding, which is ``F.batch_norm``'s gradient over the valid rows alone. Sums
    accumulate in fp32 without an fp32 copy of x (bf16 under autocast).
    """

    @staticmethod
    def forward(ctx, x, mask, count, weight, bias, eps):  # type: ignore[override]
        groups, channels = x.shape[1], x.shape[2]
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 sums for bf16/fp32, fp64 for fp64
        masked = x * mask  # padding out of the sums
        denom = count.to(acc).clamp_min(1.0).view(-1, 1)
        mean = masked.sum(dim=(0, 3, 4), dtype=acc) / denom  # [G, C]
        var = (masked.square().sum(dim=(0, 3, 4), dtype=acc) / denom - mean.square()).clamp_min(0.0)
        rstd = torch.rsqrt(var + eps)
        scale = rstd if weight is None else rstd * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        view = (1, groups, channels, 1, 1)
        out = torch.addcmul(shift.view(view).to(x.dtype), masked, scale.view(view).to(x.dtype)).mul_(mask)
        ctx.save_for_backward(masked, mask, denom, mean, rstd, weight)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):  # type: ignore[override]
        masked, mask, denom, mean, rstd, weight = ctx.saved_tensors
        view = (1, masked.shape[1], masked.shape[2], 1, 1)
        grad = grad_out * mask  # padding rows took no part
        sum_grad = grad.sum(dim=(0, 3, 4), dtype=mean.dtype)  # [G, C]
        # sum(g * xhat) = rstd * (sum(g * x) - mean * sum(g)) over valid rows: no xhat tensor needed
        sum_grad_xhat = rstd * ((grad * masked).sum(dim=(0, 3, 4), dtype=mean.dtype) - mean * sum_grad)
        a = rstd if weight is None else weight * rstd
        b = -a * rstd * sum_grad_xhat / denom
        c = a * (rstd * sum_grad_xhat * mean - sum_grad) / denom
        grad_x = None
        if ctx.needs_input_grad[0]:
            # dx = a g + (b x + c) on valid rows, with g already 0 on padding
            grad_x = torch.addcmul(c.view(view).to(masked.dtype), masked, b.view(view).to(masked.dtype)).mul_(mask)
            grad_x.add_(grad.mul_(a.view(view).to(grad.dtype)))
        grad_weight = sum_grad_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[3] else None
        grad_bias = sum_grad.to(weight.dtype) if weight is not None and ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_weight, grad_bias, None
