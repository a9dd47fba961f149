"""The fast paths (padded, sorted) against the reference loop, the padded path's BatchNorm masking and its
freedom from host syncs, and the benchmark."""

import contextlib
import copy
import functools
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from harness.bench import count_ops, routing_stats, spread_routing
from harness.config import RunConfig
from harness.models import create_model
from harness.models.resnet_moe import expert_stage
from harness.moe import (
    LocalDispatcher,
    MaskedBatchNorm2d,
    PaddedDispatcher,
    SortedDispatcher,
    build_moe_layer,
    padded_slots,
)
from harness.moe.dispatch import combine_slots
from harness.moe.parallel import moe_layers
from harness.moe.routing import TopKRouter
from harness.moe.spec import MoESpec

FAST_DISPATCHERS = {
    "padded_grouped": lambda: PaddedDispatcher(execution="grouped"),
    "padded_masked": lambda: PaddedDispatcher(execution="masked"),
    "padded_valid_rows": lambda: PaddedDispatcher(execution="valid_rows"),
    "sorted": lambda: SortedDispatcher(),
}


def _train_two_steps(model: nn.Module, x: torch.Tensor):
    """Two steps of ``sum(logits^2)`` (the second sees the running statistics and parameters the first
    left; gradients not zeroed between models), then one more training-mode forward: its output."""
    for _ in range(2):
        model.zero_grad()
        model(x).logits.square().sum().backward()
    return model(x)


@functools.cache
def _reference_loop_run(k: int, capacity_factor: float | None):
    """The reference loop's model before and after :func:`_train_two_steps`, its last output and the
    batch: one run shared by the four fast dispatchers compared with it."""
    torch.manual_seed(0)
    reference = create_model(
        "resnet18_moe",
        num_classes=10,
        num_experts=4,
        k=k,
        expert_width=16,
        capacity_factor=capacity_factor,
        dispatch="loop",
    )
    initial = copy.deepcopy(reference)
    x = torch.randn(16, 3, 16, 16)  # 2x2 feature maps at stage 4: every dispatch path, a quarter of the cost
    return initial, reference, _train_two_steps(reference, x), x


@pytest.mark.parametrize("dispatch", list(FAST_DISPATCHERS))
@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5])
@pytest.mark.parametrize("k", [1, 2])
def test_fast_dispatch_trains_like_the_reference_loop(capacity_factor, k, dispatch):
    initial, reference, out_ref, x = _reference_loop_run(k, capacity_factor)
    fast = copy.deepcopy(initial)
    for layer in moe_layers(fast):
        layer.dispatcher = FAST_DISPATCHERS[dispatch]()
    out_fast = _train_two_steps(fast, x)
    torch.testing.assert_close(out_fast.logits, out_ref.logits, rtol=1e-5, atol=1e-5)
    assert int(out_fast.routings[0].dropped) == int(out_ref.routings[0].dropped)
    if capacity_factor == 0.5:
        assert int(out_ref.routings[0].dropped) > 0  # the case exercises drops
    for (name, p_ref), p_fast in zip(reference.named_parameters(), fast.parameters()):
        if p_ref.grad is not None:
            scale = p_ref.grad.abs().max().clamp_min(1e-6)
            assert (p_fast.grad - p_ref.grad).abs().max() / scale < 1e-4, name
    for (name, b_ref), b_fast in zip(reference.named_buffers(), fast.buffers()):
        torch.testing.assert_close(b_fast, b_ref, rtol=1e-4, atol=1e-5, msg=name)
    assert list(fast.state_dict()) == list(reference.state_dict())  # checkpoints load into either


@pytest.mark.parametrize("dispatch", list(FAST_DISPATCHERS))
def test_an_expert_without_tokens_keeps_its_running_statistics(dispatch):
    torch.manual_seed(0)
    experts = [expert_stage(4, 8) for _ in range(4)]
    router = TopKRouter(256, MoESpec(num_experts=4, k=2))
    dispatcher = FAST_DISPATCHERS[dispatch]()
    x = torch.randn(6, 256, 8, 8)
    logits = torch.randn(6, 4)
    routing = router(logits, x, expert_mask=torch.tensor([False, False, False, True]))
    assert not routing.dispatch_mask[:, 3].any()
    before = copy.deepcopy(experts[3].state_dict())
    out = dispatcher(x, routing, experts)
    assert torch.isfinite(out).all()
    for name, value in experts[3].state_dict().items():
        torch.testing.assert_close(value, before[name], msg=name)
    assert int(experts[0][0].bn1.num_batches_tracked) == 1
    # the masked padded path swaps in masked BatchNorms; grouped computes masked statistics itself;
    # valid_rows and sorted run each expert on exactly its tokens with its own BatchNorms
    assert isinstance(experts[0][0].bn1, MaskedBatchNorm2d) == (dispatch == "padded_masked")


