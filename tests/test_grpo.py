import pytest
import torch

from lowmem_vt.grpo import LossCounts, completion_mask, group_advantages, grpo_loss


def test_group_advantages_normalises_per_group():
    r = torch.tensor([1.0, 0.0, 2.0, 1.0, 5.0, 5.0, 5.0, 5.0])
    a = group_advantages(r, 4)
    g1 = r[:4]
    expected = (g1 - g1.mean()) / (g1.std() + 1e-4)  # unbiased std, as the paper
    torch.testing.assert_close(a[:4], expected)
    assert torch.equal(a[4:], torch.zeros(4))  # equal rewards: zero advantage, no NaN
    assert torch.isfinite(a).all()
    assert torch.allclose(group_advantages(r, 4, scale_rewards=False)[:4], g1 - g1.mean())


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(7), 4)


def test_completion_mask_includes_first_eos_only():
    ids = torch.tensor([[5, 6, 0, 7, 0], [5, 6, 7, 8, 9], [0, 1, 1, 1, 1]])
    m = completion_mask(ids, eos_token_id=0)
    assert m.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def _direct_loss(logp, ref, adv, mask, beta):
    """The paper's formula written out token by token, independently of lowmem_vt.grpo."""
    total = 0.0
    for i in range(logp.shape[0]):
        s, n = 0.0, 0
        for t in range(logp.shape[1]):
            if mask[i, t]:
                ratio = torch.exp(logp[i, t] - logp[i, t].detach())
                k3 = torch.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1
                s = s + -(ratio * adv[i] - beta * k3)
                n += 1
        total = total + s / n
    return total / logp.shape[0]


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_match_direct_computation(beta):
    torch.manual_seed(0)
    B, T = 4, 6
    logp = (-torch.rand(B, T, dtype=torch.float64) * 3).requires_grad_()
    ref = -torch.rand(B, T, dtype=torch.float64) * 3
    adv = torch.randn(B, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.float64)
    loss, _ = grpo_loss(logp, mask, adv, None, ref, beta=beta, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo",
                        counts=LossCounts(B, float(mask.sum()), T))
    (g,) = torch.autograd.grad(loss, logp)
    logp2 = logp.detach().clone().requires_grad_()
    direct = _direct_loss(logp2, ref, adv, mask, beta)
    (g2,) = torch.autograd.grad(direct, logp2)
    torch.testing.assert_close(loss, direct)
    torch.testing.assert_close(g, g2)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "bnpo"])
def test_micro_batches_sum_to_full_batch(loss_type):
    torch.manual_seed(1)
    B, T = 6, 5
    logp = -torch.rand(B, T, dtype=torch.float64)
    ref = -torch.rand(B, T, dtype=torch.float64)
    adv = torch.randn(B, dtype=torch.float64)
    mask = (torch.rand(B, T) > 0.3).double()
    mask[:, 0] = 1
    counts = LossCounts(B, float(mask.sum()), T)
    kw = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.2, loss_type=loss_type, counts=counts)
    full, _ = grpo_loss(logp, mask, adv, None, ref, **kw)
    parts = sum(grpo_loss(logp[s], mask[s], adv[s], None, ref[s], **kw)[0] for s in (slice(0, 2), slice(2, 6)))
    torch.testing.assert_close(full, parts)


def test_clipped_ratio_stops_gradient_beyond_epsilon():
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.0, 0.0]])  # ratio e for token 0, 1 for token 1
    adv = torch.tensor([1.0])
    mask = torch.ones(1, 2)
    loss, stats = grpo_loss(logp, mask, adv, old, None, beta=0.0, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo",
                            counts=LossCounts(1, 2.0, 2))
    loss.backward()
    assert logp.grad[0, 0] == 0.0  # clipped: positive advantage, ratio above 1 + epsilon
    assert logp.grad[0, 1] != 0.0
    assert stats["clipped_tokens"] == 1.0


def test_high_entropy_mask_is_the_quantile_of_the_completion_tokens_and_runs_on_fake_tensors():
    """The tokens at or above the (1 - q) quantile of the active tokens' entropies (torch.quantile over them, as TRL's
    get_high_entropy_mask; tests/test_trl_oracle.py compares with TRL itself), none without an active token; and it runs
    under FakeTensorMode, where the memory simulator runs the loss (no data-dependent shape)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowmem_vt.grpo import high_entropy_mask

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        entropy = torch.rand(3, 7, generator=g)
        mask = (torch.rand(3, 7, generator=g) > 0.4).float()
        q = float(torch.rand(1, generator=g))
        active = entropy[mask.bool()]
        expected = ((entropy * mask) >= torch.quantile(active, 1 - q)) & mask.bool() if active.numel() else mask.bool()
        assert torch.equal(high_entropy_mask(entropy, mask, q), expected)
    assert not high_entropy_mask(torch.rand(2, 4), torch.zeros(2, 4), 0.2).any()
    with FakeTensorMode():
        out = high_entropy_mask(torch.empty(8, 1024), torch.ones(8, 1024), 0.2)
    assert out.shape == (8, 1024) and out.dtype == torch.bool
