"""rollout: DeepSpeed learner group on Ray, versioned weight sync, worker supervision, placement.

One Ray cluster for the whole module (ray.init(num_cpus=2) ~5 s); one 2-learner ZeRO-2 group
(~15 s to start) and one 2-worker pool are shared by the tests. Light actors ask for <= 0.25 CPU.
"""
import functools
import os
import signal
import sys
import time

import numpy as np
import pytest
import torch

import ray
import deepspeed  # noqa: F401

from rollout import (  # noqa: E402
    LearnerConfig,
    LearnerGroup,
    Placement,
    PlacementConfig,
    StaleWeightsError,
    WorkerPool,
    WorkerPoolConfig,
    load_into,
    pack,
    split_batch,
    trainable_parameters,
)

# Test-local factories and functions travel to the actors by value (this module is not importable
# from a Ray worker process).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LR, BETAS, WD, CLIP = 1e-2, (0.9, 0.95), 0.01, 1.0


def tiny_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))


def adamw(params):
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WD)


def mse_loss(model, batch):
    err = model(batch["x"]).squeeze(-1) - batch["y"]
    return (err**2).mean(), {"mae": err.abs().mean()}


def regression_data(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]
    return {"x": x, "y": y}


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def learners(ray_cluster):
    group = LearnerGroup(LearnerConfig(num_learners=2, zero_stage=2, grad_clip=CLIP), tiny_mlp, adamw)
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def pool(ray_cluster):
    p = WorkerPool(WorkerPoolConfig(num_workers=2, worker_cpus=0.25, max_restarts=2), tiny_mlp)
    yield p
    p.shutdown()


def _reference_run(data, steps):
    """Single-process torch run on the whole batch: what the 2-rank group must reproduce."""
    model = tiny_mlp()
    opt = adamw(list(model.parameters()))
    losses = []
    for _ in range(steps):
        loss, _ = mse_loss(model, data)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        losses.append(loss.item())
    return model, losses


def test_zero2_group_trains_and_matches_single_process(learners):
    assert learners.version == 0, "this test needs the fresh group: keep it first in the module"
    data = regression_data()
    steps = 25
    losses = [learners.train_step(data, mse_loss)["loss"] for _ in range(steps)]
    assert learners.version == steps
    assert losses[-1] < 0.5 * losses[0], losses
    ref_model, ref_losses = _reference_run(data, steps)
    # Rank-mean of the shard losses = full-batch loss (equal shards).
    assert np.allclose(losses, ref_losses, rtol=1e-4, atol=1e-6)
    got = learners.get_weights()
    for name, ref in ref_model.named_parameters():
        assert torch.allclose(got[name], ref.detach(), rtol=1e-4, atol=1e-5), name


def test_weight_sync_round_trip_bit_exact_and_versioned(learners, pool):
    learners.train_step(regression_data(seed=2), mse_loss)  # weights now differ from the factory's
    before = pool.map(_worker_params)
    ref = learners.snapshot_ref()
    expected = learners.get_weights()
    assert any(not torch.equal(before[0][k], expected[k]) for k in expected)

    t0 = time.perf_counter()
    version = pool.sync(ref)
    sync_s = time.perf_counter() - t0
    assert version == learners.version
    for got in pool.map(_worker_params):
        assert set(got) == set(expected)
        for k in expected:
            assert torch.equal(got[k], expected[k]), k  # bit-exact
    assert pool.map(_worker_version) == [version, version]
    print(f"weight sync of {ray.get(ref).nbytes} B to 2 workers: {sync_s * 1e3:.1f} ms")

    # Same version again: a no-op. Newer version: loaded. Older version afterwards: refused.
    assert ray.get([w.load_weights.remote(ref) for w in pool.workers]) == [False, False]
    learners.train_step(regression_data(seed=3), mse_loss)
    assert pool.sync(learners.snapshot_ref()) == version + 1
    with pytest.raises(StaleWeightsError):
        ray.get(pool.workers[0].load_weights.remote(ref))
    # A call stamped with the wrong version is refused; the right one runs.
    with pytest.raises(StaleWeightsError):
        pool.call(0, _worker_version, expected_version=version)
    assert pool.call(0, _worker_version, expected_version=version + 1) == version + 1


def test_lr_scale_reaches_every_rank(learners):
    """Scale 0 freezes the weights (AdamW's decay scales with lr too); scale 1 moves them again."""
    data = regression_data(seed=4)
    try:
        learners.set_lr_scale(0.0)
        before = learners.get_weights()
        learners.train_step(data, mse_loss)
        after = learners.get_weights()
        assert all(torch.equal(before[k], after[k]) for k in before)
        learners.set_lr_scale(1.0)
        learners.train_step(data, mse_loss)
        moved = learners.get_weights()
        assert any(not torch.equal(after[k], moved[k]) for k in after)
    finally:
        learners.set_lr_scale(1.0)


def _worker_params(worker):
    return {k: v.detach().clone() for k, v in trainable_parameters(worker.model).items()}


def _worker_version(worker):
    return worker.version


def _die_once(worker, marker):
    """Kill this worker process (SIGKILL, mid-call) the first time; succeed on the retry."""
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid(), worker.version, _worker_params(worker)


def test_killed_worker_is_restarted_resynced_and_call_retried(learners, pool, tmp_path):
    version = pool.sync(learners.snapshot_ref())
    expected = learners.get_weights()
    restarts_before = pool.restarts[1]
    marker = str(tmp_path / "died")
    pid, got_version, params = pool.call(1, _die_once, marker)
    assert os.path.exists(marker)
    dead_pid = int(open(marker).read())
    assert pid != dead_pid  # a new process answered
    assert pool.restarts[1] == restarts_before + 1
    assert got_version == version  # re-synced before the retry
    for k in expected:
        assert torch.equal(params[k], expected[k]), k
    # The replacement is a working member of the pool.
    assert pool.map(_worker_version) == [version, version]


