"""The Hessian on two processes (gloo, CPU, float64) against one process on the whole probe set.

One pair of processes is spawned for the module; it runs every case and
saves what each rank computed. Each case is then compared, here, with one
process on the concatenation of the two shards: top eigenvalues, SLQ nodes
and weights, trace samples, and the operator's product, gradient and loss,
to 1e-10 relative to the spectrum's scale; both ranks must return the very
same numbers. The MLPs (2 hidden layers of 12, 1,090 parameters, BatchNorm
or LayerNorm) run on 64 digits samples.
"""

from __future__ import annotations

import os
import socket
import sys
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normprobe
from normprobe.hessian import HessianError, HessianOperator, hessian_spectrum

F = nn.functional
SETTINGS: dict[str, Any] = dict(
    what=("density", "top", "trace"), steps=30, num_vectors=2, k=10, trace_samples=6, seed=0
)


@dataclass(frozen=True)
class Case:
    """One comparison: rank 0 gets rows ``[0, split)``, rank 1 the rest (of ``rows``)."""

    name: str
    norm: str
    split: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    rows: int = 64


CASES = [
    # train mode, batch statistics: each rank's chunks are one process's chunks (16 x 4)
    Case("even_batch_train", "batch", 32, {"chunk_size": 16}),
    # uneven shards, chunks still aligned (8 x 8 = 5 x 8 on rank 0 + 3 x 8 on rank 1)
    Case("uneven_batch_train", "batch", 40, {"chunk_size": 8}),
    # eval mode: the chunks differ (14, 13, 13 | 12, 12 against 16 x 4), H does not
    Case("uneven_batch_eval", "batch", 40, {"chunk_size": 16, "norm_mode": "eval"}),
    # no batch statistics: chunking does not matter in train mode either
    Case("uneven_layer_train", "layer", 40, {"chunk_size": 16}),
    # n_samples counts the whole set: one process's subset of the concatenation
    Case("subsample_eval", "batch", 40, {"chunk_size": 16, "norm_mode": "eval", "n_samples": 48}),
    # a rank without data
    Case("empty_rank_eval", "batch", 40, {"chunk_size": 16, "norm_mode": "eval"}, rows=40),
]


def _models() -> dict[str, dict[str, torch.Tensor]]:
    """State dicts of the two MLPs, float64, with running statistics away from their defaults."""
    states = {}
    for norm in ("batch", "layer"):
        model = normprobe.build_model("mlp", norm, seed=0, depth=2, width=12, input_shape=64)
        model = model.double().train()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(32, 64, generator=gen, dtype=torch.float64) * 2 + 0.5)
        states[norm] = model.state_dict()
    return states


def _model(norm: str, state: dict[str, torch.Tensor]) -> nn.Module:
    model = normprobe.build_model("mlp", norm, seed=0, depth=2, width=12, input_shape=64)
    model = model.double()
    model.load_state_dict(state)
    return model


def _probe_set() -> tuple[torch.Tensor, torch.Tensor]:
    ds = normprobe.load_dataset("digits")
    index = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(0))[:64]
    return ds.train.x[index.sort().values].double(), ds.train.y[index.sort().values]


def _measure(model: nn.Module, data: Any, kwargs: dict[str, Any], **more: Any) -> dict[str, Any]:
    """A spectrum and the operator's product, gradient and loss, as plain arrays."""
    spec = hessian_spectrum(model, F.cross_entropy, data, **SETTINGS, **kwargs, **more)
    out: dict[str, Any] = {
        "top": spec.top_eigenvalues,
        "nodes": np.concatenate(spec.nodes),
        "weights": np.concatenate(spec.weights),
        "trace_samples": spec.trace_samples,
        "num_samples": spec.num_samples,
        "num_chunks": spec.num_chunks,
        "world_size": spec.world_size,
        "num_classes": spec.num_classes,
    }
    if "n_samples" not in kwargs:
        op_kwargs = {k: v for k, v in kwargs.items() if k in ("chunk_size", "norm_mode")}
        with HessianOperator(model, F.cross_entropy, data, **op_kwargs, **more) as op:
            v = torch.randn(op.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
            out.update(hv=op.matvec(v).numpy(), grad=op.gradient().numpy(), loss=op.loss())
    return out


def _error(fn: Any) -> str:
    try:
        fn()
    except HessianError as err:
        return str(err)
    return "no error"


def _worker(rank: int, port: int, states: dict, data: tuple, out: Path) -> None:
    """One rank: every case on its shard, then the cases where the ranks disagree."""
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo on the loopback device
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),
    )
    try:
        x, y = data
        results: dict[str, Any] = {}
        for case in CASES:
            lo, hi = (0, case.split) if rank == 0 else (case.split, case.rows)
            model = _model(case.norm, states[case.norm])
            results[case.name] = _measure(model, (x[lo:hi], y[lo:hi]), case.kwargs)
        model = _model("batch", states["batch"])
        shard = (x[:32], y[:32]) if rank == 0 else (x[32:], y[32:])
        # distributed=False: this rank's shard alone, no collective
        results["opt_out"] = _measure(model, shard, {"chunk_size": 16}, distributed=False)
        trace = dict(what="trace", trace_samples=2, chunk_size=16)
        results["seed_mismatch"] = _error(
            lambda: hessian_spectrum(model, F.cross_entropy, shard, **trace, seed=rank)
        )
        results["bad_argument"] = _error(
            lambda: HessianOperator(model, F.cross_entropy, shard, chunk_size=16 - 16 * rank)
        )
        other = _model("batch", states["batch"])
        if rank == 1:
            with torch.no_grad():
                other.head.bias[0] += 1e-12
        results["parameter_mismatch"] = _error(
            lambda: HessianOperator(other, F.cross_entropy, shard, chunk_size=16)
        )

        def per_example_on_rank_1(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, target, reduction="none" if rank else "mean")

        op = HessianOperator(model, per_example_on_rank_1, shard, chunk_size=16)
        results["failed_product"] = _error(lambda: op.matvec(torch.ones(op.dim)))
        other = _model("batch", states["batch"])
        if rank == 1:
            other.blocks[0].norm.running_mean += 0.1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            HessianOperator(model, F.cross_entropy, shard, norm_mode="eval")  # same buffers
            HessianOperator(other, F.cross_entropy, shard, norm_mode="train")  # buffers unused
            HessianOperator(other, F.cross_entropy, shard, norm_mode="eval")
        results["buffer_warnings"] = [str(w.message) for w in caught]
        results["still_in_step"] = HessianOperator(model, F.cross_entropy, shard).loss()
        group = dist.new_group([0, 1])
        results["own_group"] = HessianOperator(
            model, F.cross_entropy, shard, process_group=group
        ).loss()
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def setup() -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
    return _models(), _probe_set()


