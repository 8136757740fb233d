"""dalbt.selection.select: query strategies on arrays of a user's model outputs."""

import inspect
import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

import dalbt.selection
from dalbt.errors import DalbtError
from dalbt.outputs import Outputs
from dalbt.selection import MODEL_LEVEL_API, select
from dalbt.strategies import STRATEGIES, QueryContext, Strategy, build_strategy
from dalbt.strategies.bayesian import BaldStrategy

N, L, K, D, T = 40, 24, 3, 4, 5
FAST = {"waal": {"steps": 10}}  # the critic's default 500 steps take seconds on a busy CPU
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "select_from_arrays.py"


def _arrays(seed=0):
    """Every input a strategy may read, for a small pool and labelled set (numpy)."""
    rng = np.random.default_rng(seed)
    targets = np.arange(L) % K
    lab_logits = 3.0 * np.eye(K)[targets] + rng.normal(size=(L, K))
    return {
        "probs": rng.dirichlet(np.ones(K), size=N),
        "embeddings": rng.normal(size=(N, D)),
        "mc_probs": rng.dirichlet(np.ones(K), size=(N, T)),
        "labelled_embeddings": rng.normal(size=(L, D)) + targets[:, None],
        "labelled_probs": np.exp(lab_logits) / np.exp(lab_logits).sum(1, keepdims=True),
        "labelled_targets": targets,
    }


def _torch(arrays):
    return {k: torch.as_tensor(v) for k, v in arrays.items()}


def _run(name, budget=8, **arrays):
    return select(name, budget, **arrays, **FAST.get(name, {}))


def _one_line(exc):
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_runs_on_arrays_or_points_to_the_model_level_api(name):
    arrays = _arrays()
    try:
        got = _run(name, **arrays)
    except DalbtError as exc:
        msg = str(exc)
        assert MODEL_LEVEL_API in msg and repr(name) in msg and "\n" not in msg
        return
    assert got.dtype == np.int64 and got.shape == (8,)
    assert len(np.unique(got)) == 8 and got.min() >= 0 and got.max() < N
    # reproducible, the same from torch tensors, and given in the caller's dataset indices
    np.testing.assert_array_equal(_run(name, **arrays), got)
    np.testing.assert_array_equal(_run(name, **_torch(arrays)), got)
    ids = np.arange(N) * 7 + 1000
    np.testing.assert_array_equal(_run(name, **arrays, indices=ids), ids[got])


