"""Replaying the policy's inference passes (vla.graphs): the buffer handling around a CUDA graph.

These run on the CPU with `EagerRecorder`, whose replay reruns the function on the static buffers and
overwrites the static outputs, as a CUDA graph replay does; the capture itself is measured by
`bench/gpu.py` on a GPU. What is checked here: graphed sampling equals eager sampling exactly (new
inputs are bound, unchanged ones are not copied again, outputs do not alias each other), gradients
bypass the graphs, the cache's bounds, a failed capture falls back to the eager path, and the captured
passes never read a tensor's value on the host (which a CUDA graph would freeze at capture time).
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pirl.flow.policy import sample_chain
from pirl.flow.steps import SDERule
from vla.graphs import EagerRecorder, GraphCache, GraphedCall
from vla.testing import random_inputs, tiny_policy

VARIANTS = ["pi0", "pi05"]


def graphed(policy, max_graphs: int = 16):
    return policy.use_cuda_graphs(max_graphs=max_graphs, recorder_factory=EagerRecorder)


@pytest.mark.parametrize("variant", VARIANTS)
def test_graphed_sampling_equals_eager(variant):
    policy = tiny_policy(3, variant)
    cfg = policy.config
    cases = [(random_inputs(policy, b, seed=s), torch.randn(b, cfg.action_horizon, cfg.action_dim))
             for b, s in ((3, 0), (3, 1), (1, 2), (3, 3))]
    absent = random_inputs(policy, 3, seed=4)
    absent.image_masks[:, -1] = False  # dropped before the prefix pass: a shorter prefix, its own graphs
    cases.append((absent, torch.randn(3, cfg.action_horizon, cfg.action_dim)))
    eager = [policy.sample_actions(inputs, noise=noise) for inputs, noise in cases]
    graphed(policy)
    for (inputs, noise), ref in zip(cases, eager):
        torch.testing.assert_close(policy.sample_actions(inputs, noise=noise), ref, atol=0, rtol=0)
    # batch 3, batch 1 and batch 3 without a camera: one prefix and one expert graph each (the prompt
    # keeps its full width under graphs); the later batch-3 chunks replay the first ones
    assert policy.graphs.captures == 6
    with torch.inference_mode():  # the server's mode: static buffers stay usable outside it too
        torch.testing.assert_close(policy.sample_actions(*cases[0]), eager[0], atol=0, rtol=0)
    torch.testing.assert_close(policy.sample_actions(*cases[1]), eager[1], atol=0, rtol=0)
    assert policy.graphs.captures == 6


@pytest.mark.parametrize("variant", VARIANTS)
def test_graphed_chain_with_hidden_states_equals_eager(variant):
    """The rollout path: prefix with hidden states (value features), Flow-SDE chain, expert hidden states."""
    policy = tiny_policy(4, variant)
    inputs = random_inputs(policy, 2, seed=4)

    def run():
        with torch.no_grad():
            prefix = policy.embed_prefix(inputs)
            chain = sample_chain(policy, prefix=prefix, rule=SDERule(0.5), generator=torch.Generator().manual_seed(0))
        return prefix, chain

    prefix_ref, chain_ref = run()
    graphed(policy)
    prefix, chain = run()
    # eager drops the prompt's trailing padding columns; graphs keep the full width (`FlowPolicy._checked`)
    n = prefix_ref.pad_mask.shape[1]
    assert prefix.pad_mask.shape[1] >= n and not prefix.pad_mask[:, n:].any()  # π0.5 here: 80 vs 64
    torch.testing.assert_close(prefix.hidden[:, :n], prefix_ref.hidden, atol=0, rtol=0)
    for (k, v), (k_ref, v_ref) in zip(prefix.kv, prefix_ref.kv):
        torch.testing.assert_close(k[:, :, :n], k_ref, atol=0, rtol=0)
        torch.testing.assert_close(v[:, :, :n], v_ref, atol=0, rtol=0)
    torch.testing.assert_close(chain.latents, chain_ref.latents, atol=0, rtol=0)
    assert {key[0] for key in policy.graphs.calls} == {"prefix_hidden", "expert"}


def test_prefix_keys_and_values_are_bound_once_per_chunk():
    """K expert steps on one prefix copy its keys / values into the static buffers once, not K times."""
    policy = graphed(tiny_policy(5))
    cfg = policy.config
    inputs = random_inputs(policy, 2, seed=5)
    copied = collections.Counter()
    real_copy = torch._foreach_copy_

    def counting_copy(dst, src, *args, **kwargs):
        copied[len(dst)] += 1
        return real_copy(dst, src, *args, **kwargs)

    torch._foreach_copy_ = counting_copy
    try:
        with torch.no_grad():
            policy.sample_actions(inputs, num_steps=5)
    finally:
        torch._foreach_copy_ = real_copy
    n_kv = 2 * cfg.vlm.depth
    # prefix: its 4 inputs; expert: all 4 + 2 * depth inputs at the first step, then only x_t and t
    assert copied == {4: 1, 4 + n_kv: 1, 2: 4}


def test_outputs_of_earlier_calls_are_not_overwritten():
    policy = graphed(tiny_policy(6))
    cfg = policy.config
    with torch.no_grad():
        prefix = policy.embed_prefix(random_inputs(policy, 2, seed=6), hidden=False)
        x = torch.randn(2, cfg.action_horizon, cfg.action_dim)
        first = policy.velocity(prefix, x, torch.full((2,), 0.9))
        kept = first.clone()
        second = policy.velocity(prefix, x * 2, torch.full((2,), 0.3))
        other = policy.embed_prefix(random_inputs(policy, 2, seed=7), hidden=False)
    torch.testing.assert_close(first, kept, atol=0, rtol=0)
    assert not torch.equal(first, second)
    assert not torch.equal(prefix.kv[0][0], other.kv[0][0])


def test_gradients_bypass_the_graphs():
    policy = graphed(tiny_policy(7))
    cfg = policy.config
    inputs = random_inputs(policy, 2, seed=7)
    prefix = policy.embed_prefix(inputs)  # grad mode: eager
    x = torch.randn(2, cfg.action_horizon, cfg.action_dim, requires_grad=True)
    policy.velocity(prefix, x, torch.full((2,), 0.5)).sum().backward()
    assert policy.graphs.captures == 0
    assert x.grad is not None and policy.action_in_proj.weight.grad is not None


def test_cache_keeps_at_most_max_graphs_least_recently_used_dropped():
    cache = GraphCache(max_graphs=2, recorder_factory=EagerRecorder)
    double = lambda t: [t * 2]  # noqa: E731
    for n in (1, 2, 1, 3, 1, 2):
        (out,) = cache("double", double, [torch.ones(n)])
        torch.testing.assert_close(out, torch.full((n,), 2.0))
    # captures: 1, 2, (1 reused), 3 (drops 2), (1 reused), 2 again (drops 3)
    assert cache.captures == 4
    assert [key[1][0][0] for key in cache.calls] == [(1,), (2,)]


def test_graphed_call_checks_its_arity():
    call = GraphedCall(lambda a, b: [a + b], [torch.ones(2), torch.ones(2)], EagerRecorder())
    torch.testing.assert_close(call([torch.ones(2), torch.full((2,), 3.0)])[0], torch.full((2,), 4.0))
    with pytest.raises(ValueError, match="captured with 2 inputs"):
        call([torch.ones(2)])


def test_an_input_changed_in_place_is_copied_again():
    call = GraphedCall(lambda a: [a * 1], [torch.zeros(3)], EagerRecorder())
    x = torch.ones(3)
    torch.testing.assert_close(call([x])[0], torch.ones(3))
    x.mul_(5)  # same object, new version
    torch.testing.assert_close(call([x])[0], torch.full((3,), 5.0))


def test_a_failed_capture_warns_once_and_runs_eagerly():
    class Failing:
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

        def replay(self):
            raise AssertionError("never captured")

    policy = tiny_policy(8)
    inputs = random_inputs(policy, 2, seed=8)
    noise = torch.randn(2, policy.config.action_horizon, policy.config.action_dim)
    ref = policy.sample_actions(inputs, noise=noise)
    policy.use_cuda_graphs(recorder_factory=Failing)
    with pytest.warns(RuntimeWarning, match="CUDA graphs off for this policy"):
        out = policy.sample_actions(inputs, noise=noise)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert policy.graphs is None


def test_moving_the_policy_drops_its_graphs():
    policy = graphed(tiny_policy(9))
    with torch.no_grad():
        policy.embed_prefix(random_inputs(policy, 1))
    assert len(policy.graphs.calls) == 1
    policy.to(torch.float64).to(torch.float32)
    assert len(policy.graphs.calls) == 0


def test_cuda_graphs_need_a_cuda_policy():
    with pytest.raises(ValueError, match="not on a CUDA device"):
        tiny_policy(0).use_cuda_graphs()
    from pirl.train.common import graphs_on_gpu

    policy = tiny_policy(0)
    graphs_on_gpu(policy)  # what serve / eval / collect / rollout workers call: a CPU policy stays eager
    assert policy.graphs is None


# Operations that read a device tensor's value on the host: during a CUDA graph capture they either fail
# or are recorded with their capture-time value.
HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "nonzero_static", "masked_select",
              "_unique", "_unique2", "unique_dim", "unique_consecutive", "_assert_async", "repeat_interleave"}


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            self.seen[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", VARIANTS)
def test_captured_passes_never_read_tensor_values_on_the_host(variant):
    policy = tiny_policy(10, variant)
    cfg = policy.config
    inputs = random_inputs(policy, 2, seed=10)
    tensors = [inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks]
    with torch.no_grad():
        prefix = policy.embed_prefix(inputs)
        x = torch.randn(2, cfg.action_horizon, cfg.action_dim)
        t = torch.full((2,), 0.7)
        kv = [y for layer in prefix.kv for y in layer]
        with HostReads() as mode:
            policy._prefix_pass_hidden(*tensors)
            policy._prefix_pass_kv(*tensors)
            policy._expert_pass(x, t, prefix.pad_mask, prefix.state, *kv)
        assert not mode.seen, dict(mode.seen)
        # negative control: the detector sees a host read when there is one
        with HostReads() as control:
            bool(x.sum() > 0)
        assert control.seen


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_graph_replay_equals_eager_on_a_gpu(variant):
    """The real capture (`CudaRecorder`): bf16 tiny policy on CUDA, graphed chunks equal eager ones to bf16
    rounding (cuBLAS may choose other kernels on the capture stream; bench/gpu.py reports the exact
    difference). Chunks from different noise differ by ~1, so the bound still tells them apart."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    policy = tiny_policy(11, variant).cuda().to_mixed_precision()
    cfg = policy.config
    cases = [(random_inputs(policy, b, seed=s).to("cuda"),
              torch.randn(b, cfg.action_horizon, cfg.action_dim, device="cuda")) for b, s in ((4, 0), (4, 1), (1, 2))]
    eager = [policy.sample_actions(inputs, noise=noise) for inputs, noise in cases]
    policy.use_cuda_graphs()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture would fall back with a warning
        for (inputs, noise), ref in zip(cases, eager):
            torch.testing.assert_close(policy.sample_actions(inputs, noise=noise), ref, atol=5e-2, rtol=0)
    assert policy.graphs is not None and policy.graphs.captures == 4
    assert (eager[0] - eager[1]).abs().max() > 0.2  # negative control: the bound separates different chunks


@pytest.mark.gpu
def test_rollout_chain_on_a_gpu_with_a_cpu_generator():
    """The rollout path on CUDA: a CPU generator (as rollouts seed them) drives the noise (vla.draw), the
    chain's steps replay from graphs and agree with the eager chain to bf16 rounding."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    policy = tiny_policy(12).cuda().to_mixed_precision()
    inputs = random_inputs(policy, 4, seed=12).to("cuda")

    def chain():
        with torch.no_grad():
            prefix = policy.embed_prefix(inputs)
            return sample_chain(policy, prefix=prefix, rule=SDERule(0.5), generator=torch.Generator().manual_seed(0))

    eager = chain()
    policy.use_cuda_graphs()
    graphed = chain()
    assert graphed.latents.device.type == "cuda"
    torch.testing.assert_close(graphed.latents, eager.latents, atol=5e-2, rtol=0)
    torch.testing.assert_close(graphed.step_mask, eager.step_mask)