def test_sorted_dispatch_gives_each_expert_exactly_its_tokens():
    """Each expert sees exactly the kept tokens routed to it, in token order, as the loop gathers them."""
    torch.manual_seed(0)
    seen: dict[int, torch.Tensor] = {}

    class Probe(nn.Module):
        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen[self.index] = x[:, 0, 0, 0].clone()
            return x * (self.index + 1)

    routing = TopKRouter(1, MoESpec(num_experts=5, k=2, capacity_factor=0.6))(
        torch.randn(12, 5), torch.randn(12, 1, 1, 1)
    )
    assert int(routing.dropped) > 0
    x = torch.arange(12.0).view(12, 1, 1, 1)  # the token's id as its value
    out = SortedDispatcher()(x, routing, [Probe(i) for i in range(5)])
    for i in range(5):
        expected = routing.dispatch_mask[:, i].nonzero().squeeze(1).float()
        assert torch.equal(seen.get(i, torch.empty(0)), expected), i
    combined = (routing.gates * routing.dispatch_mask * torch.arange(1.0, 6.0)).sum(dim=1) * torch.arange(12.0)
    torch.testing.assert_close(out.view(12), combined)


def test_padded_slots_give_each_kept_assignment_its_own_slot():
    routing = TopKRouter(4, MoESpec(num_experts=3, k=2, capacity_factor=0.5))(
        torch.randn(10, 3), torch.randn(10, 4, 2, 2)
    )
    capacity = 4  # ceil(0.5 * 2 * 10 / 3)
    slot, token_of_slot, valid = padded_slots(routing, capacity)
    kept = routing.dispatch_mask.gather(1, routing.indices)
    kept_slots = slot[kept]
    assert kept_slots.unique().numel() == kept_slots.numel()  # no two assignments share a slot
    assert (slot[~kept] == 3 * capacity).all()
    assert torch.equal(kept_slots % 3, routing.indices[kept])  # slot-major: row s * E + e
    tokens = torch.arange(10).view(-1, 1).expand_as(slot)
    assert torch.equal(token_of_slot[kept_slots], tokens[kept])
    assert torch.equal(valid.sum(dim=0), routing.dispatch_mask.sum(dim=0))


@pytest.mark.parametrize("execution, channels_last", [("grouped", False), ("grouped", True), ("masked", False)])
def test_padded_layer_runs_on_meta_tensors_so_it_never_reads_data_on_the_host(execution, channels_last):
    """Meta tensors carry shapes but no data: ``.nonzero()``, ``.item()`` or a data-dependent shape would
    raise, so a forward and backward that complete have no host-device synchronisation (the loop's does
    not complete, nor does the CPU's ``valid_rows`` execution, which reads the expert counts). Channels_last
    grouped experts take the pixel gather and read their outputs back by pixels."""
    with torch.device("meta"):
        torch.manual_seed(0)
        fast = build_moe_layer(
            [expert_stage(4, 8) for _ in range(4)], 256, 512, k=2, dispatch="padded", capacity_factor=1.0
        )
        reference = build_moe_layer([expert_stage(4, 8) for _ in range(4)], 256, 512, k=2, dispatch="loop")
        x = torch.randn(8, 256, 8, 8)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    fast.dispatcher.execution = execution
    out = fast.train()(x.requires_grad_())
    assert out.output.shape == (8, 512, 4, 4)
    out.output.sum().backward()
    assert x.grad.shape == x.shape
    x = x.detach()
    if channels_last:  # meta convolutions return NCHW: read a channels_last expert output back directly
        slot, _, _ = padded_slots(out.routing, 4)  # ceil(1.0 * 2 * 8 / 4) slots per expert
        expert_out = torch.randn(4, 4 * 512, 4, 4, device="meta").contiguous(memory_format=torch.channels_last)
        combined = combine_slots(expert_out.view(4, 4, 512, 4, 4), slot, out.routing.weights, slot < 16)
        assert combined.shape == (8, 512, 4, 4) and combined.is_contiguous(memory_format=torch.channels_last)
    # The loop finds each expert's tokens with nonzero(), whose size depends on the data: meta has no
    # kernel for it. valid_rows reads the per-expert counts back to the host (tolist()): meta has no data.
    with pytest.raises(NotImplementedError, match=r"torch\.nonzero\(\)"):
        reference.train()(x)
    fast.dispatcher.execution = "valid_rows"
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor; no data!"):
        fast(x)


