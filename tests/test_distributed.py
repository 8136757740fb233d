"""Distributed runs (torch.distributed, gloo on the CPU): the sum-over-processes losses and batch
norm, sharded scoring, training steps and whole ``torchrun`` runs against one process."""

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist
from torch import nn

import dalbt
from dalbt import distributed
from dalbt.data import load_dataset
from dalbt.distributed import SINGLE, Dist, GlobalBatchNorm, Lead
from dalbt.errors import DalbtError, RankZeroFailed
from dalbt.loop import RunConfig, run_experiment
from dalbt.losses import barlow_twins_loss, joint_loss
from dalbt.store import Store
from dalbt.train import TrainConfig
from tests.conftest import kill_at_round

needs_gloo = pytest.mark.skipif(not (tdist.is_available() and tdist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is unavailable")


class ThreadGroup:
    """In-process stand-in of a process group: one thread per rank, a differentiable sum."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list = [None] * world

    def _sum(self, rank, t):
        self.slots[rank] = t.detach().clone()
        self.barrier.wait()
        out = sum(self.slots[1:], self.slots[0].clone())
        self.barrier.wait()
        return out

    def all_reduce(self, rank):
        group = self

        class Sum(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t):
                return group._sum(rank, t)

            @staticmethod
            def backward(ctx, g):
                return group._sum(rank, g)

        return Sum.apply

    def run(self, fn):
        """``fn(rank, all_reduce)`` on every rank, in threads; the results by rank."""
        results, errors = [None] * self.world, []

        def target(rank):
            try:
                results[rank] = fn(rank, self.all_reduce(rank))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        if errors:
            raise errors[0]
        return results


def _shards(n, world):
    return [Dist(rank=r, world_size=world).shard(n) for r in range(world)]


@pytest.mark.parametrize("n,world", [(12, 2), (7, 2), (5, 3), (2, 3)])
def test_losses_all_reduced_over_shards_are_the_whole_batch_losses(n, world):
    g = torch.Generator().manual_seed(n * 10 + world)  # float64: the math, not the rounding
    z1 = torch.randn(n, 6, generator=g, dtype=torch.float64)
    z2 = torch.randn(n, 6, generator=g, dtype=torch.float64)
    logits = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(4, (n,), generator=g)
    full = [t.clone().requires_grad_() for t in (z1, z2, logits)]
    bt = barlow_twins_loss(full[0], full[1], 0.01)
    total, ce, _ = joint_loss(full[2], y, full[0], full[1], gamma=0.5, lambd=0.01)
    (bt + total).backward()

    def shard(rank, all_reduce):
        a, b = _shards(n, world)[rank]
        parts = [t[a:b].clone().requires_grad_() for t in (z1, z2, logits)]
        bt_r = barlow_twins_loss(parts[0], parts[1], 0.01, all_reduce=all_reduce)
        total_r, ce_r, _ = joint_loss(parts[2], y[a:b], parts[0], parts[1], gamma=0.5,
                                      lambd=0.01, all_reduce=all_reduce)
        (bt_r + total_r).backward()
        return bt_r.detach(), total_r.detach(), ce_r.detach(), [p.grad for p in parts]

    for rank, (bt_r, total_r, ce_r, grads) in enumerate(ThreadGroup(world).run(shard)):
        a, b = _shards(n, world)[rank]
        torch.testing.assert_close(bt_r, bt.detach())
        torch.testing.assert_close(total_r, total.detach())
        torch.testing.assert_close(ce_r, ce.detach())
        # Each rank's gradient is that of the sum of all ranks' (equal) losses: DDP's averaging
        # divides it by the world size again.
        for g_r, t in zip(grads, full, strict=True):
            torch.testing.assert_close(g_r / world, t.grad[a:b])


def test_losses_need_two_samples_across_all_shards():
    def shard(rank, all_reduce):
        z = torch.randn(rank, 3)  # ranks hold 0 and 1 rows
        return barlow_twins_loss(z, z, all_reduce=all_reduce)

    with pytest.raises(ValueError, match="at least 2"):
        ThreadGroup(2).run(shard)


@pytest.mark.parametrize("shape", [(9, 5), (7, 3, 4, 4)])
def test_global_batchnorm_over_shards_is_batchnorm_of_the_whole_batch(shape):
    world = 3
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g) * 3 + 1, torch.randn(*shape, generator=g)
    bn = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(shape[1])
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    xf = x.clone().requires_grad_()
    out = bn(xf)
    (out * w).sum().backward()

    def shard(rank, all_reduce):
        a, b = _shards(shape[0], world)[rank]
        gbn = GlobalBatchNorm(shape[1], all_reduce=all_reduce)
        with torch.no_grad():
            gbn.weight.copy_(bn.weight)
            gbn.bias.copy_(bn.bias)
        xr = x[a:b].clone().requires_grad_()
        o = gbn(xr)
        (o * w[a:b]).sum().backward()
        return o.detach(), xr.grad, gbn.weight.grad, gbn.running_mean, gbn.running_var

    results = ThreadGroup(world).run(shard)
    for rank, (o, gx, _, rm, rv) in enumerate(results):
        a, b = _shards(shape[0], world)[rank]
        torch.testing.assert_close(o, out.detach()[a:b], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, xf.grad[a:b], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rm, bn.running_mean)
        torch.testing.assert_close(rv, bn.running_var)
    torch.testing.assert_close(sum(r[2] for r in results), bn.weight.grad, rtol=1e-4, atol=1e-5)


def test_shards_cover_the_request_in_order():
    for n in (0, 1, 5, 8):
        for world in (1, 2, 3):
            bounds = _shards(n, world)
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(bounds[i][1] == bounds[i + 1][0] for i in range(world - 1))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_resolve_device_under_torchrun():
    res = distributed.resolve_device
    assert res("cpu", 1, 2, cuda_available=True, cuda_count=2) == "cpu"
    assert res("auto", 0, 1, cuda_available=False) == "cpu"
    assert res("cuda", 1, 2, cuda_available=True, cuda_count=2) == "cuda:1"
    assert res("auto", 3, 4, cuda_available=True, cuda_count=4) == "cuda:3"
    assert res("cuda:1", 0, 1, cuda_available=True, cuda_count=2) == "cuda:1"
    with pytest.raises(DalbtError, match="has 1 GPU"):
        res("cuda", 1, 2, cuda_available=True, cuda_count=1)
    with pytest.raises(DalbtError, match="on one GPU"):
        res("cuda:0", 1, 2, cuda_available=True, cuda_count=2)
    with pytest.raises(DalbtError, match="CUDA is not available"):
        res("cuda", 0, 2, cuda_available=False)


def test_amp_is_ignored_with_a_warning_on_cpu(capsys):
    from dalbt.cli import resolve_amp

    assert resolve_amp("bf16", "cpu") is None
    assert "--amp bf16 needs CUDA" in capsys.readouterr().err
    assert resolve_amp("fp16", "cuda:0") == "fp16"
    assert resolve_amp(None, "cpu") is None
    assert capsys.readouterr().err == ""


def test_amp_off_keeps_the_run_key():
    cfg = RunConfig()
    d = cfg.key_dict()
    assert "amp" not in d["train"]
    cfg.train.amp = "bf16"
    assert cfg.key_dict()["train"]["amp"] == "bf16"


def test_lead_runs_work_once_in_a_single_process():
    calls = []
    lead = Lead(SINGLE, {"twice": lambda x: calls.append(x) or 2 * x})
    assert lead.run(lambda: lead.call("twice", 3) + lead.call("twice", 4)) == 14
    assert calls == [3, 4]


# --- two gloo processes ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(n=60, classes=3, side=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    base = torch.rand(classes, 1, side, side, generator=g) * 255
    x = (base[y] * 0.7 + torch.rand(n, 1, side, side, generator=g) * 70).clamp(0, 255)
    return x.to(torch.uint8), y


def _model(seed=0, dropout=0.3):
    from dalbt.models import build_model

    return build_model("lenet", 1, 8, 3, projector_dims=(16, 16), dropout=dropout, seed=seed)


def _compare_training(dist, x, y, cfg, n_lab):
    """train_round under ``dist`` against one process, with the same generators."""
    from dalbt.train import train_round

    labelled, validation, pool = np.arange(n_lab), np.arange(37, 49), np.arange(49, 60)
    results = []
    for d in (SINGLE, dist):
        m = _model(dropout=0.0)
        res = train_round(m, x, y, labelled, validation, cfg, torch.Generator().manual_seed(1),
                          torch.Generator().manual_seed(2), unlabelled=pool, dist=d)
        results.append((m, res))
    (m1, r1), (m2, r2) = results
    assert r1.best_epoch == r2.best_epoch and r1.val_acc == r2.val_acc
    assert r1.train_ce == pytest.approx(r2.train_ce, rel=1e-5)
    assert r1.train_bt == pytest.approx(r2.train_bt, rel=1e-5)
    assert all(type(mod) is not GlobalBatchNorm for mod in m2.modules())  # swapped back
    # Most weights agree to ~1e-7. Biases right before a batch norm have a zero gradient in
    # exact arithmetic, and Adam turns its rounding noise into steps of up to ~lr: allow lr / 10.
    for (name, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=cfg.lr / 10, msg=name)
    close = [torch.isclose(b, a, rtol=0, atol=1e-6).float().mean()
             for a, b in zip(m1.parameters(), m2.parameters(), strict=True)]
    # (uneven shards, e.g. 6 + 5 of a batch of 11, leave a few more weights at rounding level)
    assert float(torch.stack(close).mean()) > 0.9, (n_lab, float(torch.stack(close).mean()))
    # Every rank ends with the same weights.
    flat = torch.cat([p.detach().flatten() for p in m2.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(dist.world_size)]
    tdist.all_gather(everyone, flat)
    assert all(torch.equal(everyone[0], e) for e in everyone)


def _check_sharded_scoring(dist, model, x, y) -> None:
    """Sharded scoring: the request's order, uneven and empty shards, chunk boundaries."""
    from dalbt.train import accuracy, infer, mc_dropout_probs

    for idx in (np.array([5, 3, 59, 0, 17, 42, 8]), np.array([11]), np.array([], dtype=np.int64)):
        one, many = infer(model, x, idx, batch_size=2), infer(model, x, idx, batch_size=2,
                                                              dist=dist)
        assert np.array_equal(many.indices, idx)
        torch.testing.assert_close(many.logits, one.logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(many.latents, one.latents, rtol=0, atol=1e-6)
        gens = [torch.Generator().manual_seed(7) for _ in range(2)]
        p1 = mc_dropout_probs(model, x, idx, 4, gens[0], batch_size=3)
        p2 = mc_dropout_probs(model, x, idx, 4, gens[1], batch_size=3, dist=dist)
        assert p2.shape == (len(idx), 4, 3)
        torch.testing.assert_close(p2, p1, rtol=0, atol=1e-6)
        assert torch.equal(gens[0].get_state(), gens[1].get_state())  # same draws consumed
    assert accuracy(model, x[:31], y[:31], dist=dist) == accuracy(model, x[:31], y[:31])


def _check_lead(dist, rank: int) -> None:
    """Rank 0 leads; the others serve its requests and get its result; errors reach all."""
    served = []

    def draw(v, g):  # a generator argument reaches every rank in the same state
        served.append((v, torch.rand(3, generator=g)))
        return v * 10

    def work():
        assert rank == 0
        return [lead.call("draw", v, torch.Generator().manual_seed(v)) for v in (1, 2)]

    lead = Lead(dist, {"draw": draw})
    assert lead.run(work) == [10, 20]
    assert [v for v, _ in served] == [1, 2]
    for v, t in served:
        assert torch.equal(t, torch.rand(3, generator=torch.Generator().manual_seed(v)))

    def fail():
        raise DalbtError("no luck")

    for call in (lambda: lead.run(fail), lambda: dist.from_main(fail)):
        try:
            call()
        except RankZeroFailed as exc:
            assert rank != 0 and "no luck" in str(exc)
        except DalbtError as exc:
            assert rank == 0 and str(exc) == "no luck"
        else:
            raise AssertionError("no error")
    assert dist.from_main(lambda: rank) == 0


def _gloo_worker(rank: int, world: int, port: int) -> None:
    """Every check of a real 2-process group; an AssertionError fails the spawning test."""
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                             world_size=world)
    dist = distributed.from_process_group("cpu")
    assert (dist.rank, dist.world_size, dist.active) == (rank, world, True)
    x, y = _images()
    model = _model()
    _check_sharded_scoring(dist, model, x, y)
    # One distributed training round = the one-process round (up to rounding): batches of
    # 16 + 11 + 10 (37 at batch 16: a remainder of 5 is re-cut with the batch before) split
    # unevenly across the ranks, Barlow Twins on labelled + pool images (projector batch norm
    # synced), validation sharded; then cross-entropy only, 33 = 16 + 9 + 8; then the step
    # recipe with everything that draws (balanced batches, the augmented cross-entropy).
    step_recipe = TrainConfig(steps=7, batch_size=16, gamma=0.5, ssl_unlabelled=True,
                              schedule="cosine", warmup_steps=2, balanced=True,
                              ce_augment=True, eval_every_steps=2)
    for cfg, n_lab in ((TrainConfig(epochs=2, batch_size=16, gamma=0.5, ssl_unlabelled=True), 37),
                       (TrainConfig(epochs=2, batch_size=16, gamma=0.0), 33),
                       (step_recipe, 37)):
        _compare_training(dist, x, y, cfg, n_lab)
    _check_lead(dist, rank)
    distributed.shutdown(dist)


@pytest.mark.slow
@needs_gloo
def test_two_gloo_processes_score_train_and_lead_like_one():
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(2, _free_port()), nprocs=2, join=True)


# --- whole runs under torchrun ---------------------------------------------------------------

RUN_ARGS = ["--dataset", "digits", "--initial", "40", "--budget", "20", "--rounds", "2",
            "--epochs", "2", "--projector", "32-32", "--threads", "1", "--no-progress",
            # Training is a no-op at float32 precision (steps of 1e-12), so that both runs
            # score the pool with the same (initial) weights: scoring and selection must then
            # agree exactly.
            "--lr", "1e-12", "--weight-decay", "0"]


def _env():
    src = str(Path(dalbt.__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _dalbt(args, nproc=1, timeout=120):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable])
    proc = subprocess.run([*launcher, "-m", "dalbt", "run", *args], env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _rounds(out: Path):
    conn = sqlite3.connect(out / "dalbt.sqlite")
    try:
        runs = conn.execute("SELECT id, status, env FROM runs").fetchall()
        rows = conn.execute("SELECT run_id, round, COUNT(*), queried FROM rounds "
                            "GROUP BY run_id, round ORDER BY round").fetchall()
    finally:
        conn.close()
    return runs, rows


@pytest.mark.slow
@needs_gloo
def test_torchrun_two_processes_score_and_select_like_one(tmp_path):
    args = [*RUN_ARGS, "--strategy", "entropy", "--save-scores", "--pretrain-epochs", "1",
            "--pretrain-batch", "128"]
    two = _dalbt([*args, "--out", str(tmp_path / "two")], nproc=2)
    _dalbt([*args, "--out", str(tmp_path / "one")])
    # Only rank 0 prints (and writes): one line per round, one report.
    assert two.count("round  0") == 1 and two.count("plot:") == 1
    (runs2, rows2), (_, rows1) = _rounds(tmp_path / "two"), _rounds(tmp_path / "one")
    assert len(runs2) == 1 and runs2[0][1] == "finished"
    assert json.loads(runs2[0][2])["processes"] == 2
    assert [(r[1], r[2]) for r in rows2] == [(0, 1), (1, 1), (2, 1)]  # one copy of each round
    assert [r[3] for r in rows2] == [r[3] for r in rows1]  # the same queries
    for r in (0, 1):
        s2 = torch.load(tmp_path / "two" / "scores" / f"run-1-round-{r}.pt")
        s1 = torch.load(tmp_path / "one" / "scores" / f"run-1-round-{r}.pt")
        assert len(s2["scored"]) == len(s1["scored"]) == 1
        a, b = s2["scored"][0], s1["scored"][0]
        assert torch.equal(a["indices"], b["indices"]) and len(a["indices"]) > 1000
        torch.testing.assert_close(a["logits"], b["logits"], rtol=0, atol=1e-6)
        torch.testing.assert_close(a["latents"], b["latents"], rtol=0, atol=1e-6)
        assert torch.equal(s2["queried"], s1["queried"]) and len(s2["queried"]) == 20
        assert json.loads(rows2[r][3]) == s2["queried"].tolist()


@pytest.mark.slow
@needs_gloo
def test_torchrun_resumes_a_run_of_one_process(tmp_path, monkeypatch):
    """Rank 0 reads the interrupted run and broadcasts it; the warm-start checkpoint and the
    pre-trained weights come from rank 0's directory. MC-dropout scoring goes through rank 0's
    requests (BALD)."""
    data = load_dataset("digits")
    cfg = RunConfig(dataset="digits", strategy="bald", initial=40, budget=20, rounds=2,
                    projector_dims=(32, 32),
                    train=TrainConfig(epochs=2, lr=1e-12, weight_decay=0.0, warm_start=True,
                                      pretrain_epochs=1, pretrain_batch=128))

    def run(name):
        with Store(tmp_path / name) as store:
            run_experiment(cfg, store, progress=False, data=data, log=lambda s: None)

    run("whole")
    kill_at_round(monkeypatch, 1, lambda: run("resumed"))
    assert [r[1] for r in _rounds(tmp_path / "resumed")[1]] == [0]
    out = _dalbt([*RUN_ARGS, "--strategy", "bald", "--warm-start", "--pretrain-epochs", "1",
                  "--pretrain-batch", "128", "--resume", "--out", str(tmp_path / "resumed")],
                 nproc=2)
    assert "resuming run 1" in out and out.count("round  1") == 1
    (runs, rows), (_, whole) = _rounds(tmp_path / "resumed"), _rounds(tmp_path / "whole")
    assert len(runs) == 1 and runs[0][1] == "finished"
    assert [(r[1], r[2]) for r in rows] == [(0, 1), (1, 1), (2, 1)]
    assert [r[3] for r in rows] == [r[3] for r in whole]
