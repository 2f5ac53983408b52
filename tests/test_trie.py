"""Tests of trie.py: token-level advantages of T-SPMO [E7] [E8] [E9], U, the forward-pass plan, the token fraction;
TreeRL's advantage on the same trie [B2] (the estimator "treerl").

Hand-drawn example used below (rewards in brackets):

    i  completion  R           root (count 3, mean 2/3)
    0  [1, 2, 3]   1             └─1─> [1] (3, 2/3)          A(1|root) = 2/3 − 2/3 =  0
    1  [1, 2, 4]   0                    ├─2─> [1,2] (2, 1/2)  A(2|1)    = 1/2 − 2/3 = −1/6
    2  [1, 5]      1                    │       ├─3─> [1,2,3] (1, 1)   A(3|1,2) = 1 − 1/2 = +1/2
                                        │       └─4─> [1,2,4] (1, 0)   A(4|1,2) = 0 − 1/2 = −1/2
                                        └─5─> [1,5] (1, 1)    A(5|1)    = 1 − 2/3   = +1/3
"""
import math
import random
from fractions import Fraction

import pytest

from trie import Edge, PrefixTrie, Target

COMPLETIONS = [[1, 2, 3], [1, 2, 4], [1, 5]]
REWARDS = [1.0, 0.0, 1.0]


def edge_map(trie: PrefixTrie) -> dict[tuple[tuple[int, ...], int], Edge]:
    """(prefix tokens p, token v) -> Edge, recovering p by walking parents up to the root."""
    out = {}
    for e in trie.edges:
        p, n = [], e.parent
        while n != 0:
            p.append(trie.token[n])
            n = trie.parent[n]
        out[(tuple(reversed(p)), e.token)] = e
    return out


# ---- the hand-drawn example -----------------------------------------------------------------------------------
def test_hand_example_means_E8_E9():
    trie = PrefixTrie(COMPLETIONS, REWARDS)
    assert trie.num_nodes == 6  # root, [1], [1,2], [1,2,3], [1,2,4], [1,5]
    node = {p: e.child for (q, v), e in edge_map(trie).items() for p in [q + (v,)]}
    assert trie.mean_reward(0) == pytest.approx(2 / 3, abs=1e-15)          # [E8] (1 + 0 + 1) / 3
    assert trie.count[0] == 3 and trie.depth[0] == 0
    assert trie.mean_reward(node[(1,)]) == pytest.approx(2 / 3, abs=1e-15)  # [E9] all three start with 1
    assert trie.mean_reward(node[(1, 2)]) == 0.5                            # [E9] (1 + 0) / 2
    assert trie.mean_reward(node[(1, 5)]) == 1.0
    assert trie.mean_reward(node[(1, 2, 3)]) == 1.0
    assert trie.mean_reward(node[(1, 2, 4)]) == 0.0
    assert [trie.count[node[p]] for p in [(1,), (1, 2), (1, 5), (1, 2, 3)]] == [3, 2, 1, 1]
    assert [trie.depth[node[p]] for p in [(1,), (1, 2), (1, 2, 3)]] == [1, 2, 3]


def test_hand_example_advantages_E7_and_U():
    trie = PrefixTrie(COMPLETIONS, REWARDS)
    edges = edge_map(trie)
    assert len(trie.edges) == 5  # |U| = 5, the zero-advantage edge (root, 1) included
    expected = {((), 1): 0.0, ((1,), 2): -1 / 6, ((1,), 5): 1 / 3, ((1, 2), 3): 0.5, ((1, 2), 4): -0.5}
    assert set(edges) == set(expected)
    for key, a in expected.items():
        assert edges[key].advantage == pytest.approx(a, abs=1e-15), key
        assert edges[key].depth == len(key[0])
    assert edges[((), 1)].advantage == 0.0  # exactly 0: 2/3 − 2/3, not a rounding residue
    assert {(e.parent, e.token) for e in trie.nonzero_edges()} == {
        (edges[k].parent, k[1]) for k in [((1,), 2), ((1,), 5), ((1, 2), 3), ((1, 2), 4)]}
    assert len(trie.nonzero_edges(tol=0.4)) == 2  # only the ±1/2 edges
    # Edges come in order of first appearance: 1, 2, 3 (completion 0), 4 (completion 1), 5 (completion 2).
    assert [e.token for e in trie.edges] == [1, 2, 3, 4, 5]


