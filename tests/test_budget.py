"""Budget parsing and the planner's arithmetic (the memory promise itself is measured
in test_memory.py)."""

import dask.config
import pytest

import pipeline as pl
from pipeline.budget import RUNTIME_OVERHEAD, format_bytes, parse_budget, plan
from pipeline.errors import BudgetError


@pytest.mark.parametrize("text, expected", [
    ("1.5GiB", 3 * 2**29), ("256MiB", 256 * 2**20), ("2GB", 2 * 10**9), ("512 mib", 512 * 2**20),
    ("1e9", 10**9), (4096, 4096), ("100kB", 100_000), ("3TiB", 3 * 2**40),
])
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "1.5 GiBs", "-1GiB", "0", 0, -5, True, "nanGB", "1e999"])
def test_parse_budget_rejects_with_a_fix(bad):
    with pytest.raises(BudgetError, match="memory_budget=.*(size|positive)"):
        parse_budget(bad)


def test_default_budget_from_dask_config():
    with dask.config.set({"pipeline.memory-budget": "300MiB"}):
        assert parse_budget(None) == 300 * 2**20
    with dask.config.set({"pipeline.memory-budget": "nonsense"}):
        with pytest.raises(BudgetError, match="pipeline.memory-budget"):
            parse_budget(None)
    assert parse_budget(None) >= 256 * 2**20


SHAPES = {
    "distances": dict(n_x=10_000, n_y=50_000, n_features=3072, itemsize=4),
    "knn": dict(n_query=1000, n_train=50_000, n_features=3072, k=5, itemsize=4),
    "gmm": dict(n_samples=1_000_000, n_features=900, n_components=2, itemsize=8),
}


@pytest.mark.parametrize("op", sorted(SHAPES))
@pytest.mark.parametrize("budget", ["256MiB", "512MiB", "2GiB", "16GiB"])
def test_plan_stays_inside_budget(op, budget):
    p = plan(op, memory_budget=budget, threads=2, **SHAPES[op])
    assert 0 < p.peak <= parse_budget(budget)
    assert p.peak == sum(item.total for item in p.items)
    text = p.explain()
    assert "predicted peak" in text and format_bytes(p.peak) in text


@pytest.mark.parametrize("op", sorted(SHAPES))
def test_bigger_budget_bigger_blocks(op):
    small = plan(op, memory_budget="256MiB", threads=2, **SHAPES[op])
    big = plan(op, memory_budget="4GiB", threads=2, **SHAPES[op])
    key = "rows" if op == "gmm" else "train_rows"
    assert big[key] >= small[key]
    assert big.peak > small.peak


def test_knn_plan_reads_train_once_when_it_can():
    p = plan("knn", memory_budget="1GiB", threads=2, **SHAPES["knn"])
    assert p["query_rows"] == 1000 and p["train_reads"] == 1
    # 256 MiB: held training blocks, and the graph of the many blocks 64 MiB would take
    # (over 50000 tasks), do not fit in less.
    tiny = plan("knn", memory_budget="256MiB", threads=2, n_query=100_000, n_train=50_000,
                n_features=3072, k=5, itemsize=4)
    assert tiny["query_rows"] < 100_000 and tiny["train_reads"] > 1


@pytest.mark.parametrize("op", sorted(SHAPES))
def test_too_small_budget_names_a_minimum_that_works(op):
    with pytest.raises(BudgetError, match=r"too small .* give --memory-budget (\d+)MiB") as e:
        plan(op, memory_budget="1MiB", threads=2, **SHAPES[op])
    minimum = int(str(e.value).split("--memory-budget ")[1].split("MiB")[0])
    assert plan(op, memory_budget=f"{minimum}MiB", threads=2, **SHAPES[op]).peak <= minimum * 2**20


def test_gmm_shards_components_when_parameters_do_not_fit():
    shape = dict(n_samples=1_000_000, n_features=900, n_components=200, itemsize=8)
    with pytest.raises(BudgetError, match=r"even one component at a time \(sharded parameters") as e:
        plan("gmm", memory_budget="1MiB", threads=2, **shape)
    minimum = int(str(e.value).split("--memory-budget ")[1].split("MiB")[0])
    p = plan("gmm", memory_budget=f"{minimum}MiB", threads=2, **shape)
    assert p["sharded"] and p.peak <= minimum * 2**20
    assert p["component_groups"] == -(-200 // p["component_group"])
    # The users' job: refused before (3.632 GiB of parameters in the driver), now planned
    # inside 2 GiB with the driver holding O(K d).
    users = plan("gmm", memory_budget="2GiB", threads=2, **shape)
    assert users["sharded"] and users.peak <= 2 * 2**30
    assert users.items[0].name == "parameters (driver)" and users.items[0].total < 16 * 2**20
    one = plan("gmm", memory_budget="2GiB", threads=2, **SHAPES["gmm"])
    assert not one["sharded"] and one["component_group"] == 2 and one["passes"] == 1


@pytest.mark.parametrize("n,d,budget,workers", [(2_000_000, 2500, "16GiB", 1), (2_000_000, 10_000, "64GiB", 16)])
def test_gmm_plans_the_next_scales(n, d, budget, workers):
    p = plan("gmm", memory_budget=budget, threads=2, workers=workers, n_samples=n, n_features=d,
             n_components=200, itemsize=8)
    assert p["sharded"] and p.peak <= p.budget
    # The reads it states are those of its blocks and groups.
    groups, blocks = p["component_groups"], -(-n // p["rows"])
    assert p["x_reads"] == (1 if p["order"] == "rows" else groups) + groups
    assert p["param_reads"] == (blocks if p["order"] == "rows" else p["e_runs"])
    assert p["e_runs"] == min(blocks, -(-2 * 2 * workers // groups))
    assert p["x_bytes"] == p["x_reads"] * n * d * 8
    # The other order would move at least as many bytes.
    other = "groups" if p["order"] == "rows" else "rows"
    from pipeline.budget import sharded_traffic
    alt = sharded_traffic(p["rows"], p["component_group"], other, n_samples=n, n_features=d, n_components=200,
                          itemsize=8, m_runs=p["m_runs"], tasks=2 * workers)
    assert alt["bytes"] >= p["bytes"]


def test_plan_rejects_unknown_op_and_bad_shapes():
    with pytest.raises(BudgetError, match="unknown operation 'pca'.*distances"):
        plan("pca", memory_budget="1GiB", n_x=1)
    with pytest.raises(BudgetError, match="n_features=0"):
        plan("knn", memory_budget="1GiB", threads=1, n_query=1, n_train=1, n_features=0)


def test_plan_is_public_and_threads_default_from_dask():
    with dask.config.set(num_workers=3):
        assert pl.plan("knn", memory_budget="1GiB", **SHAPES["knn"]).threads == 3
    assert RUNTIME_OVERHEAD > 0
