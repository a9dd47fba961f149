import math

import pytest
import torch

from harness.moe import TopKRouter, expert_capacity
from harness.moe.routing import capacity_keep_mask


@pytest.mark.parametrize("k", [1, 2, 3])
def test_exactly_k_nonzeros_per_row_and_rows_sum_to_one(k):
    router = TopKRouter(in_channels=4, num_experts=5, k=k)
    routing = router(torch.randn(16, 5), torch.randn(16, 4, 2, 2))
    assert ((routing.gates > 0).sum(dim=1) == k).all()
    torch.testing.assert_close(routing.gates.sum(dim=1), torch.ones(16))
    torch.testing.assert_close(routing.probs.sum(dim=1), torch.ones(16))
    assert routing.dispatch_mask.sum() == 16 * k
    assert int(routing.dropped) == 0


def test_weights_are_softmax_over_top_k_logits_only():
    router = TopKRouter(4, 4, k=2)
    logits = torch.tensor([[3.0, 1.0, 0.0, -2.0]])
    routing = router(logits, torch.zeros(1, 4))
    expected = torch.softmax(torch.tensor([3.0, 1.0]), 0)
    torch.testing.assert_close(routing.gates[0, :2], expected)
    assert routing.indices.tolist() == [[0, 1]]


def test_expert_mask_excludes_switched_off_experts():
    router = TopKRouter(4, 4, k=2)
    mask = torch.tensor([True, False, False, False])
    routing = router(torch.tensor([[9.0, 1.0, 0.0, -1.0]] * 3), torch.zeros(3, 4), mask)
    assert (routing.gates[:, 0] == 0).all()
    assert (routing.indices != 0).all()


def test_noise_only_in_training_and_learnable():
    router = TopKRouter(4, 6, k=2, noisy=True)
    logits, x = torch.randn(32, 6), torch.randn(32, 4, 3, 3)
    router.train()
    a, b = router(logits, x), router(logits, x)
    assert a.noise_std is not None and a.noise_std.shape == (32, 6)
    assert not torch.equal(a.noisy_logits, b.noisy_logits)
    router.eval()
    c = router(logits, x)
    assert c.noisy_logits is None
    assert torch.equal(c.indices, logits.topk(2, dim=1).indices)


def test_capacity_formula():
    assert expert_capacity(10, 4, 2, 1.0) == 5
    assert expert_capacity(10, 4, 1, 1.25) == math.ceil(1.25 * 10 / 4)


def test_capacity_keeps_first_choices_before_second_choices():
    indices = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 2]])
    keep = capacity_keep_mask(indices, num_experts=3, capacity=2)
    # Expert 0's first choices come from tokens 0, 1, 3: token 3 overflows. Expert 1 takes token 2's
    # first choice, then token 0's second; token 1's second choice overflows, as does token 2's (expert 0).
    assert keep.tolist() == [[True, True], [True, False], [True, False], [False, True]]


def test_capacity_drops_and_counts_overflow():
    router = TopKRouter(4, 4, k=1, capacity_factor=1.0)  # capacity ceil(8/4) = 2
    logits = torch.tensor([[5.0, 0, 0, 0]] * 8)
    routing = router(logits, torch.zeros(8, 4))
    assert routing.dispatch_mask[:, 0].sum() == 2
    assert int(routing.dropped) == 6
    assert routing.dispatch_mask[:2, 0].all()  # batch order decides who fits


def test_k_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="k must be in 1..3"):
        TopKRouter(4, 3, k=4)
