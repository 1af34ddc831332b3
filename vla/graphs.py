"""Inference passes replayed from captured CUDA graphs.

At batch 1 a π0 chunk on an H200 is launch-bound, not FLOP-bound: ~10,000 kernel launches per chunk,
47 ms of GPU work inside 277 ms (`bench/results/gpu.md`, 62x the FLOP floor). A CUDA graph records the
kernels of one call once and replays all of them with one launch. A replay reruns the recorded kernels
on the recorded memory, so a captured call reads static input buffers (the caller's tensors are copied
into them before each replay) and writes static outputs (overwritten by the next replay, so they are
cloned before they are handed out).

`GraphedCall` does that buffer handling for a function of a flat list of tensors; a `Recorder` does the
capture and replay: `CudaRecorder` with `torch.cuda.CUDAGraph`, `EagerRecorder` by running the function
again on the static buffers and copying its results into the static outputs, which is what a replay
does. The CPU tests use the latter to check the buffer handling that the CUDA path relies on.
`GraphCache` keeps one captured call per input signature (shapes, dtypes, devices), at most
`max_graphs` of them, least recently used dropped first.

What a captured function may not do: read a tensor's value on the host (`.item()`, `bool(t)`,
`nonzero`), since the capture records no host work: it would be frozen at its capture-time value.
`tests/test_graphs.py` checks the policy's captured passes for such operations on the CPU.
"""

from __future__ import annotations

import collections
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

TensorFn = Callable[..., Sequence[Tensor]]


class Recorder(Protocol):
    def capture(self, fn: Callable[[], Sequence[Tensor]]) -> Sequence[Tensor]:
        """Runs `fn` once as the recording; returns its outputs (the static outputs of every replay)."""

    def replay(self) -> None:
        """Reruns the recording, overwriting the static outputs."""


class CudaRecorder:
    """`torch.cuda.CUDAGraph`: warm-up calls on a side stream (lazy initialisations, kernel choice and
    the caching allocator's first allocations must not happen during the capture), then the capture.

    `pool`: a memory pool shared with the other graphs of one `GraphCache`. Sharing is safe here because
    the graphs never run concurrently, their inputs are allocated outside the pool, and `GraphedCall`
    clones the outputs right after each replay: a later replay of another graph may overwrite a static
    output, never a tensor anyone still reads.
    """

    def __init__(self, warmup: int = 2, pool=None):
        self.warmup = warmup
        self.pool = pool
        self.graph: torch.cuda.CUDAGraph | None = None

    def capture(self, fn: Callable[[], Sequence[Tensor]]) -> Sequence[Tensor]:
        try:
            return self._capture(fn)
        except RuntimeError:
            # Not every torch / cuDNN pairing can capture cuDNN's fused attention (the kernel eager bf16
            # attention picked on the H200); the other fused kernels can. The replay then rounds like them.
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                return self._capture(fn)

    def _capture(self, fn: Callable[[], Sequence[Tensor]]) -> Sequence[Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the server's other threads (request preparation) may use CUDA during a capture
        with torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local"):
            outputs = fn()
        return outputs

    def replay(self) -> None:
        assert self.graph is not None, "replay before capture"
        self.graph.replay()


class EagerRecorder:
    """Replays by calling the function again on the same static buffers (any device): the semantics of
    a CUDA graph replay without the graph, for tests of everything around it."""

    def __init__(self) -> None:
        self.fn: Callable[[], Sequence[Tensor]] | None = None
        self.outputs: Sequence[Tensor] = ()

    def capture(self, fn: Callable[[], Sequence[Tensor]]) -> Sequence[Tensor]:
        self.fn = fn
        self.outputs = fn()
        return self.outputs

    def replay(self) -> None:
        assert self.fn is not None, "replay before capture"
        for static, fresh in zip(self.outputs, self.fn(), strict=True):
            static.copy_(fresh)


def _version(t: Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


class GraphedCall:
    """`fn(*tensors) -> tensors` captured once on static copies of `example`, then replayed.

    Each call copies its inputs into the static buffers, except an input that is the very tensor of the
    previous call, unmodified since (same object, same version counter): the prefix keys and values of
    one chunk are bound once and reused by its K expert steps. Inference-mode tensors keep no version
    counter, so one changed in place between two calls would not be recopied; nothing in pirl changes a
    pass's inputs in place. Outputs are cloned, so a later replay never changes what an earlier call
    returned.
    """

    def __init__(self, fn: TensorFn, example: Sequence[Tensor], recorder: Recorder):
        self.static_inputs = [t.detach().clone() for t in example]
        self.recorder = recorder
        self.static_outputs = list(recorder.capture(lambda: tuple(fn(*self.static_inputs))))
        self._bound: list[tuple[Tensor, int | None] | None] = [None] * len(self.static_inputs)

    def __call__(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"captured with {len(self.static_inputs)} inputs, called with {len(inputs)}")
        dst, src = [], []
        for i, (static, t) in enumerate(zip(self.static_inputs, inputs)):
            bound = self._bound[i]
            if bound is not None and bound[0] is t and bound[1] == _version(t):
                continue
            dst.append(static)
            src.append(t)
            self._bound[i] = (t, _version(t))
        if dst:
            torch._foreach_copy_(dst, src)
        self.recorder.replay()
        return [t.clone() for t in self.static_outputs]


def signature(inputs: Sequence[Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)


class GraphCache:
    """One `GraphedCall` per (name, input signature), captured at first use; LRU-bounded."""

    def __init__(self, max_graphs: int = 16, recorder_factory: Callable[[], Recorder] | None = None):
        if max_graphs < 1:
            raise ValueError("max_graphs must be >= 1")
        self.max_graphs = max_graphs
        if recorder_factory is None:
            pool = torch.cuda.graph_pool_handle()
            recorder_factory = lambda: CudaRecorder(pool=pool)  # noqa: E731
        self.recorder_factory = recorder_factory
        self.calls: collections.OrderedDict[tuple, GraphedCall] = collections.OrderedDict()
        self.captures = 0

    def __call__(self, name: str, fn: TensorFn, inputs: Sequence[Tensor]) -> list[Tensor]:
        key = (name, signature(inputs))
        call = self.calls.get(key)
        if call is None:
            # Static buffers must be normal tensors even when the first call comes from inference mode:
            # a later call outside it could not copy into inference tensors.
            with torch.inference_mode(False), torch.no_grad():
                call = GraphedCall(fn, inputs, self.recorder_factory())
            self.captures += 1
            self.calls[key] = call
            while len(self.calls) > self.max_graphs:
                self.calls.popitem(last=False)
        self.calls.move_to_end(key)
        return call(inputs)

    def clear(self) -> None:
        self.calls.clear()