def test_hand_example_targets():
    # Needed prefixes: [1] (edges 2, 5 are non-zero) and [1,2] (edges 3, 4); the root is not needed (A(1|root) = 0).
    # [1,2] is deepest: its lowest-index completion is 0, whose forward also covers [1]. One forward in all.
    targets = PrefixTrie(COMPLETIONS, REWARDS).targets()
    assert [(t.completion, t.positions, t.tokens) for t in targets] == [(0, [1, 2], [[2, 5], [3, 4]])]
    assert targets[0].advantages == [pytest.approx([-1 / 6, 1 / 3], abs=1e-15), [0.5, -0.5]]


def test_hand_example_nonzero_token_fraction():
    # 3 + 3 + 2 = 8 tokens; non-zero: completion 0 positions 1, 2; completion 1 positions 1, 2; completion 2
    # position 1. Position 0 of every completion is the edge (root, 1) with A = 0.  5 / 8.
    assert PrefixTrie(COMPLETIONS, REWARDS).nonzero_token_fraction() == 5 / 8


# ---- brute force from the raw token lists ---------------------------------------------------------------------
def random_group(rng: random.Random, G: int, vocab: int = 3, max_len: int = 6) -> tuple[list[list[int]], list[float]]:
    """Small vocab so prefixes are shared; also duplicates, strict prefixes, empty completions; 3 reward kinds."""
    comps = [[rng.randrange(vocab) for _ in range(rng.randint(0, max_len))] for _ in range(G)]
    for _ in range(rng.randint(0, G // 2)):
        src = rng.choice(comps)
        comps[rng.randrange(G)] = src[: rng.randint(0, len(src))] if rng.random() < 0.5 else list(src)
    kind = rng.choice(["binary", "thirds", "float"])
    if kind == "binary":
        rewards = [float(rng.randrange(2)) for _ in range(G)]
    elif kind == "thirds":  # like the partial-credit reward: k/3 is not exact in binary
        rewards = [rng.randrange(4) / 3 for _ in range(G)]
    else:
        rewards = [rng.uniform(-1, 2) for _ in range(G)]
    return comps, rewards


def brute_advantages(comps, rewards) -> dict[tuple[tuple[int, ...], int], Fraction]:
    """A(v|p) for every (i, t) straight from E7-E9: means over the completions j with y_j[:len] == prefix."""
    def mean(prefix):  # E8 / E9, exact
        rs = [Fraction(r) for y, r in zip(comps, rewards) if tuple(y[: len(prefix)]) == prefix]
        return sum(rs) / len(rs)
    out = {}
    for y in comps:
        for t in range(len(y)):
            p = tuple(y[:t])
            out[(p, y[t])] = mean(p + (y[t],)) - mean(p)  # E7
    return out


SEEDS = range(200)


@pytest.mark.parametrize("seed", SEEDS)
def test_edges_match_brute_force(seed):
    rng = random.Random(seed)
    comps, rewards = random_group(rng, G=rng.randint(1, 12))
    trie = PrefixTrie(comps, rewards)
    brute = brute_advantages(comps, rewards)
    edges = edge_map(trie)
    assert set(edges) == set(brute)  # U is the set of unique (p, v) pairs
    assert len(trie.edges) == len(brute) == trie.num_nodes - 1
    for key, a in brute.items():
        assert abs(edges[key].advantage - float(a)) <= 1e-12, key
        assert (edges[key].advantage == 0.0) == (a == 0), key  # zero exactly when the means are equal
        assert edges[key].depth == len(key[0])
    # Every prefix of every completion (the empty one and the whole one included) is a node with the right mean.
    for i, y in enumerate(comps):
        for t, node in enumerate(trie.paths[i]):
            members = [r for z, r in zip(comps, rewards) if z[:t] == y[:t]]
            assert trie.count[node] == len(members)
            assert trie.mean_reward(node) == pytest.approx(sum(members) / len(members), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_targets_match_brute_force(seed):
    rng = random.Random(1000 + seed)
    comps, rewards = random_group(rng, G=rng.randint(1, 12))
    assert_targets_match(PrefixTrie(comps, rewards), comps, brute_advantages(comps, rewards))


def assert_targets_match(trie: PrefixTrie, comps, brute: dict) -> None:
    """The trie's forward plan against the brute-force advantages: every prefix with an edge A ≠ 0 evaluated exactly
    once, on a completion that contains it, with its non-zero edges and their A; one forward per needed leaf."""
    nonzero_out: dict[tuple[int, ...], dict[int, Fraction]] = {}
    for (p, v), a in brute.items():
        if a != 0:
            nonzero_out.setdefault(p, {})[v] = a
    needed = set(nonzero_out)

    targets = trie.targets()
    assert [t.completion for t in targets] == sorted({t.completion for t in targets})  # sorted, one per completion
    covered = []
    for tg in targets:
        y = comps[tg.completion]
        assert tg.positions == sorted(set(tg.positions))
        assert len(tg.tokens) == len(tg.advantages) == len(tg.positions)
        for j, toks, advs in zip(tg.positions, tg.tokens, tg.advantages):
            assert j <= len(y)  # the prefix y_i[:j] really lies on completion i
            p = tuple(y[:j])
            covered.append(p)
            assert dict(zip(toks, advs)) == pytest.approx({v: float(a) for v, a in nonzero_out[p].items()}, abs=1e-12)
            assert len(toks) == len(set(toks))
    assert sorted(covered) == sorted(needed)  # every needed prefix exactly once, nothing else
    # Minimal: one forward per needed prefix that has no needed strict extension (a path holds at most one).
    leaves = [p for p in needed if not any(len(q) > len(p) and q[: len(p)] == p for q in needed)]
    assert len(targets) == len(leaves)


@pytest.mark.parametrize("seed", SEEDS)
def test_nonzero_token_fraction_matches_brute_force(seed):
    rng = random.Random(2000 + seed)
    comps, rewards = random_group(rng, G=rng.randint(1, 12))
    brute = brute_advantages(comps, rewards)
    total = sum(len(y) for y in comps)
    nonzero = sum(brute[(tuple(y[:t]), y[t])] != 0 for y in comps for t in range(len(y)))
    assert PrefixTrie(comps, rewards).nonzero_token_fraction() == (nonzero / total if total else 0.0)


# ---- B2: TreeRL's estimator on the same trie ------------------------------------------------------------------
def brute_treerl_advantages(comps, rewards) -> dict[tuple[tuple[int, ...], int], tuple[Fraction, int]]:
    """B2's parts for every (i, t) from the raw token lists: the exact numerator (E[R|p∘v] − E[R|root]) +
    (E[R|p∘v] − E[R|p]) and n(p∘v), the number of completions j with y_j[:t+1] == p∘v."""
    def through(prefix):
        return [Fraction(r) for y, r in zip(comps, rewards) if tuple(y[: len(prefix)]) == prefix]
    mean = lambda prefix: sum(through(prefix)) / len(through(prefix))  # noqa: E731
    out = {}
    for y in comps:
        for t in range(len(y)):
            p, pv = tuple(y[:t]), tuple(y[: t + 1])
            out[(p, y[t])] = ((mean(pv) - mean(())) + (mean(pv) - mean(p)), len(through(pv)))
    return out


def test_hand_example_treerl_advantages_B2():
    """B2 on the hand-drawn trie (module docstring): E[R|root] = 2/3, and n(p∘v) the completions through p∘v.

        edge (p, v)   n(p∘v)  E[R|p]  E[R|p∘v]  global E[R|p∘v] − 2/3   local (E7)   B2 = (global + local)/√n
        (root, 1)       3      2/3      2/3          0                   0           0
        ([1], 2)        2      2/3      1/2        −1/6                −1/6         −1/3 / √2 = −√2/6
        ([1,2], 3)      1      1/2      1          +1/3                +1/2         +5/6
        ([1,2], 4)      1      1/2      0          −2/3                −1/2         −7/6
        ([1], 5)        1      2/3      1          +1/3                +1/3         +2/3

    The non-zero edges are E7's here, so the forward plan is too (one forward on completion 0, positions 1 and 2),
    and so is the token fraction (5 of 8); only the values differ."""
    trie = PrefixTrie(COMPLETIONS, REWARDS, estimator="treerl")
    edges = edge_map(trie)
    expected = {((), 1): 0.0, ((1,), 2): -math.sqrt(2) / 6, ((1, 2), 3): 5 / 6, ((1, 2), 4): -7 / 6,
                ((1,), 5): 2 / 3}
    assert set(edges) == set(expected) and len(trie.edges) == 5  # U is the same trie's
    for key, a in expected.items():
        assert edges[key].advantage == pytest.approx(a, abs=1e-15), key
    assert edges[((), 1)].advantage == 0.0  # exactly: 0 + 0 over √3
    assert [trie.advantage(e.child) for e in trie.edges] == trie.treerl_advantages()[1:]
    assert trie.treerl_advantages() != trie.edge_advantages()  # the local estimator's, from the same counts
    targets = trie.targets()
    assert [(t.completion, t.positions, t.tokens) for t in targets] == [(0, [1, 2], [[2, 5], [3, 4]])]
    assert targets[0].advantages == [pytest.approx([-math.sqrt(2) / 6, 2 / 3], abs=1e-15),
                                     pytest.approx([5 / 6, -7 / 6], abs=1e-15)]
    assert trie.nonzero_token_fraction() == 5 / 8


# i  completion  R      root (3, mean 1/3)
# 0  [1, 2, 3]   1        ├─1─> [1] (1, 1) ─2─> [1,2] (1, 1) ─3─> [1,2,3] (1, 1)
# 1  [4, 5]      0        └─4─> [4] (2, 0) ─┬─5─> [4,5] (1, 0)
# 2  [4, 6]      0                          └─6─> [4,6] (1, 0)
CHAIN = ([[1, 2, 3], [4, 5], [4, 6]], [1.0, 0.0, 0.0])


def test_treerl_gives_chains_their_global_term_and_costs_a_second_forward_B2():
    """On CHAIN (above) E7 is non-zero only where the root branches: A(1|root) = 1 − 1/3 = +2/3, A(4|root) = 0 − 1/3
    = −1/3; every deeper edge keeps its parent's mean (A = 0). One needed prefix, the root: one forward, 3 of 7 tokens.

    B2 adds the global term E[R|p∘v] − 1/3 and divides by √n(p∘v):
        (root, 1)  (2/3 + 2/3)/√1 = +4/3        ([1], 2)  (2/3 + 0)/√1 = +2/3       ([1,2], 3)  +2/3
        (root, 4)  (−1/3 − 1/3)/√2 = −√2/3      ([4], 5)  (−1/3 + 0)/√1 = −1/3      ([4], 6)    −1/3
    Every edge is non-zero: the chain [1] → [1,2] → [1,2,3] repeats its global term, as a TreeRL segment's tokens
    share one value. Needed: root, [1], [1,2], [4]; leaves [1,2] (completion 0, which covers the root and [1]) and
    [4] (completion 1): two forwards, 7 of 7 tokens."""
    local, treerl = PrefixTrie(*CHAIN), PrefixTrie(*CHAIN, estimator="treerl")
    assert [(t.completion, t.positions, t.tokens, t.advantages) for t in local.targets()] == [
        (0, [0], [[1, 4]], [[pytest.approx(2 / 3, abs=1e-15), pytest.approx(-1 / 3, abs=1e-15)]])]
    assert local.nonzero_token_fraction() == 3 / 7 and len(local.needed_nodes()) == 1
    r2 = math.sqrt(2)
    assert {k: e.advantage for k, e in edge_map(treerl).items()} == pytest.approx(
        {((), 1): 4 / 3, ((1,), 2): 2 / 3, ((1, 2), 3): 2 / 3, ((), 4): -r2 / 3, ((4,), 5): -1 / 3, ((4,), 6): -1 / 3},
        abs=1e-15)
    targets = treerl.targets()
    assert [(t.completion, t.positions, t.tokens) for t in targets] == [(0, [0, 1, 2], [[1, 4], [2], [3]]),
                                                                        (1, [1], [[5, 6]])]
    assert targets[0].advantages == [pytest.approx([4 / 3, -r2 / 3], abs=1e-15), pytest.approx([2 / 3], abs=1e-15),
                                     pytest.approx([2 / 3], abs=1e-15)]
    assert treerl.nonzero_token_fraction() == 1.0 and len(treerl.edges) == len(local.edges) == 6


@pytest.mark.parametrize("seed", SEEDS)
def test_treerl_edges_and_targets_match_brute_force_B2(seed):
    """B2 from the raw token lists on random groups (duplicates, strict prefixes, empty completions): each edge's
    value, exactly 0.0 where the exact numerator is 0, and the forward plan on B2's non-zero edges."""
    rng = random.Random(3000 + seed)
    comps, rewards = random_group(rng, G=rng.randint(1, 12))
    trie = PrefixTrie(comps, rewards, estimator="treerl")
    brute = brute_treerl_advantages(comps, rewards)
    edges = edge_map(trie)
    assert set(edges) == set(brute) and len(trie.edges) == trie.num_nodes - 1
    for key, (num, n) in brute.items():
        assert abs(edges[key].advantage - float(num) / math.sqrt(n)) <= 1e-12, key
        assert (edges[key].advantage == 0.0) == (num == 0), key
    b2 = {key: float(num) / math.sqrt(n) if num else 0.0 for key, (num, n) in brute.items()}  # 0 where num is
    assert_targets_match(trie, comps, b2)
    total = sum(len(y) for y in comps)
    nonzero = sum(b2[(tuple(y[:t]), y[t])] != 0 for y in comps for t in range(len(y)))
    assert trie.nonzero_token_fraction() == (nonzero / total if total else 0.0)


# ---- corner cases ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [0.0, 1.0, 0.7])
def test_equal_rewards_give_no_signal(r):
    comps = [[1, 2, 3], [1, 2], [1, 2, 3], [4], []]
    trie = PrefixTrie(comps, [r] * len(comps))  # U = {(root,1), ([1],2), ([1,2],3), (root,4)}
    assert len(trie.edges) == 4 and all(e.advantage == 0.0 for e in trie.edges)
    assert trie.nonzero_edges() == [] and trie.targets() == [] and trie.nonzero_token_fraction() == 0.0


def test_strict_prefix_and_duplicates():
    # [7] ends where [7, 8] continues; [7, 8] appears twice. Node [7]: count 3, mean (0 + 1 + 1)/3 = 2/3.
    # A(8|7) = 1 − 2/3 = 1/3; A(7|root) = 2/3 − 2/3 = 0. Needed: [7] only; lowest completion through it: 0,
    # which ends there, and its forward prompt + [7] gives the distribution after [7]. Tokens 2 of 3 non-zero.
    trie = PrefixTrie([[7], [7, 8], [7, 8]], [0.0, 1.0, 1.0])
    assert trie.num_nodes == 3
    assert trie.targets() == [Target(completion=0, positions=[1], tokens=[[8]], advantages=[[pytest.approx(1 / 3)]])]
    assert trie.nonzero_token_fraction() == 2 / 5


def test_root_is_needed_and_targets_split():
    # i  completion R    root mean 2/5; [1] mean 1/2 (A = +1/10); [2] mean 1/2 (A = +1/10); [3] mean 0 (A = −2/5)
    # 0  [1, 1]     1    [1]: A(1|1) = 1 − 1/2 = +1/2, A(2|1) = 0 − 1/2 = −1/2
    # 1  [1, 2]     0    [2]: A(1|2) = +1/2,           A(2|2) = −1/2
    # 2  [2, 1]     1    Needed: root, [1], [2]. Needed leaves: [1], [2] -> two forwards.
    # 3  [2, 2]     0    [1] goes to completion 0, which also covers the root (position 0);
    # 4  [3]        0    [2] goes to completion 2 (lowest index through [2]); the root is already taken.
    comps = [[1, 1], [1, 2], [2, 1], [2, 2], [3]]
    targets = PrefixTrie(comps, [1.0, 0.0, 1.0, 0.0, 0.0]).targets()
    assert [(t.completion, t.positions, t.tokens) for t in targets] == [(0, [0, 1], [[1, 2, 3], [1, 2]]),
                                                                        (2, [1], [[1, 2]])]
    assert targets[0].advantages == [pytest.approx([0.1, 0.1, -0.4], abs=1e-15), [0.5, -0.5]]
    assert targets[1].advantages == [[0.5, -0.5]]


def test_floats_that_only_look_unequal_give_exact_zero():
    # The float 0.2 is exactly 2 * 0.1, so the root mean (0 + 0.1 + 0.2)/3 equals the mean 0.1 of [5] exactly.
    # Float sums say otherwise: (0.0 + 0.1 + 0.2)/3 = 0.10000000000000002, a 1.4e-17 residue that would make [5]
    # "non-zero" and the root a needed prefix. The trie sums exactly, so A(5|root) is exactly 0.
    assert (0.0 + 0.1 + 0.2) / 3 - 0.1 != 0.0
    trie = PrefixTrie([[4], [5], [6]], [0.0, 0.1, 0.2])
    assert {e.token: e.advantage for e in trie.edges}[5] == 0.0
    assert [e.token for e in trie.nonzero_edges()] == [4, 6]
    assert trie.nonzero_token_fraction() == 2 / 3


def test_errors():
    with pytest.raises(ValueError, match="empty group"):
        PrefixTrie([], [])
    with pytest.raises(ValueError, match="2 completions but 3 rewards"):
        PrefixTrie([[1], [2]], [0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        PrefixTrie([[1], [2]], [0.0, float("nan")])
    with pytest.raises(ValueError, match="estimator is 'global'; choose 'local' \\(E7\\) or 'treerl' \\(B2\\)"):
        PrefixTrie([[1], [2]], [0.0, 1.0], estimator="global")