# What each strategy reads, as the module docstring documents it: (pool inputs, labelled inputs,
# runs without any labelled set). "probs" stands for probs or logits.
NEEDS = {
    "random": (set(), set(), True),
    "entropy": ({"probs"}, set(), True),
    "least-confidence": ({"probs"}, set(), True),
    "margin": ({"probs"}, set(), True),
    "badge": ({"probs", "embeddings"}, set(), True),
    "coreset": ({"embeddings"}, {"labelled_embeddings"}, True),
    "typiclust": ({"embeddings"}, {"labelled_embeddings"}, True),
    "probcover": ({"embeddings"}, {"labelled_embeddings"}, True),
    "weibull": ({"probs", "embeddings"},
                {"labelled_embeddings", "labelled_probs", "labelled_targets"}, False),
    "weibull-balanced": ({"probs", "embeddings"},
                         {"labelled_embeddings", "labelled_probs", "labelled_targets"}, False),
    "dalbt": ({"probs", "embeddings"},
              {"labelled_embeddings", "labelled_probs", "labelled_targets"}, True),
    "waal": ({"probs", "embeddings"}, {"labelled_embeddings"}, False),
    "mc-dropout": ({"mc_probs"}, set(), True),
    "bald": ({"mc_probs"}, set(), True),
    "var-ratio": ({"mc_probs"}, set(), True),
    "batchbald": ({"mc_probs"}, set(), True),
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_documented_inputs_are_what_each_strategy_reads(name):
    """Leaving out one input at a time: the strategy fails naming exactly the inputs of the
    table, and runs without the labelled set exactly where the table says so."""
    full = _arrays()
    if name not in NEEDS:
        with pytest.raises(DalbtError, match="model-level API"):
            _run(name, **full)
        return
    assert name in re.split(r"[\s,]+", dalbt.selection.__doc__), "add it to the docstring table"
    pool_needs, lab_needs, cold = NEEDS[name]
    needed = set()
    for key in full:
        try:
            _run(name, **{k: v for k, v in full.items() if k != key})
        except DalbtError as exc:
            assert f"strategy {name!r} needs {key}" in str(exc)
            needed.add(key)
    assert needed == pool_needs | lab_needs
    pool_only = {k: v for k, v in full.items() if not k.startswith("labelled")}
    if cold:
        assert len(_run(name, **pool_only)) == 8
    else:
        with pytest.raises(DalbtError, match="labelled_embeddings"):
            _run(name, **pool_only)


def test_margin_picks_the_smallest_top2_gaps():
    gaps = np.array([0.9, 0.05, 0.5, 0.01, 0.3, 0.2, 0.6])
    # p1 - p2 = gap, p1 + p2 = 0.98, and a third class of 0.02 below both
    probs = np.stack([(0.98 + gaps) / 2, (0.98 - gaps) / 2, np.full(len(gaps), 0.02)], axis=1)
    want = np.argsort(gaps)[:3]
    assert want.tolist() == [3, 1, 5]
    assert select("margin", 3, probs=probs).tolist() == want.tolist()
    assert select("margin", 3, logits=np.log(probs)).tolist() == want.tolist()
    assert build_strategy("margin").query(3, probs=torch.tensor(probs)).tolist() == want.tolist()


def test_coreset_picks_the_farthest_points_first():
    pool = np.array([[1.0], [2.0], [5.0], [10.0]])
    got = select("coreset", 3, embeddings=pool, labelled_embeddings=np.zeros((1, 1)))
    assert got.tolist() == [3, 2, 1]  # 10 (farthest from 0), then 5 (5 from both), then 2


def test_entropy_on_probs_queries_the_uniform_row_first():
    probs = np.array([[0.8, 0.1, 0.1], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.4, 0.1]])
    assert select("entropy", 3, probs=probs).tolist() == [1, 2, 0]


@pytest.mark.parametrize(("name", "drop", "argument"), [
    ("bald", "mc_probs", "mc_probs: MC-dropout class probabilities of the pool, shape (N, T, K)"),
    ("margin", "probs", "probs or logits"),
    ("coreset", "embeddings", "embeddings"),
    ("badge", "embeddings", "embeddings"),
    ("weibull", "labelled_targets", "labelled_targets"),
    ("weibull", "labelled_probs", "labelled_probs or labelled_logits"),
])
def test_missing_input_error_names_the_argument(name, drop, argument):
    arrays = {k: v for k, v in _arrays().items() if k != drop}
    with pytest.raises(DalbtError) as exc:
        select(name, 5, **arrays)
    assert f"strategy {name!r} needs {argument}" in _one_line(exc)


@pytest.mark.parametrize(("change", "message"), [
    (lambda a: {**a, "embeddings": a["embeddings"][:-1]}, "rows (N): probs 40, embeddings 39"),
    (lambda a: {**a, "labelled_targets": a["labelled_targets"][:-1]}, "rows (L)"),
    (lambda a: {**a, "labelled_embeddings": a["labelled_embeddings"][:, :2]},
     "embedding dimensions (D)"),
    (lambda a: {**a, "mc_probs": np.full((N, T, 2), 0.5)}, "classes (K)"),
    (lambda a: {**a, "probs": a["probs"][:, :, None]}, "probs must have shape (N, K)"),
    (lambda a: {**a, "embeddings": np.where(np.eye(N, D) > 0, np.nan, a["embeddings"])},
     "embeddings has NaN"),
    (lambda a: {**a, "probs": a["probs"] * 2}, "probs must"),
    (lambda a: {**a, "probs": a["probs"] - 0.5}, "probabilities in"),
    (lambda a: {**a, "logits": np.log(a["probs"])}, "either probs or logits"),
    (lambda a: {**a, "labelled_targets": a["labelled_targets"] + 1}, "label 3 but there are 3"),
    (lambda a: {**a, "indices": np.zeros(N, dtype=int)}, "indices must be unique"),
    (lambda a: {**a, "num_classes": 5}, "classes (K)"),
])
def test_inconsistent_inputs_are_rejected_on_one_line(change, message):
    with pytest.raises(DalbtError, match=re.escape(message)) as exc:
        select("weibull", 5, **change(_arrays()))
    _one_line(exc)


