"""rollout.chunked_logprobs against the plain computation (head matmul, float32 log-softmax, gather) on the same
inputs: values and both gradients, several chunk sizes (one row, ragged, everything in one chunk), a temperature,
fp32 and under CPU bf16 autocast, and the weight tied to an embedding."""
import pytest
import torch

from rollout.chunked_logprobs import rows_per_chunk, token_logprobs_chunked


def plain(hidden, weight, targets, temperature):
    logits = torch.nn.functional.linear(hidden, weight).float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def inputs(n=37, h=16, v=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(v, h, generator=g)).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g)       # a loss's weights on each logprob
    return hidden, weight, targets, upstream


def grads(fn, hidden, weight, targets, upstream, temperature):
    hidden.grad = weight.grad = None
    out = fn(hidden, weight, targets, temperature)
    (out * upstream).sum().backward()
    return out.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("chunk_rows", [1, 5, 37, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_equal_the_plain_path_in_fp32(chunk_rows, temperature):
    hidden, weight, targets, upstream = inputs()
    want = grads(plain, hidden, weight, targets, upstream, temperature)
    chunked = lambda h, w, t, T: token_logprobs_chunked(h, w, t, T, chunk_bytes=4 * w.shape[0] * chunk_rows)  # noqa: E731
    got = grads(chunked, hidden, weight, targets, upstream, temperature)
    for a, b, name in zip(got, want, ("logprobs", "grad hidden", "grad weight")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_under_bf16_autocast_it_follows_autocasts_rounding():
    """Under autocast the head's matmul runs in bf16 like autocast's linear: the values agree with the plain
    path under autocast far better than with the fp32 path (bf16 rounding of the logits is in both)."""
    hidden, weight, targets, upstream = inputs(n=64, h=32, v=257, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = grads(plain, hidden, weight, targets, upstream, 1.0)
        got = grads(lambda h, w, t, T: token_logprobs_chunked(h, w, t, T, chunk_bytes=4 * 257 * 10),
                    hidden, weight, targets, upstream, 1.0)
    fp32 = grads(plain, hidden, weight, targets, upstream, 1.0)
    assert (got[0] - want[0]).abs().max() < 1e-5          # the same bf16 logits, the same float32 softmax
    assert (fp32[0] - want[0]).abs().max() > 1e-4         # (bf16 rounding is visible at all)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)   # bf16 gradients, chunk sums in float32
    assert got[1].dtype == hidden.dtype and got[2].dtype == weight.dtype


def test_a_tied_weight_gets_the_gradient_of_both_uses():
    """An embedding used as the head too (tied): its gradient is the embedding's plus the head's, as with the
    plain path."""
    hidden, weight, targets, upstream = inputs(n=12, h=8, v=50, seed=2)
    ids = torch.randint(0, 50, (12,), generator=torch.Generator().manual_seed(3))

    def run(fn):
        weight.grad = None
        h = hidden.detach() + torch.nn.functional.embedding(ids, weight)
        (fn(h, weight, targets, 1.0) * upstream).sum().backward()
        return weight.grad.clone()
    torch.testing.assert_close(run(lambda h, w, t, T: token_logprobs_chunked(h, w, t, T, chunk_bytes=4 * 50 * 5)),
                               run(plain), rtol=1e-5, atol=1e-5)


def test_bad_input_is_refused_with_the_reason():
    hidden, weight, targets, _ = inputs()
    with pytest.raises(ValueError, match=r"hidden must be \[N, H\] and weight \[V, H\]"):
        token_logprobs_chunked(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError, match=r"targets must be \[N\]"):
        token_logprobs_chunked(hidden, weight, targets[:5])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs_chunked(hidden, weight, targets, 0.0)
    with pytest.raises(ValueError, match="chunk_bytes must be >= 1"):
        token_logprobs_chunked(hidden, weight, targets, 1.0, chunk_bytes=0)
    assert rows_per_chunk(151_936, 1 << 30) == 1766 and rows_per_chunk(10, 1) == 1


def test_backward_twice_on_a_retained_graph_gives_the_same_gradients():
    hidden, weight, targets, upstream = inputs(n=9, h=8, v=30, seed=4)
    out = token_logprobs_chunked(hidden, weight, targets)          # one chunk: its softmax kept for backward
    (out * upstream).sum().backward(retain_graph=True)
    first = hidden.grad.clone()
    hidden.grad = None
    (out * upstream).sum().backward()
    torch.testing.assert_close(hidden.grad, first)
