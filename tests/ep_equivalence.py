"""The expert-parallel invariant, runnable inside any 2-rank gloo process group (plain processes or Ray
Train workers): expert-parallel on W ranks equals one process on the union of their batches.

Not a test module itself (no ``test_`` prefix); ``test_parallel.py`` and ``test_ray_train.py`` run it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from harness.moe import (
    AuxWeights,
    LocalDispatcher,
    PaddedDispatcher,
    build_moe_layer,
    update_balance_biases,
    weighted_aux_losses,
)
from harness.moe.parallel import (
    Collective,
    ExpertPlacement,
    PaddedExpertParallelDispatcher,
    shard_experts,
    sync_gradients,
)

TOKENS_PER_RANK = 12
CHANNELS = 4
NUM_EXPERTS = 4


def _experts(num_experts: int) -> list[nn.Module]:
    # BatchNorm inside the experts: the owner sees every rank's tokens for its experts at once, so even
    # batch statistics match the single-process run.
    return [
        nn.Sequential(nn.Conv2d(CHANNELS, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 1))
        for _ in range(num_experts)
    ]


def _union_batch(world_size: int, steer: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(world_size * TOKENS_PER_RANK, CHANNELS, 5, 5, generator=g)
    if steer:
        x[:TOKENS_PER_RANK, 0] -= 3.0  # rank 0's tokens: channel 0 low, so the gate avoids the last expert
    return x


def _loss(layer_out, x: torch.Tensor, reduce=None) -> torch.Tensor:
    task = layer_out.output.pow(2).mean()
    load = 0.0 if layer_out.routing.method == "relu" else 0.3  # the config refuses the load loss with ReLU routing
    aux = weighted_aux_losses(layer_out.routing, x, AuxWeights(importance=0.5, load=load, kl_uniform=0.2), reduce)
    return task + sum(aux.values())


def equivalence_errors(
    k: int,
    capacity_factor: float | None = None,
    dispatch: str = "loop",
    num_experts: int = NUM_EXPERTS,
    steer: bool = True,
    routing: str = "top_k",
    bias_update_rate: float | None = None,
    **spec_options: Any,
) -> dict[str, float]:
    """Run both ways on this rank; return the max absolute differences (output, loss, gate and expert
    gradients, constraint state), how many tokens this rank sent to the avoided (last) expert and
    ``min_sent``, the fewest tokens any rank sent to any expert.

    ``steer``: rank 0's tokens avoid the last expert (an empty send in the all-to-all); without it every
    rank sends to every expert, so an owner receives its experts' rows interleaved by source rank.

    ``dispatch``: ``loop`` (the counted all-to-all), ``padded`` (the static-shape one, experts as the
    device's default runs them: on CPU each on its valid rows), ``padded_grouped`` (static, experts as
    grouped convolutions) or ``padded_masked`` (static, each expert on its whole slice with masked
    BatchNorms); the single-process reference always runs the reference loop. ``routing`` and
    ``bias_update_rate``: the router's method and auxiliary-loss-free bias (``bias``: the largest difference
    of the bias buffers after the step; under ReLU routing, of the L1 coefficients). ``spec_options``: more
    :class:`~harness.moe.MoESpec` fields (``shared_experts``: that many more experts, replicated)."""
    collective = Collective()
    rank, world = collective.rank, collective.world_size
    torch.manual_seed(0)
    experts = _experts(num_experts)
    # A shared expert is replicated: like any data-parallel BatchNorm, its own would normalise each rank's
    # batch alone, so here it has none (the whole-model tests fix BatchNorm statistics instead).
    shared = [
        nn.Sequential(nn.Conv2d(CHANNELS, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 1))
        for _ in range(spec_options.get("shared_experts", 0))
    ]
    layer = build_moe_layer(
        experts,
        CHANNELS,
        5,
        shared=shared,
        k=k,
        capacity_factor=capacity_factor,
        # the config refuses hard constraints with ReLU routing
        constraint=None if routing == "relu" else {"type": "relative_importance", "threshold": 0.5},
        routing=routing,
        bias_update_rate=bias_update_rate,
        **spec_options,
    )
    avoided = num_experts - 1  # owned by the last rank
    with torch.no_grad():
        if steer:  # the avoided expert likes channel 0, which rank 0's tokens lack
            layer.gate.fc.weight[avoided, 0] = 4.0
        else:  # a gate that tells tokens apart, so every rank's tokens reach every expert
            layer.gate.fc.weight.normal_(0.0, 3.0, generator=torch.Generator().manual_seed(2))
    stepped = bias_update_rate is not None or routing == "relu"
    initial_state = _step_state(layer).clone() if stepped else None
    reference = copy.deepcopy(layer)
    reference.dispatcher = LocalDispatcher()
    layer.dispatcher = (
        LocalDispatcher() if dispatch == "loop" else PaddedDispatcher(execution=dispatch.partition("_")[2] or None)
    )
    layer.train()
    reference.train()

    x_union = _union_batch(world, steer)
    ref_out = reference(x_union)
    ref_loss = _loss(ref_out, x_union)
    ref_loss.backward()

    shard_experts(layer, collective)
    assert isinstance(layer.dispatcher, PaddedExpertParallelDispatcher) == (dispatch != "loop")
    mine = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
    x = x_union[mine]
    out = layer(x)
    loss = _loss(out, x, reduce=collective.sum)
    loss.backward()
    sync_gradients(layer, collective, expert_parallel=True)
    second = None
    if stepped:  # the step's bias (or L1 coefficient) update, then a second forward that it steers
        update_balance_biases(reference)
        update_balance_biases(layer)
        with torch.no_grad():
            second = (layer(x).output - reference(x_union).output[mine]).abs().max().item()

    owned = ExpertPlacement(num_experts, world).local_experts(rank)
    global_loss = collective.sum_(loss.detach().clone()) / world
    errors = {
        "output": (out.output - ref_out.output[mine]).abs().max().item(),
        "loss": (global_loss - ref_loss.detach()).abs().item(),
        "dropped": abs(int(collective.sum_(out.routing.dropped.clone())) - int(ref_out.routing.dropped)),
        "constraint": 0.0
        if layer.constraint is None
        else (layer.constraint.running - reference.constraint.running).abs().max().item(),
        "sent_to_avoided": float(out.routing.dispatch_mask[:, avoided].sum()),
        "min_sent": float(collective.all_gather(out.routing.dispatch_mask.sum(dim=0)).min()),
        "reference_dropped": float(ref_out.routing.dropped),
        "bias": 0.0 if not stepped else (_step_state(layer) - _step_state(reference)).abs().max().item(),
        "bias_moved": 0.0 if not stepped else (_step_state(reference) - initial_state).abs().max().item(),
        "second_output": 0.0 if second is None else second,
    }
    pairs = list(zip(layer.gate.parameters(), reference.gate.parameters()))
    pairs += zip(layer.shared_experts.parameters(), reference.shared_experts.parameters())
    for local, global_id in enumerate(owned):
        pairs += zip(layer.experts[local].parameters(), reference.experts[global_id].parameters())
    # An expert that no rank gave a token has no gradient either way (sync_gradients leaves it None).
    grad = lambda p: p.grad if p.grad is not None else torch.zeros_like(p)  # noqa: E731
    grad_errors = [(grad(p) - grad(q)).abs().max().item() for p, q in pairs]
    errors["gradients"] = max(grad_errors)
    errors["expert_grads_checked"] = float(len(owned))
    return errors


def _step_state(layer: nn.Module) -> torch.Tensor:
    """The router state a training step moves: the balance bias, or ReLU routing's L1 coefficient."""
    router = layer.router
    return router.balance_bias if router.balance_bias is not None else router.l1_coefficient.reshape(1)