def test_padded_execution_follows_the_device():
    """Grouped on CUDA (a host read would sync), each expert on its valid rows on CPU (where the read is
    free), masked on other devices; experts that cannot be grouped run masked."""
    experts = [expert_stage(4, 8) for _ in range(4)]
    default = PaddedDispatcher()
    assert default.execution_for(experts, torch.device("cuda")) == "grouped"
    assert default.execution_for(experts, torch.device("cpu")) == "valid_rows"
    assert default.execution_for(experts, torch.device("meta")) == "masked"
    linear = [nn.Linear(4, 4) for _ in range(4)]
    assert PaddedDispatcher(execution="grouped").execution_for(linear, torch.device("cpu")) == "masked"
    with pytest.raises(ValueError, match="execution: 'fast'"):
        PaddedDispatcher(execution="fast")


def test_valid_rows_with_every_slot_empty_changes_no_statistics():
    """No expert has a token: no output shape comes from a run, so the masked path answers, and no
    running statistic moves."""
    torch.manual_seed(0)
    experts = [expert_stage(4, 8) for _ in range(4)]
    before = [copy.deepcopy(e.state_dict()) for e in experts]
    out = PaddedDispatcher(execution="valid_rows").run_experts(
        experts, torch.randn(2, 4, 256, 8, 8), torch.zeros(2, 4, dtype=torch.bool)
    )
    assert out.shape == (2, 4, 512, 4, 4) and torch.isfinite(out).all()
    for expert, state in zip(experts, before):
        for name, value in expert.state_dict().items():
            torch.testing.assert_close(value, state[name], msg=name)


def test_masked_batchnorm_without_mask_is_batchnorm():
    bn = nn.BatchNorm2d(3)
    masked = MaskedBatchNorm2d.from_batchnorm(copy.deepcopy(bn))
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(masked(x), bn(x))
    masked.valid = torch.tensor([True, True, False, False])
    y = masked(x)
    torch.testing.assert_close(y[:2], nn.BatchNorm2d(3)(x[:2]), rtol=1e-5, atol=1e-5)
    assert (y[2:] == 0).all()


@pytest.mark.parametrize("affine", [True, False])
def test_masked_batch_norm_gradient_is_exact(affine):
    """The hand-written backward of the masked BatchNorm against finite differences (float64), with an
    expert that has no valid row and one with a single valid row."""
    from harness.moe.grouped import MaskedBatchNormFunction

    torch.manual_seed(0)
    valid = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    mask = valid.double().view(5, 3, 1, 1, 1)
    count = valid.sum(dim=0).double() * 3 * 2
    x = torch.randn(5, 3, 4, 3, 2, dtype=torch.double, requires_grad=True)
    params = [torch.randn(3, 4, dtype=torch.double, requires_grad=True) for _ in range(2)] if affine else [None, None]

    def normalise(x, *weight_bias):
        return MaskedBatchNormFunction.apply(x, mask, count, *(weight_bias or params), 1e-5)[0]

    assert torch.autograd.gradcheck(normalise, (x, *params) if affine else (x,))
    out = normalise(x)
    assert (out[~valid] == 0).all()  # padding rows leave as zeros


def test_masked_batch_norm_takes_as_many_ops_for_ten_experts_as_for_one():
    """Every op of the masked BatchNorm (statistics, normalisation, running-statistics update, backward) is
    a GPU kernel launch: their number must not grow with the experts it normalises together."""
    from harness.moe.grouped import masked_batch_norm

    def ops(groups: int) -> int:
        torch.manual_seed(0)
        norms = [nn.BatchNorm2d(8) for _ in range(groups)]
        x = torch.randn(6, groups * 8, 4, 4, requires_grad=True)
        valid = torch.rand(6, groups) > 0.3
        counts = count_ops(lambda: masked_batch_norm(norms, x, valid).square().sum().backward())
        assert all(n.num_batches_tracked == int(valid[:, g].any()) for g, n in enumerate(norms))
        return sum(counts.values())

    assert ops(1) == ops(10) < 80


def test_experts_with_different_batchnorm_settings_are_not_grouped():
    """Grouped experts share one eps and momentum (the first expert's): others run one by one."""
    from harness.moe.grouped import groupable

    experts = [expert_stage(4, 8) for _ in range(3)]
    assert groupable(experts)
    experts[2][1].bn1.momentum = 0.2
    assert not groupable(experts)
    experts[2][1].bn1.momentum = experts[0][1].bn1.momentum
    experts[1][0].bn2.eps = 1e-3
    assert not groupable(experts)


def test_count_ops_counts_kernels_not_views_or_allocations():
    x = torch.randn(4, 3)
    counts = count_ops(lambda: (torch.empty(2), x.view(12), x.t().relu(), x.sum()))
    assert dict(counts) == {"relu.default": 1, "sum.default": 1}