@pytest.fixture(scope="module")
def ranks(setup, tmp_path_factory) -> list[dict[str, Any]]:
    """What each of the two ranks computed, case by case (about 25 s on 2 cores: tests marked slow)."""
    states, data = setup
    out = tmp_path_factory.mktemp("ranks")
    mp.start_processes(
        _worker, args=(_free_port(), states, data, out), nprocs=2, start_method="spawn"
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    scale = float(np.abs(want["top"]).max())
    atol = 1e-10 * scale
    np.testing.assert_allclose(got["top"], want["top"], rtol=0, atol=atol)
    np.testing.assert_allclose(got["nodes"], want["nodes"], rtol=0, atol=atol)
    np.testing.assert_allclose(got["weights"], want["weights"], rtol=0, atol=1e-10)
    trace_scale = float(np.abs(want["trace_samples"]).max())
    np.testing.assert_allclose(
        got["trace_samples"], want["trace_samples"], rtol=0, atol=1e-10 * trace_scale
    )
    assert got["num_samples"] == want["num_samples"]
    assert got["num_classes"] == want["num_classes"] == 10
    if "hv" in want:
        np.testing.assert_allclose(got["hv"], want["hv"], rtol=0, atol=1e-10 * scale)
        np.testing.assert_allclose(got["grad"], want["grad"], rtol=0, atol=1e-12)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_two_ranks_match_one_process_on_the_whole_set(case: Case, setup, ranks) -> None:
    states, (x, y) = setup
    model = _model(case.norm, states[case.norm])
    one = _measure(model, (x[: case.rows], y[: case.rows]), case.kwargs)
    assert one["world_size"] == 1
    first, second = ranks[0][case.name], ranks[1][case.name]
    assert first["world_size"] == second["world_size"] == 2
    _assert_same(first, one)
    # every rank returns the very same numbers
    for key, value in first.items():
        np.testing.assert_array_equal(np.asarray(second[key]), np.asarray(value), err_msg=key)


@pytest.mark.slow
def test_train_mode_counts_chunks_over_every_rank(ranks) -> None:
    assert ranks[0]["uneven_batch_train"]["num_chunks"] == 8  # 5 + 3
    assert ranks[0]["uneven_batch_eval"]["num_chunks"] == 5  # 3 + 2


@pytest.mark.slow
def test_distributed_false_uses_the_rank_s_shard_alone(setup, ranks) -> None:
    states, (x, y) = setup
    for rank, rows in ((0, slice(0, 32)), (1, slice(32, 64))):
        model = _model("batch", states["batch"])
        alone = _measure(model, (x[rows], y[rows]), {"chunk_size": 16})
        got = ranks[rank]["opt_out"]
        assert got["world_size"] == 1 and got["num_samples"] == 32
        _assert_same(got, alone)


@pytest.mark.slow
def test_ranks_that_disagree_all_raise_instead_of_hanging(ranks) -> None:
    for r in ranks:
        assert "vectors differ" in r["seed_mismatch"]
        assert "parameters on rank(s) 1 differ" in r["parameter_mismatch"]
        assert r["still_in_step"] > 0  # the collectives stayed matched after the errors
    assert "chunk_size must be a positive integer" in ranks[1]["bad_argument"]
    assert "loss_fn must return the mean loss" in ranks[1]["failed_product"]
    assert "rank(s) 1 failed computing their share" in ranks[0]["failed_product"]
    for r in ranks:  # running statistics that differ are used as they are, with a warning
        assert len(r["buffer_warnings"]) == 1
        assert "buffers (running statistics) differ" in r["buffer_warnings"][0]
    assert "rank(s) 1 could not set up" in ranks[0]["bad_argument"]


@pytest.mark.slow
def test_a_process_group_of_one_s_own(ranks) -> None:
    for r in ranks:
        assert r["own_group"] == r["still_in_step"]


def test_without_torch_distributed_one_process_computes_alone() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    data = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    op = HessianOperator(net, F.cross_entropy, data)
    assert op.shards is None and op.world_size == 1 and op.rank_samples == (8,)
    with pytest.raises(HessianError, match="torch.distributed is not initialized"):
        HessianOperator(net, F.cross_entropy, data, distributed=True)
    with pytest.raises(HessianError, match="process_group was given with distributed=False"):
        HessianOperator(net, F.cross_entropy, data, distributed=False, process_group=object())
    with pytest.raises(HessianError, match="distributed must be True, False or None"):
        hessian_spectrum(net, F.cross_entropy, data, distributed="yes")  # type: ignore[arg-type]
    with pytest.raises(HessianError, match="x has no samples"):  # only a rank may be empty
        HessianOperator(net, F.cross_entropy, (data[0][:0], data[1][:0]))