# (k, capacity_factor, dispatch, experts): top-1 and top-2 as the issue asks, and top-2 with a capacity
# limit tight enough to drop tokens, which must then be the same tokens as in the single process; each
# with the counted and the static-shape exchange, and 3 experts on 2 ranks (uneven: 2 + 1) for both; the
# static exchange with each way of running the owner's experts (the device default, grouped, masked).
CASES = [
    (1, None, "loop", 4),
    (2, None, "loop", 4),
    (2, 0.75, "loop", 4),
    (2, 0.75, "loop", 3),
    (1, None, "padded", 4),
    (2, 0.75, "padded", 4),
    (2, 0.75, "padded_grouped", 4),
    (2, 0.75, "padded_masked", 3),
]


def case_key(k: int, capacity_factor: float | None, dispatch: str, num_experts: int) -> str:
    """``k<k>_cf<cf>`` for the counted exchange with 4 experts, else with ``_<dispatch>_E<experts>``."""
    key = f"k{k}_cf{capacity_factor}"
    return key if (dispatch, num_experts) == ("loop", NUM_EXPERTS) else f"{key}_{dispatch}_E{num_experts}"


UNSTEERED = "k2_cfNone_unsteered"
# Today's routing methods (issue 22): expert choice over the union batch (each expert's top-C tokens of all
# ranks) with both exchanges, and auxiliary-loss-free bias balancing from the global batch's loads.
MODERN_CASES = {
    "expert_choice_loop": dict(k=2, capacity_factor=1.0, dispatch="loop", routing="expert_choice"),
    "expert_choice_padded": dict(k=2, capacity_factor=1.0, dispatch="padded", routing="expert_choice"),
    "bias_balancing_loop": dict(k=2, dispatch="loop", bias_update_rate=0.5),
    # Issue 34: ReMoE's L1 term from the global batch's statistics and its coefficient from the global
    # sparsity (a coefficient large enough to move the gradients), and a replicated shared expert.
    "relu_l1_loop": dict(k=2, dispatch="loop", routing="relu", relu_l1_initial=0.5),
    "shared_expert_loop": dict(k=2, dispatch="loop", shared_experts=1),
}