def _padded_stage2_model(execution: str, channels_last: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(
        "resnet18_moe",
        num_classes=10,
        num_experts=4,
        k=2,
        position=2,
        expert_width=8,
        capacity_factor=1.0,
        dispatch="padded",
    )
    for layer in moe_layers(model):
        layer.dispatcher.execution = execution
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _saved_conv_inputs(
    output: torch.Tensor, row_shape: tuple[int, ...], max_rows: int
) -> list[torch.autograd.graph.Node]:
    """The convolution nodes of ``output``'s graph whose saved input has rows of ``row_shape``, at most
    ``max_rows`` of them."""
    found, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "ConvolutionBackward0":
            saved = node._saved_input.shape
            if tuple(saved[1:]) == row_shape and saved[0] <= max_rows:
                found.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


@pytest.mark.parametrize(
    "execution, channels_last", [("grouped", False), ("grouped", True), ("masked", False), ("valid_rows", False)]
)
def test_padded_slot_buffer_is_saved_as_its_gather_and_gradients_are_unchanged(execution, channels_last):
    """The experts' first convolutions save the slot buffer (or their slice of it) as the gather it came
    from: each read in backward gathers it again (a new tensor, equal values), so the buffer is not kept
    from forward to backward; gradients are bit for bit those of keeping it (the recipe is off inside
    other saved-tensor hooks). Channels_last grouped experts gather pixels, the same way."""
    images = torch.randn(8, 3, 32, 32)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    model = _padded_stage2_model(execution, channels_last)
    output = model(images)
    logits = output.logits
    capacity = 4  # ceil(1.0 * 2 * 8 / 4) slots per expert, fewer than the 8 rows the dense convolutions see
    row_shape = (4 * 64, 32, 32) if execution == "grouped" else (64, 32, 32)
    convs = _saved_conv_inputs(logits, row_shape, capacity)
    # conv1 and the shortcut's conv: grouped, or of each expert (valid_rows: each expert that got a token)
    busy = int((output.routings[0].dispatch_mask.sum(0) > 0).sum())
    assert len(convs) == {"grouped": 2, "masked": 8, "valid_rows": 2 * busy}[execution]
    for conv in convs:
        first, again = conv._saved_input, conv._saved_input
        assert first.data_ptr() != again.data_ptr() and torch.equal(first, again)
        assert first.is_contiguous(memory_format=torch.channels_last) == channels_last
    logits.square().sum().backward()
    recipe_grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]  # idle experts: None

    kept = _padded_stage2_model(execution, channels_last)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # the recipe steps aside
        kept_logits = kept(images).logits
    kept_convs = _saved_conv_inputs(kept_logits, row_shape, capacity)
    assert kept_convs[0]._saved_input.data_ptr() == kept_convs[0]._saved_input.data_ptr()
    kept_logits.square().sum().backward()
    assert torch.equal(kept_logits, logits)
    assert all(
        (p.grad is None and g is None) or torch.equal(p.grad, g) for p, g in zip(kept.parameters(), recipe_grads)
    )


