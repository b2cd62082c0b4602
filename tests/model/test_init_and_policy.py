"""New-row initializations other than subword-mean, and freeze-policy patterns."""

import pytest
import torch

from megatron_adapt.model.freeze import FreezePolicy, apply_freeze_policy
from megatron_adapt.model.resize import new_rows


@pytest.mark.parametrize("method,max_offset", [("mean", 0.05), ("multivariate-normal", 1e-3)])
def test_rows_sit_at_the_mean_with_small_spread(method, max_offset):
    old = torch.randn(500, 32) * 0.5 + torch.linspace(-1, 1, 32)
    rows = new_rows(old, method, 50, generator=torch.Generator().manual_seed(0))
    offsets = (rows - old.mean(0)).norm(dim=1) / old.std(0).norm()
    assert offsets.max() < max_offset, f"{method}: rows stray {offsets.max():.2e} from the mean"
    assert offsets.min() > 0 and len({tuple(r.tolist()) for r in rows}) == 50, f"{method}: rows are not distinct"
    again = new_rows(old, method, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rows, again), f"{method}: not reproducible from the seed"


def test_unknown_method_and_policy_are_refused():
    with pytest.raises(ValueError, match="unknown init method 'zeros'"):
        new_rows(torch.randn(4, 2), "zeros", 1)
    with pytest.raises(ValueError, match="train='everything'"):
        FreezePolicy(train="everything")


def test_pattern_freezing_counts():
    model = torch.nn.Module()
    model.decoder = torch.nn.Module()
    model.decoder.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])
    trainable = apply_freeze_policy(model, FreezePolicy(train="all", freeze=["decoder.layers.0.*", "*.bias"]))
    assert trainable == 2 * 16, "expected the weights of layers 1 and 2 only"
    assert not model.decoder.layers[0].weight.requires_grad and model.decoder.layers[2].weight.requires_grad


def test_masked_sum_keeps_its_counts_on_the_losses_device():
    """The schedule adds the token count to tensors on the GPU: a count made on the host (no loss
    mask) crashed there. "meta" stands in for a device other than the host."""
    from megatron_adapt.model.loss import masked_sum

    losses = torch.empty(2, 5, device="meta")
    for mask in (None, torch.ones(2, 5, device="meta")):
        total, count = masked_sum(losses, mask)
        assert total.device == count.device == losses.device, f"mask {mask is not None}: count on {count.device}"