def all_cases() -> dict[str, dict[str, float]]:
    """:func:`equivalence_errors` for every case, keyed by :func:`case_key`, and the counted exchange
    without steering (key ``UNSTEERED``)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # experts, batches and reductions in float64: see TOLERANCE
    try:
        results = {case_key(*case): equivalence_errors(*case) for case in CASES}
        results[UNSTEERED] = equivalence_errors(2, None, "loop", NUM_EXPERTS, steer=False)
        for key, options in MODERN_CASES.items():
            results[key] = equivalence_errors(**options)
    finally:
        torch.set_default_dtype(previous)
    return results


# Every case runs in float64 (eps 2.2e-16): summation order leaves outputs and gradients ~1e-15 apart on
# any CPU, while a token sent to the wrong expert, a wrong scale or constraint state is off by > 1e-3.
TOLERANCE = 1e-9


def case_failures(key: str, per_rank: list[dict[str, dict[str, float]]]) -> list[str]:
    """Every way case ``key``'s figures from all ranks (``all_cases()`` of each rank, in rank order) break
    the invariant or fail to exercise what the case is for; empty when it holds. One checker for the plain
    processes of ``test_parallel`` and the Ray Train workers of ``test_ray_train``."""
    spec = {case_key(*case): case for case in CASES}.get(key)
    failures = []
    figures = ["output", "loss", "gradients", "constraint"]
    if key in MODERN_CASES:
        figures += ["bias", "second_output"]
    for rank, results in enumerate(per_rank):
        errors = results[key]
        failures += [f"rank {rank}: {name} off by {errors[name]:.3g}" for name in figures if errors[name] > TOLERANCE]
        if errors["dropped"] != 0:
            failures.append(f"rank {rank}: {errors['dropped']:.0f} more or fewer dropped assignments than one process")
        if spec is not None and errors["expert_grads_checked"] != ExpertPlacement(spec[3], len(per_rank)).sizes()[rank]:
            failures.append(f"rank {rank}: gradients of {errors['expert_grads_checked']:.0f} experts checked")
    first = per_rank[0][key]
    if spec is not None:  # the case exercises what it is for: drops with a capacity, an empty send
        if (first["reference_dropped"] > 0) != (spec[1] is not None):
            failures.append(f"one process dropped {first['reference_dropped']:.0f} assignments with capacity {spec[1]}")
        if first["sent_to_avoided"] != 0 or per_rank[-1][key]["sent_to_avoided"] == 0:
            failures.append("rank 0 must send nothing to the last rank's avoided expert, which the last rank must use")
    if key == UNSTEERED and min(r[key]["min_sent"] for r in per_rank) == 0:
        failures.append("some rank sent nothing to some expert: the interleaved regrouping is not exercised")
    options = MODERN_CASES.get(key, {})
    if (options.get("bias_update_rate") or options.get("routing") == "relu") and first["bias_moved"] == 0:
        failures.append("the balance bias (or ReLU routing's L1 coefficient) never moved")
    return failures