def test_weight_snapshot_pack_load_bit_exact_bf16_and_strict():
    # Pure transport, no Ray: mixed dtypes (bf16 has no numpy dtype: bytes are reinterpreted),
    # frozen parameters excluded, mismatches rejected.
    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
        m[1].to(torch.bfloat16)
        m[0].weight.requires_grad_(False)
        return m

    src, dst = make(), make()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    snap = pack(trainable_parameters(src), version=7)
    assert snap.names() == ["0.bias", "1.weight", "1.bias"]  # frozen 0.weight not sent
    assert all(e.offset % 8 == 0 for e in snap.entries)
    load_into(dst, snap)
    for (n, a), (_, b) in zip(src.named_parameters(), dst.named_parameters()):
        same = torch.equal(a, b)
        assert same == (n != "0.weight"), n
    other = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 3))
    with pytest.raises((KeyError, ValueError)):
        load_into(other, snap)


class _Minibatch:
    """A batch type that knows its own sharding (per-sample x, shared mask)."""

    def __init__(self, x, mask):
        self.x, self.mask = x, mask

    def split(self, n):
        return [_Minibatch(x, self.mask) for x in self.x.chunk(n)]


def test_split_batch_requires_equal_shards():
    batch = {"x": torch.arange(6), "meta": "a", "scale": torch.tensor(2.0), "t": (torch.zeros(6, 2),), "prompt": list("abcdef")}
    shards = split_batch(batch, 3)
    assert [s["x"].tolist() for s in shards] == [[0, 1], [2, 3], [4, 5]]
    assert shards[2]["meta"] == "a" and shards[2]["t"][0].shape == (2, 2)
    assert shards[1]["prompt"] == ["c", "d"] and shards[1]["scale"].item() == 2.0
    custom = split_batch(_Minibatch(torch.arange(4), torch.ones(7)), 2)
    assert [c.x.tolist() for c in custom] == [[0, 1], [2, 3]] and custom[1].mask.shape == (7,)
    with pytest.raises(ValueError):
        split_batch(torch.arange(5), 2)


def _placement_group_id(worker):
    return ray.get_runtime_context().get_placement_group_id()


@pytest.mark.parametrize("mode", ["collocated", "disaggregated"])
def test_placement_modes(ray_cluster, mode):
    cfg = PlacementConfig(mode=mode, num_learners=2, num_workers=2, learner_cpus=0.1, worker_cpus=0.1)
    placement = Placement.create(cfg)
    try:
        if mode == "collocated":
            # learner r shares bundle r with workers r, r + 2, ...
            assert placement.bundles == [{"CPU": 0.2}, {"CPU": 0.2}]
            assert [placement.worker_bundle(i) for i in range(2)] == [0, 1]
        else:
            assert placement.bundles == [{"CPU": 0.1}] * 4
            assert [placement.worker_bundle(i) for i in range(2)] == [2, 3]
        workers = WorkerPool(WorkerPoolConfig(num_workers=2), tiny_mlp, placement=placement)
        try:
            assert workers.map(_placement_group_id) == [placement.pg.id.hex()] * 2
        finally:
            workers.shutdown()
    finally:
        placement.remove()
    with pytest.raises(ValueError):
        PlacementConfig(mode="everywhere")


@pytest.mark.slow
@pytest.mark.parametrize("stage,accum", [(0, 1), (1, 1), (3, 1), (2, 2)])
def test_other_zero_stages_and_accumulation_match_single_process(ray_cluster, stage, accum, tmp_path):
    cfg = LearnerConfig(num_learners=2, zero_stage=stage, grad_clip=CLIP, grad_accum_steps=accum)
    group = LearnerGroup(cfg, tiny_mlp, adamw)
    try:
        data = regression_data()
        for _ in range(10):
            group.train_step(data, mse_loss)
        assert group.version == 10  # one optimizer step per train_step, whatever the accumulation
        ref_model, _ = _reference_run(data, 10)
        got = group.get_weights()
        for name, ref in ref_model.named_parameters():
            assert torch.allclose(got[name], ref.detach(), rtol=1e-4, atol=1e-5), (stage, name)
        # Checkpoint round trip: save, move on, load back.
        group.save_checkpoint(str(tmp_path), tag="t10")
        group.train_step(data, mse_loss)
        assert group.load_checkpoint(str(tmp_path), tag="t10") == 10
        restored = group.get_weights()
        for name in got:
            assert torch.equal(restored[name], got[name]), name
    finally:
        group.shutdown()


def big_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2048, 3072), torch.nn.Linear(3072, 2048))  # ~50 MB fp32


@pytest.mark.slow
def test_weight_sync_50mb_timing(ray_cluster):
    workers = WorkerPool(WorkerPoolConfig(num_workers=2), big_mlp)
    try:
        model = big_mlp()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-1.0)
        snap = pack(trainable_parameters(model), version=1)
        ref = ray.put(snap)
        t0 = time.perf_counter()
        assert workers.sync(ref) == 1
        dt = time.perf_counter() - t0
        print(f"weight sync {snap.nbytes / 2**20:.1f} MiB to 2 workers: {dt * 1e3:.0f} ms")
        sums = workers.map(functools.partial(_param_sum))
        assert sums[0] == sums[1] == pytest.approx(sum(p.double().sum().item() for p in model.parameters()))
        assert dt < 5.0
    finally:
        workers.shutdown()


def _param_sum(worker):
    return sum(p.double().sum().item() for p in worker.model.parameters())