def test_bad_calls_name_the_fix():
    probs = _arrays()["probs"]
    with pytest.raises(DalbtError, match="budget must be a positive integer"):
        select("margin", 0, probs=probs)
    with pytest.raises(DalbtError, match="unknown strategy 'nope'"):
        select("nope", 5, probs=probs)
    with pytest.raises(DalbtError, match="did you mean 'embeddings'"):
        select("coreset", 5, embedding=probs)
    with pytest.raises(DalbtError, match="only go with a strategy name"):
        select(build_strategy("margin"), 5, probs=probs, chunk=3)
    with pytest.raises(DalbtError, match="select needs the pool"):
        select("random", 5)
    with pytest.raises(DalbtError, match="option samples=5"):
        select(BaldStrategy(samples=20), 5, mc_probs=_arrays()["mc_probs"])
    with pytest.raises(DalbtError, match="T >= 2"):
        select("bald", 5, mc_probs=_arrays()["mc_probs"][:, :1])


def test_mobyv2al_and_image_strategies_point_to_the_model_level_api():
    for name in ("mobyv2al", "vaal", "pt4al", "dal-osr", "ensemble-varratio"):
        with pytest.raises(DalbtError) as exc:
            select(name, 5, **_arrays())
        assert MODEL_LEVEL_API in _one_line(exc), name


def test_same_seed_same_indices_other_seed_other_indices_and_no_global_rng():
    probs = _arrays()["probs"]
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    a = select("random", 10, probs=probs, seed=3)
    b = select("random", 10, probs=probs, seed=3)
    c = select("random", 10, probs=probs, seed=4)
    select("waal", 5, **_arrays(), steps=5)  # trains a critic: torch's global RNG untouched too
    np.testing.assert_array_equal(a, b)
    assert a.tolist() != c.tolist()
    np.testing.assert_array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_small_pool_and_empty_pool():
    probs = _arrays()["probs"][:3]
    assert sorted(select("entropy", 10, probs=probs).tolist()) == [0, 1, 2]
    assert select("entropy", 10, probs=np.empty((0, K))).shape == (0,)


def test_mc_strategies_take_T_from_mc_probs():
    mc = _arrays()["mc_probs"]
    got = select("bald", 6, mc_probs=mc)
    assert got.tolist() == select(BaldStrategy(samples=T), 6, mc_probs=mc).tolist()


def test_strategy_query_has_the_same_keywords_as_select():
    sel = inspect.signature(select).parameters
    query = inspect.signature(Strategy.query).parameters
    keywords = [p for p, v in sel.items() if v.kind is v.KEYWORD_ONLY]
    assert keywords == [p for p, v in query.items() if v.kind is v.KEYWORD_ONLY]
    arrays = _arrays()
    np.testing.assert_array_equal(build_strategy("badge").query(7, **arrays, seed=2),
                                  select("badge", 7, **arrays, seed=2))


def test_outputs_accept_numpy_arrays():
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]])  # float64, as numpy makes them
    out = Outputs(indices=[4, 9], logits=logits, latents=np.ones((2, 2)))
    assert out.logits.dtype == torch.float32 and out.latents.dtype == torch.float32
    assert out.indices.dtype == np.int64
    assert out.predictions.tolist() == [1, 0]
    torch.testing.assert_close(out.probs.sum(1), torch.ones(2))
    # the failing path of the issue: a context whose scorer returns numpy-backed Outputs
    ctx = QueryContext(unlabelled=np.array([4, 9]), labelled=np.empty(0, np.int64),
                       labelled_targets=np.empty(0, np.int64), num_classes=3,
                       rng=np.random.default_rng(0),
                       scorer=lambda idx: Outputs(indices=idx, logits=logits,
                                                  latents=np.ones((2, 2))))
    assert build_strategy("margin").select(ctx, 1).tolist() == [4]
    assert len(build_strategy("badge").select(ctx, 2)) == 2


def test_example_script_runs():
    result = runpy.run_path(str(EXAMPLE), run_name="example")
    pool = set(result["pool"].tolist())
    for name in ("margin", "coreset", "weibull"):
        picked = result[name]
        assert len(picked) == 20 and len(set(picked.tolist())) == 20, name
        assert set(picked.tolist()) <= pool, name
