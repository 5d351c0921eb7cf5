"""The ILP against brute-force enumeration: optimum, ties, pins, infeasibility minimums."""

import itertools

import numpy as np
import pytest

from hessq.plan import InfeasibleLimitsError
from hessq.plan._ilp import LIMIT_NAMES, solve
from hessq.plan._ties import merge_ties


def random_instance(rng):
    L = int(rng.integers(1, 9))
    K = 3
    names = [f"l{i}" for i in range(L)]
    bits = np.sort(rng.choice(np.arange(2, 9), K, replace=False))
    n = rng.integers(10, 2000, L)
    omega = rng.uniform(0.01, 10, L)[:, None] * n[:, None] * 4.0 ** (-bits[None, :]) * rng.uniform(0.5, 1.5, (L, K))
    costs = {
        "size": np.ceil(n[:, None] * bits[None, :] / 8) + rng.integers(0, 50, L)[:, None],
        "bops": (rng.integers(1, 100, L) * n)[:, None] * bits[None, :] * 8,
        # latency: not monotone in bits, floats
        "latency": rng.uniform(1e-6, 1e-4, (L, K)),
    }
    costs = {k: v.astype(np.float64) for k, v in costs.items()}
    ties = []
    for _ in range(int(rng.integers(0, 3))):
        if L >= 2:
            ties.append(list(rng.choice(names, int(rng.integers(2, min(L, 3) + 1)), replace=False)))
    allowed = np.ones((L, K), dtype=bool)
    for i in range(L):
        if rng.random() < 0.15:  # pinned layer
            allowed[i] = False
            allowed[i, rng.integers(K)] = True
    which = list(rng.choice(LIMIT_NAMES, int(rng.integers(2, 4)), replace=False))
    return names, bits, omega, costs, ties, allowed, which


def group(names, ties, layer_matrix, allowed=None):
    groups = merge_ties(names, ties)
    idx = {n: i for i, n in enumerate(names)}
    mat = np.stack([layer_matrix[[idx[n] for n in g]].sum(0) for g in groups])
    if allowed is not None:
        ok = np.stack([allowed[[idx[n] for n in g]].all(0) for g in groups])
        return groups, mat, ok
    return groups, mat


def brute_force(names, omega, costs, ties, allowed):
    """All per-layer assignments that respect ties and pins: (assignments, Ω, cost totals)."""
    L, K = omega.shape
    assign = np.array(list(itertools.product(range(K), repeat=L)))
    ok = allowed[np.arange(L)[None, :], assign].all(1)
    idx = {n: i for i, n in enumerate(names)}
    for tie in ties:
        cols = assign[:, [idx[n] for n in tie]]
        ok &= (cols == cols[:, :1]).all(1)
    assign = assign[ok]
    rows = np.arange(L)[None, :]
    om = omega[rows, assign].sum(1)
    tot = {k: v[rows, assign].sum(1) for k, v in costs.items()}
    return assign, om, tot


def test_ilp_matches_brute_force_on_200_instances():
    rng = np.random.default_rng(1234)
    feasible = infeasible = 0
    for trial in range(200):
        names, bits, omega, costs, ties, allowed, which = random_instance(rng)
        assign, om, tot = brute_force(names, omega, costs, ties, allowed)
        if not len(assign):
            continue  # pins on tied layers disagree: not an instance
        groups, g_omega, g_ok = group(names, ties, omega, allowed)
        if not g_ok.any(1).all():
            continue
        g_omega = np.where(g_ok, g_omega, np.inf)
        g_costs = {k: group(names, ties, v)[1] for k, v in costs.items()}
        # limits between the brute-force min and max; about a fifth made infeasible on purpose
        limits = {}
        for k in which:
            lo, hi = tot[k].min(), tot[k].max()
            f = rng.uniform(-0.15, 1.0)
            limits[k] = lo + f * (hi - lo) if f >= 0 else lo * (1 + f * 0.1) - 1e-9
        meet = np.ones(len(assign), dtype=bool)
        for k, v in limits.items():
            meet &= tot[k] <= v
        if meet.any():
            feasible += 1
            sol = solve(g_omega, g_costs, limits)
            best = om[meet].min()
            assert sol.objective == pytest.approx(best, rel=1e-6, abs=1e-9 * om.max()), trial
            # the plan itself meets every limit and has the objective it claims
            for k, v in limits.items():
                total = g_costs[k][np.arange(len(groups)), sol.choice].sum()
                assert total <= v * (1 + 1e-9) + 1e-12
            assert g_omega[np.arange(len(groups)), sol.choice].sum() == pytest.approx(sol.objective)
        else:
            infeasible += 1
            with pytest.raises(InfeasibleLimitsError) as info:
                solve(g_omega, g_costs, limits)
            err = info.value
            for k in limits:
                assert err.minimum[k] == pytest.approx(tot[k].min(), rel=1e-9), (trial, k)
                others = [o for o in limits if o != k]
                meet_others = np.ones(len(assign), dtype=bool)
                for o in others:
                    meet_others &= tot[o] <= limits[o]
                if meet_others.any():
                    assert err.minimum_with_others[k] == pytest.approx(tot[k][meet_others].min(), rel=1e-6), (trial, k)
                else:
                    assert err.minimum_with_others[k] is None
    assert feasible >= 100 and infeasible >= 20, (feasible, infeasible)


def test_merge_ties_unions_overlapping_ties_in_network_order():
    names = ["a", "b", "c", "d", "e"]
    assert merge_ties(names, [["d", "b"], ["b", "e"]]) == [["a"], ["b", "d", "e"], ["c"]]
    assert merge_ties(names, []) == [[n] for n in names]


def test_no_limit_gives_least_omega():
    omega = np.array([[3.0, 2.0, 1.0], [5.0, 3.5, 0.5]])
    costs = {"size": np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])}
    assert list(solve(omega, costs, {}).choice) == [2, 2]
    # tight size: exactly one layer can go up by one step; layer 1 gains more
    assert list(solve(omega, costs, {"size": 3.0}).choice) == [0, 1]


def test_infeasible_message_names_the_smallest_reachable_value():
    omega = np.array([[2.0, 1.0], [2.0, 1.0]])
    costs = {"size": np.array([[100.0, 200.0], [300.0, 600.0]]), "bops": np.array([[10.0, 1.0], [10.0, 1.0]])}
    with pytest.raises(InfeasibleLimitsError, match=r"size_limit=350 bytes: smallest reachable 400 bytes") as info:
        solve(omega, costs, {"size": 350.0})
    assert info.value.minimum == {"size": 400.0}
    # each feasible alone, not together: the message gives the minimum under the other limit
    with pytest.raises(InfeasibleLimitsError, match=r"500 bytes while meeting the other limits") as info:
        solve(omega, costs, {"size": 450.0, "bops": 11.0})
    assert info.value.minimum == {"size": 400.0, "bops": 2.0}
    assert info.value.minimum_with_others == {"size": 500.0, "bops": 20.0}