class _LayoutLog(TorchDispatchMode):
    """Records the layout of each convolution's input and the size of each copy dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_inputs_channels_last: list[bool] = []
        self.copied: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if name == "convolution":
            self.conv_inputs_channels_last.append(args[0].is_contiguous(memory_format=torch.channels_last))
        elif name in ("clone", "copy_", "_to_copy", "contiguous"):
            self.copied.append(args[0].numel())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("position", [1, 2])
def test_grouped_experts_on_channels_last_train_like_the_loop_without_copies(position):
    """CUDA runs the model channels_last with grouped experts. The slot buffer is gathered channels_last
    and the combine keeps that layout, so every convolution of the step sees a channels_last input, the
    MoE stage hands the next one channels_last, and no copy of an activation is made (a row gather gave
    NCHW buffers, and flattening the experts' channels_last outputs copied them). Results are the loop's,
    in float64 (float32 rounding differs by up to ~1e-3 of a gradient at these stages' 32x32 sums)."""
    torch.manual_seed(0)
    reference = create_model(
        "resnet18_moe",
        num_classes=10,
        num_experts=4,
        k=2,
        position=position,
        expert_width=8,
        capacity_factor=1.0,
        dispatch="loop",
    )
    reference = reference.to(torch.float64, memory_format=torch.channels_last)
    fast = copy.deepcopy(reference)
    for layer in moe_layers(fast):
        layer.dispatcher = PaddedDispatcher(execution="grouped")
    stage_outputs = []
    fast.stages[position - 1].register_forward_hook(lambda module, args, out: stage_outputs.append(out.output))
    x = torch.randn(16, 3, 16, 16, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        for model in (reference, fast):
            model.zero_grad()
            log = _LayoutLog()
            with log:
                model(x).logits.square().sum().backward()
    # log: the fast model's second step
    assert all(log.conv_inputs_channels_last) and len(log.conv_inputs_channels_last) >= 20
    smallest_activation = 16 * 512 * 4 * 4  # layer4's output
    assert [n for n in log.copied if n >= smallest_activation] == []
    assert stage_outputs[-1].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(x).logits, reference(x).logits, rtol=1e-10, atol=1e-10)
    for (name, p_ref), p_fast in zip(reference.named_parameters(), fast.parameters()):
        if p_ref.grad is not None:
            torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-9, atol=1e-10, msg=name)
    for (name, b_ref), b_fast in zip(reference.named_buffers(), fast.buffers()):
        torch.testing.assert_close(b_fast, b_ref, rtol=1e-10, atol=1e-10, msg=name)


def test_gather_changed_in_place_is_saved_as_it_is():
    """A saved tensor whose values the gather no longer gives (the buffer was changed in place before it
    was saved) is kept as it is: gradients equal those of keeping everything. (The padded experts cannot
    do this: slices from ``unbind`` refuse in-place changes, grouped experts run out of place.)"""
    from harness.moe.dispatch import saved_as_gather

    torch.manual_seed(0)
    source = torch.randn(6, 3, 5, 5)
    index = torch.tensor([5, 0, 0, 2, 3, 1, 4, 4])
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    grads = []
    for hooks in (contextlib.nullcontext(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)):
        x = source.clone().requires_grad_()
        with hooks:
            gathered = x.index_select(0, index)
            with saved_as_gather(gathered, x, index):
                out = torch.nn.functional.conv2d(gathered.relu_(), weight, padding=1)
        grads.append(torch.autograd.grad(out.square().sum(), [x, weight]))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_padded_slot_buffer_is_not_in_a_steps_tensor_memory():
    """The count of :func:`harness.bench.tensor_memory` (stage 2, k=2, batch 16, bf16): keeping the slot
    buffer for backward (as inside other saved-tensor hooks) costs its size in activations, 32 slots of
    the stage's bf16 input [64, 32, 32]; saved as its gather, it costs nothing."""
    from harness.bench import Case, tensor_memory

    case = Case(
        "E4_k2_L2",
        "resnet18_moe",
        dict(
            num_experts=4,
            k=2,
            position=2,
            expert_width=8,
            dispatch="padded",
            capacity_factor=1.0,
            noisy=True,
        ),
    )
    recipe = tensor_memory(case, batch_size=16, with_ops=False)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        kept = tensor_memory(case, batch_size=16, with_ops=False)
    buffer_mib = 32 * 64 * 32 * 32 * 2 / 2**20
    assert kept["activations"] - recipe["activations"] == pytest.approx(buffer_mib, rel=0.01)


def test_channels_last_step_keeps_no_more_tensors_than_nchw():
    """The count of :func:`harness.bench.tensor_memory` (stage 1, k=2, batch 16, bf16) channels_last, as
    CUDA runs it, against NCHW: the same tensors but the indices of the two pixel gathers, slots and
    outputs (S x E and N x k rows of H x W longs each). Flattening the experts' channels_last outputs used
    to keep a copy of them: +4 MiB here, 8% of the step at the GPU's batch of 512."""
    from harness.bench import Case, tensor_memory

    case = Case(
        "E4_k2_L1",
        "resnet18_moe",
        dict(
            num_experts=4,
            k=2,
            position=1,
            expert_width=8,
            dispatch="padded",
            capacity_factor=1.0,
            noisy=True,
        ),
    )
    nchw = tensor_memory(case, batch_size=16, channels_last=False, with_ops=False)
    channels_last = tensor_memory(case, batch_size=16, with_ops=False)
    indices_mib = 2 * 32 * 32 * 32 * 8 / 2**20  # 32 slots (and 16 x 2 assignments) of 32 x 32 pixels
    assert channels_last["total"] - nchw["total"] <= indices_mib * 1.01


def test_padded_layer_refuses_backward_after_its_input_changed_in_place():
    layer = build_moe_layer(
        [expert_stage(4, 8) for _ in range(4)], 256, 512, k=2, dispatch="padded", capacity_factor=1.0
    )
    x = torch.randn(8, 256, 8, 8, requires_grad=True)
    source = x * 1.0  # a non-leaf input the caller could modify
    out = layer.train()(source).output
    source.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


@pytest.mark.parametrize("execution", ["grouped", "masked", "valid_rows"])
def test_padded_combine_keeps_no_gathered_copy_of_the_expert_outputs(execution):
    """The weights' gradient needs the expert outputs; the padded combine takes them from the rows the
    experts' last ReLU keeps, so autograd saves no extra ``[N, k, C, H, W]`` gather of them (k=2 at stage 1:
    6% of the saved activations)."""
    torch.manual_seed(0)
    model = create_model(
        "resnet18_moe",
        num_classes=10,
        num_experts=4,
        k=2,
        position=1,
        expert_width=8,
        capacity_factor=1.0,
        dispatch="padded",
    )
    for layer in moe_layers(model):
        layer.dispatcher.execution = execution
    shapes = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(torch.randn(8, 3, 32, 32)).logits.sum().backward()
    assert (8, 64, 32, 32) in shapes  # the hook sees the stage's activations
    assert (8, 2, 64, 32, 32) not in shapes


def test_repeated_bench_runs_report_the_median_ratio_and_its_range():
    from harness.bench import Row, format_table, merge_repeats

    def run(speed: float, dense: float) -> list[Row]:
        return [
            Row("dense", "eager", dense, 1.0, 100.0, 1.0, 120.0),
            Row("moe", "eager", speed, speed / dense, 110.0, 1.1, 130.0, ops_per_step=500),
        ]

    later = run(9.5, 9.0)
    later[1].peak_mem_mib = 900.0  # a later run's peak RSS counts what earlier cases left resident
    merged = merge_repeats([run(11.0, 10.0), run(8.0, 10.0), later])
    dense, moe = merged
    assert moe.peak_mem_mib == 110.0  # memory: the first run's
    assert (dense.ratio_vs_dense, dense.ratio_min, dense.ratio_max, dense.repeats) == (1.0, 1.0, 1.0, 3)
    assert moe.images_per_s == 9.5 and moe.ratio_vs_dense == pytest.approx(9.5 / 9.0)  # the median run's
    assert (moe.ratio_min, moe.ratio_max) == (pytest.approx(0.8), pytest.approx(1.1))
    assert "| moe | eager | 10 | 1.06 (0.80-1.10) |" in format_table(merged)
    assert merge_repeats([run(11.0, 10.0)])[1].ratio_min == pytest.approx(1.1)  # one run: no range shown
    assert "(" not in format_table(merge_repeats([run(11.0, 10.0)]))


def test_bench_times_the_cases_of_one_moe_layer_in_turns_each_group_with_its_own_dense():
    from harness.bench import case_groups, classification_cases, interleaved_step_seconds

    groups = case_groups(classification_cases(full=False))
    assert all(group[0].name == "dense" for group in groups)
    names = [[case.name for case in group[1:]] for group in groups]
    assert len(groups) == 8 and sum(map(len, names)) == len(classification_cases(full=False)) - 1
    assert next(group for group in names if group[0].startswith("moe_E4_k2_L4")) == [
        f"moe_E4_k2_L4_{d}" for d in ("loop", "sorted", "loop_cf1", "padded_cf1", "padded", "padded_cf1_w192")
    ]
    assert all(len({"_".join(name.split("_")[:4]) for name in group}) == 1 for group in names)  # one MoE layer each
    assert case_groups([classification_cases(full=False)[0]]) == [[classification_cases(full=False)[0]]]

    calls: list[str] = []
    seconds = interleaved_step_seconds(
        [lambda name=name: calls.append(name) for name in "abc"], steps=6, sync=lambda: calls.append("|")
    )
    # three rounds of two steps per case, each round starting one case later: drift hits every case alike
    assert "".join(calls).replace("||", "|") == "|aa|bb|cc|bb|cc|aa|cc|aa|bb|"
    assert len(seconds) == 3


def test_interleaved_timing_reports_each_runs_median_block_per_step(monkeypatch):
    """A clock that only the steps move: each run's figure is the median of its blocks' seconds per step
    (a stall in one block is dropped), not the mean, the first or the last block."""
    from harness.bench import common, interleaved_step_seconds

    clock = [0.0]
    monkeypatch.setattr(common, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    # seconds per step of each run in its 1st, 2nd and 3rd block (in time); medians 2, 4, 5, chosen to
    # differ from each run's mean (4.33, 12.33, 4), first block (10, 3, 6) and last block (1, 30, 1)
    cost = {"a": [10.0, 2.0, 1.0], "b": [3.0, 4.0, 30.0], "c": [6.0, 5.0, 1.0]}
    done = dict.fromkeys(cost, 0)

    def step(name: str) -> None:
        clock[0] += cost[name][done[name] // 2]  # 6 steps in 3 blocks: 2 steps per block
        done[name] += 1

    seconds = interleaved_step_seconds([functools.partial(step, name) for name in cost], steps=6, sync=lambda: None)
    assert seconds == [2.0, 4.0, 5.0]
    assert done == {"a": 6, "b": 6, "c": 6}


@pytest.mark.ray(cluster=False)
def test_bench_runs_on_cpu_and_writes_its_table(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness.bench",
            "--device",
            "cpu",
            "--only",
            "E4_k2_L4_(loop|sorted|padded_cf1)$",
            "--batch-size",
            "4",
            "--steps",
            "1",
            "--skip",
            "epoch",
            "--skip",
            "detection",
            "--skip",
            "coco_eval",
            "--memory-batch-size",
            "8",
            "--small-cnn-images",
            "1024",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    cases = {row["case"]: row for row in result["classification"]}
    dispatches = {"loop", "sorted", "padded_cf1"}  # the reference, a host-sync path, a static one
    assert set(cases) == {"dense"} | {f"moe_E4_k2_L4_{d}" for d in dispatches}
    assert cases["dense"]["ratio_vs_dense"] == 1.0 and cases["dense"]["dropped"] is None
    # one run (merging repeats is tested on its own): the ratio's range is the ratio
    assert result["repeat"] == 1 and all(row["repeats"] == 1 for row in cases.values())
    assert all(row["ratio_min"] == row["ratio_vs_dense"] == row["ratio_max"] for row in cases.values())
    assert cases["dense"]["ratio_min"] == cases["dense"]["ratio_max"] == 1.0
    # each case against the reference loop it was timed in turns with
    assert cases["dense"]["ratio_vs_loop"] is None and cases["moe_E4_k2_L4_loop"]["ratio_vs_loop"] == 1.0
    assert all(row["ratio_vs_loop"] > 0 for name, row in cases.items() if name != "dense")
    assert all(
        row["images_per_s"] > 0 and row["warmup_peak_mem_mib"] >= row["peak_mem_mib"] > 0 for row in cases.values()
    )
    # the routing each MoE case ran under: drops only with a capacity factor
    assert cases["moe_E4_k2_L4_loop"]["dropped"] == 0 and cases["moe_E4_k2_L4_loop"]["max_load"] >= 1
    assert 0 <= cases["moe_E4_k2_L4_padded_cf1"]["dropped"] < 1
    assert "| moe_E4_k2_L4_padded_cf1 | eager |" in proc.stdout
    # kernel-launching ops of one step: an MoE step launches more than the dense one
    assert all(
        row["ops_per_step"] > cases["dense"]["ops_per_step"] > 100 for name, row in cases.items() if name != "dense"
    )
    # both expert-parallel exchanges trained on two spawned gloo ranks
    ep = result["expert_parallel"]
    assert ep["ranks"] == 2 and ep["loop_images_per_s"] > 0 and ep["padded_images_per_s"] > 0
    assert "static exchange" in proc.stdout
    # tensor memory of the cases without host reads, counted on fake tensors at the GPU-style batch
    memory = {row["case"]: row for row in result["memory"]}
    assert set(memory) == {"dense", "moe_E4_k2_L4_padded_cf1"}
    assert memory["dense"]["total_vs_dense"] == 1.0 and memory["dense"]["batch_size"] == 8
    assert "| moe_E4_k2_L4_padded_cf1 | 19.0 |" in proc.stdout
    assert memory["moe_E4_k2_L4_padded_cf1"]["ops_per_step"] > memory["dense"]["ops_per_step"] > 100
    # the small-CNN epoch, three ways, on the first 1024 training images (the real MNIST or generated ones)
    small = result["small_cnn"]
    assert small["train_images"] == 1024 and small["val_images"] == 170 and small["speedup"] > 0
    assert set(small["epochs"]) == {"plain", "harness modules", "harness stacked"}


def test_tensor_memory_counts_parameters_adam_and_padding_slots():
    """The fake-tensor count of :func:`harness.bench.tensor_memory` adds up: fp32 parameters, gradients of
    the same size, Adam's two moments, and more activations when every expert gets a slot per image."""
    from harness.bench import Case, tensor_memory

    options = dict(num_experts=4, k=2, position=4, expert_width=16, dispatch="padded", noisy=True)
    capped = tensor_memory(
        Case("cf1", "resnet18_moe", options | {"capacity_factor": 1.0}), batch_size=16, with_ops=False
    )
    uncapped = tensor_memory(Case("all", "resnet18_moe", options), batch_size=16, with_ops=False)
    params = sum(p.numel() for p in create_model("resnet18_moe", num_classes=100, **options).parameters())
    assert capped["parameters_m"] == pytest.approx(params / 1e6)
    assert capped["parameters"] == pytest.approx(4 * params / 2**20, rel=1e-3)
    assert capped["gradients"] == pytest.approx(capped["parameters"], rel=1e-3)
    assert capped["optimizer_state"] == pytest.approx(2 * capped["parameters"], rel=1e-2)
    parts = sum(
        capped[kind]
        for kind in ("parameters", "gradients", "optimizer_state", "activations", "temporaries", "buffers", "other")
    )
    assert capped["total"] == pytest.approx(parts, rel=1e-6)
    # 16 slots per expert instead of ceil(2 * 16 / 4) = 8: more expert activations, the same parameters
    assert uncapped["activations"] > capped["activations"] and uncapped["parameters"] == capped["parameters"]


def test_bench_routes_a_fresh_model_like_a_balanced_one():
    """A fresh gate sends random images to few experts; the bench spreads them over all of them."""
    torch.manual_seed(0)
    model = create_model("resnet18_moe", num_classes=10, num_experts=10, k=1, expert_width=8, noisy=True)
    images = torch.randn(64, 3, 32, 32)
    model.train()
    fresh = routing_stats(model, images)
    spread_routing(model)
    spread = routing_stats(model, images)
    assert spread["dropped"] == fresh["dropped"] == 0
    # the busiest expert's tokens over the mean (6.4): 18 fresh, 8 spread (seed 0; uniform at random: ~10)
    assert 1 <= spread["max_load"] < 1.8 < fresh["max_load"]
    assert model(images).routings[0].dispatch_mask.any(dim=0).sum() >= 8


@pytest.mark.parametrize(
    "dispatch, capacity_factor, expected",
    [
        ("auto", None, SortedDispatcher),
        ("auto", 1.0, PaddedDispatcher),
        ("loop", 1.0, LocalDispatcher),
        ("padded", None, PaddedDispatcher),
        ("sorted", None, SortedDispatcher),
        ("sorted", 1.0, SortedDispatcher),
        ("loop", None, LocalDispatcher),
    ],
)
def test_config_dispatch_names_the_dispatcher(dispatch, capacity_factor, expected):
    config = RunConfig.model_validate(
        {
            "model": {"name": "resnet18_moe"},
            "data": {"name": "synthetic_cifar"},
            "moe": {"dispatch": dispatch, "capacity_factor": capacity_factor},
        }
    )
    model = create_model(
        "resnet18_moe",
        num_classes=10,
        expert_width=8,
        dispatch=config.moe.dispatch,
        capacity_factor=config.moe.capacity_factor,
    )
    assert [type(layer.dispatcher) for layer in moe_layers(model)] == [expected]


def test_sorted_dispatch_is_the_loop_bit_for_bit_on_cpu():
    """Same expert calls on the same rows in the same order: outputs and gradients are identical, not close."""
    torch.manual_seed(0)
    reference = create_model("resnet18_moe", num_classes=10, num_experts=6, k=2, expert_width=16, dispatch="loop")
    fast = copy.deepcopy(reference)
    for layer in moe_layers(fast):
        layer.dispatcher = SortedDispatcher()
    x = torch.randn(16, 3, 32, 32)
    outputs = []
    for model in (reference, fast):
        out = model(x).logits
        out.square().sum().backward()
        outputs.append(out)
    assert torch.equal(outputs[0], outputs[1])
    for (name, p_ref), p_fast in zip(reference.named_parameters(), fast.parameters()):
        assert (p_ref.grad is None) == (p_fast.grad is None), name
        assert p_ref.grad is None or torch.equal(p_ref.grad, p_fast.grad), name


class _OtherRankRoutesElsewhere:
    """Rank 0 of 2 in data parallelism, whose peer routed its N tokens to the last expert: only the
    all-gather the router's global capacity needs (a stand-in for the process group, not the thing tested)."""

    rank, world_size = 0, 2

    def all_gather(self, tensor):
        other = torch.zeros_like(tensor)
        other[:, -1] = tensor.sum(dim=1)  # the peer's counts [k, E], all on the last expert
        return torch.stack([tensor, other])


def test_padded_dispatch_keeps_every_token_the_global_capacity_admits():
    """Under data parallelism the capacity ``ceil(cf * k * W * N / E)`` holds over all ranks, so one rank
    may keep more than its local share for an expert; the padded buffer must hold them all (it once
    dropped the excess silently, uncounted)."""
    torch.manual_seed(0)
    experts = [nn.Conv2d(4, 4, 1) for _ in range(4)]
    router = TopKRouter(4, MoESpec(num_experts=4, k=1, capacity_factor=1.0))
    logits = torch.zeros(8, 4)
    logits[:, 0] = 5.0  # every local token picks expert 0: local share 2 slots, global capacity 4
    routing = router(logits, torch.zeros(8, 4, 1, 1), collective=_OtherRankRoutesElsewhere())
    assert int(routing.dispatch_mask[:, 0].sum()) == 4 and int(routing.dropped) == 4
    x = torch.randn(8, 4, 3, 3)
    expected = LocalDispatcher()(x, routing, experts)
    for dispatch, make in FAST_DISPATCHERS.items():
        torch.testing.assert_close(make()(x, routing, experts), expected, msg=dispatch)
