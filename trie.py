"""Prefix trie over a group of completions: the token-level advantages of T-SPMO (paper III-C, tags E7-E9), and
TreeRL's on the same trie (tag B2, beyond the paper).

One prompt, G completions y_0 … y_{G-1} (generated token ids only, EOS included when it was generated) with
rewards R_0 … R_{G-1}. The root of the trie is the prompt, i.e. the empty completion prefix; a node is a
prefix p of at least one completion, and an edge (p, v) is a transition "prefix p, next token v".

    E8  E[R|p]   = mean of R_i over the completions i with y_i[:|p|] == p        (reward_sum / count of p)
    E9  E[R|p∘v] = mean of R_i over the completions i with y_i[:|p|+1] == p∘v    (reward_sum / count of p∘v)
    E7  A(v|p)   = E[R|p∘v] − E[R|p]                                            estimator "local" (the paper's)
    B2  A(v|p)   = [(E[R|p∘v] − E[R|root]) + (E[R|p∘v] − E[R|p])] / √n(p∘v)     estimator "treerl" (TreeRL's)

B2 adds a global term to E7's local one and divides by √n(p∘v), n(p∘v) = count of p∘v, the completions through
it; E[R|root] is the group's mean reward. Along a chain of single-child nodes the mean does not change, so E7 is 0
there and B2 is the chain's global term over √n, the same on every edge of the chain.

U, the set of unique (p, v) pairs of E10, is exactly the set of edges of the trie (`PrefixTrie.edges`).

    completions [1,2,3], [1,2,4], [1,5]          root ─1─> [1] ─2─> [1,2] ─3─> [1,2,3]
    rewards      1        0        1                         │            └─4─> [1,2,4]
                                                             └─5─> [1,5]
    E[R|root] = 2/3
    edge (p, v)   n(p∘v)  E[R|p]  E[R|p∘v]   E7     B2
    (root, 1)       3      2/3      2/3       0     (0 + 0)/√3          =  0
    ([1], 2)        2      2/3      1/2     −1/6    (−1/6 − 1/6)/√2     = −√2/6 ≈ −0.236
    ([1,2], 3)      1      1/2      1       +1/2    (+1/3 + 1/2)/√1     = +5/6
    ([1,2], 4)      1      1/2      0       −1/2    (−2/3 − 1/2)/√1     = −7/6
    ([1], 5)        1      2/3      1       +1/3    (+1/3 + 1/3)/√1     = +2/3

A completion may end in the middle of another one (a strict prefix) or repeat another one: it simply adds its
count and reward to every node on its path, and EOS is an ordinary token.

Pure Python (no torch): nodes live in flat lists indexed by node id, node 0 is the root. G = 50 completions
of 300 tokens make at most 15,001 nodes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

ROOT = 0
ESTIMATORS = ("local", "treerl")  # A(v|p): E7, the paper's; B2, TreeRL's


@dataclass(frozen=True)
class Edge:
    """One unique transition (p, v) of U, with its advantage A(v|p) (E7, or B2 with the estimator "treerl")."""
    parent: int       # node id of prefix p
    child: int        # node id of p∘v
    token: int        # v
    depth: int        # |p| = number of completion tokens before v (0-based index of v in any completion through it)
    advantage: float  # A(v|p), E7 or B2


@dataclass(frozen=True)
class Target:
    """One forward pass of the per-completion backward.

    Run prompt + y_i[:max(positions)] through the model; for each position j read the next-token distribution
    after the prefix y_i[:j] (j = 0: after the last prompt token) and use it for the tokens v listed at j.
    """
    completion: int                # index i of the completion that is run through the model
    positions: list[int]           # sorted distinct depths j of the needed prefixes on completion i (prefix = y_i[:j])
    tokens: list[list[int]]        # for each position, the tokens v of edges (p, v) with A != 0 leaving that prefix
                                   # (in edge order, i.e. order of first appearance)
    advantages: list[list[float]]  # matching A(v|p)


class PrefixTrie:
    """Prefix trie of one group of completions; per node: count, reward sum, depth, children.

    Flat lists, indexed by node id (node 0 = root = the prompt):
        count[n]      number of completions whose path passes through n (those that end at n included)
        reward_sum[n] sum of their rewards, kept exact as a Fraction (see `_build`)
        depth[n]      number of completion tokens in the prefix of n (root: 0)
        parent[n], token[n]  the edge that enters n (root: -1, -1)
        children[n]   {token v: node id of n∘v}, in order of creation
        first[n]      the lowest index of a completion passing through n
        paths[i]      node ids along completion i: paths[i][t] is the node of y_i[:t], t = 0 … len(y_i)
    Node ids are given in the order the prefixes first appear when reading completions 0, 1, … left to right,
    so every child has a larger id than its parent.

    estimator: how an edge's A(v|p) is computed from the means, "local" (E7, `edge_advantages`, the default) or
    "treerl" (B2, `treerl_advantages`); every method below (U's advantages, the non-zero edges, the forward plan, the
    token fraction) reads the chosen one.
    """

    def __init__(self, completions: Sequence[Sequence[int]], rewards: Sequence[float], estimator: str = "local"):
        if estimator not in ESTIMATORS:
            raise ValueError(f"PrefixTrie: estimator is {estimator!r}; choose 'local' (E7) or 'treerl' (B2)")
        if len(completions) == 0:
            raise ValueError("PrefixTrie needs at least one completion, got an empty group")
        if len(completions) != len(rewards):
            raise ValueError(f"got {len(completions)} completions but {len(rewards)} rewards; "
                             "need one reward per completion")
        for i, r in enumerate(rewards):
            if not math.isfinite(float(r)):
                raise ValueError(f"reward {i} is {r}; rewards must be finite")
        self.completions: list[list[int]] = [[int(v) for v in y] for y in completions]
        self.rewards: list[float] = [float(r) for r in rewards]
        self.estimator = estimator
        self._build()
        self._advantage = self.edge_advantages() if estimator == "local" else self.treerl_advantages()

    # ---- construction -------------------------------------------------------------------------------------
    def _new_node(self, parent: int, token: int, depth: int, first: int) -> int:
        self.count.append(0)
        self.reward_sum.append(Fraction(0))
        self.depth.append(depth)
        self.parent.append(parent)
        self.token.append(token)
        self.children.append({})
        self.first.append(first)
        return len(self.count) - 1

    def _build(self) -> None:
        self.count: list[int] = []
        self.reward_sum: list[Fraction] = []
        self.depth: list[int] = []
        self.parent: list[int] = []
        self.token: list[int] = []
        self.children: list[dict[int, int]] = []
        self.first: list[int] = []
        self.paths: list[list[int]] = []
        self._new_node(parent=-1, token=-1, depth=0, first=0)  # the root: every completion passes through it
        for i, (y, r) in enumerate(zip(self.completions, self.rewards)):
            # Exact sums: Fraction(float) is exact, so E[R|p∘v] == E[R|p] holds exactly when the two empirical
            # means are equal. With float sums a 1e-17 residue would make A != 0 and cost a needless forward.
            r_exact = Fraction(r)
            node = ROOT
            path = [ROOT]
            self.count[ROOT] += 1
            self.reward_sum[ROOT] += r_exact
            for t, v in enumerate(y):
                child = self.children[node].get(v)
                if child is None:  # first completion through this prefix: i is the lowest index, by insertion order
                    child = self._new_node(parent=node, token=v, depth=t + 1, first=i)
                    self.children[node][v] = child
                node = child
                path.append(node)
                self.count[node] += 1
                self.reward_sum[node] += r_exact
            self.paths.append(path)

    def edge_advantages(self) -> list[float]:
        """A(v|p) of the edge entering each node (E7, from E8 and E9); index = child node id (root: 0.0, no edge)."""
        adv = [0.0] * self.num_nodes
        for c in range(1, self.num_nodes):
            p = self.parent[c]
            mean_p = self.reward_sum[p] / self.count[p]   # [E8] E[R|p], exact
            mean_pv = self.reward_sum[c] / self.count[c]  # [E9] E[R|p∘v], exact
            adv[c] = float(mean_pv - mean_p)              # [E7] A(v|p); exactly 0.0 iff the means are equal
        return adv

    def treerl_advantages(self) -> list[float]:
        """TreeRL's A(v|p) of the edge entering each node (B2): E7's local term plus the global term
        E[R|p∘v] − E[R|root], over √n(p∘v), n(p∘v) = count of p∘v; index = child node id (root: 0.0, no edge)."""
        adv = [0.0] * self.num_nodes
        mean_root = self.reward_sum[ROOT] / self.count[ROOT]  # E[R|root], the group's mean reward, exact
        for c in range(1, self.num_nodes):
            p = self.parent[c]
            mean_p, mean_pv = self.reward_sum[p] / self.count[p], self.reward_sum[c] / self.count[c]  # exact
            global_term, local_term = mean_pv - mean_root, mean_pv - mean_p  # exact Fractions, as in E7
            # [decided] (SPEC.md) B2 after TreeRL's process reward: (global + local term) / √(completions through p∘v)
            adv[c] = float(global_term + local_term) / math.sqrt(self.count[c])  # [B2] exactly 0.0 iff the sum is 0
        return adv

    # ---- E7 (or B2), E8, E9 ---------------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return len(self.count)

    def mean_reward(self, node: int) -> float:
        """E[R|p] of the prefix p of `node` (E8); for a child node p∘v this is E[R|p∘v] (E9)."""
        return float(self.reward_sum[node] / self.count[node])

    def advantage(self, child: int) -> float:
        """A(v|p) (E7, or B2 with the estimator "treerl") of the edge (p, v) that enters node `child` (p∘v)."""
        if child == ROOT:
            raise ValueError("the root has no incoming edge, so no advantage")
        return self._advantage[child]

    @property
    def edges(self) -> list[Edge]:
        """U: every unique (p, v) of the trie, ordered by child node id (order of first appearance)."""
        return [Edge(parent=self.parent[c], child=c, token=self.token[c], depth=self.depth[self.parent[c]],
                     advantage=self._advantage[c]) for c in range(1, self.num_nodes)]

    def nonzero_edges(self, tol: float = 0.0) -> list[Edge]:
        """The edges with |A(v|p)| > tol: the only ones that add to the gradient of E10."""
        return [e for e in self.edges if abs(e.advantage) > tol]

    # ---- which forward passes the update needs --------------------------------------------------------------
    def needed_nodes(self, tol: float = 0.0) -> list[int]:
        """Prefix nodes with at least one outgoing edge with |A| > tol; each needs one forward with gradient."""
        return sorted({e.parent for e in self.nonzero_edges(tol)})

    def targets(self, tol: float = 0.0) -> list[Target]:
        """The fewest forward passes that evaluate every needed prefix exactly once, on a completion containing it.

        Greedy: visit the needed nodes deepest first; an unassigned node n goes to i = first[n] (the lowest-index
        completion through n), together with every still-unassigned needed node on i's path from the root to n,
        since the forward of prompt + y_i[:depth(n)] yields the next-token distribution after each of them.

        Why this is minimal: call a needed node a leaf if it has no needed descendant. One completion's path is a
        chain, so it holds at most one such leaf (two leaves would be ancestor and descendant), hence any valid
        plan needs at least #leaves forwards. The greedy opens one forward per leaf and no more: a needed node
        with a needed descendant d is assigned before its turn, when the deeper d (or the node whose forward
        took d) is processed, because that completion passes through d and therefore through it too.
        Returns the targets sorted by completion index, positions ascending.
        """
        needed = set(self.needed_nodes(tol))
        assigned: dict[int, int] = {}  # needed node -> completion whose forward evaluates it
        for n in sorted(needed, key=lambda n: (-self.depth[n], n)):  # deepest first; ties by id, for determinism
            if n in assigned:
                continue
            i = self.first[n]
            for m in self.paths[i][: self.depth[n] + 1]:  # root … n along completion i
                if m in needed and m not in assigned:
                    assigned[m] = i
        by_completion: dict[int, list[int]] = {}
        for m, i in assigned.items():
            by_completion.setdefault(i, []).append(m)
        targets = []
        for i in sorted(by_completion):
            nodes = sorted(by_completion[i], key=lambda m: self.depth[m])  # one node per depth on a path
            kids = [[c for c in self.children[m].values() if abs(self._advantage[c]) > tol] for m in nodes]
            targets.append(Target(completion=i,
                                  positions=[self.depth[m] for m in nodes],
                                  tokens=[[self.token[c] for c in cs] for cs in kids],
                                  advantages=[[self._advantage[c] for c in cs] for cs in kids]))
        return targets

    def nonzero_token_fraction(self, tol: float = 0.0) -> float:
        """Fraction of generated tokens (i, t) whose edge (y_i[:t], y_i[t]) has |A| > tol (paper: under 5%).

        Counts tokens, not unique edges: a shared prefix counts once per completion. 0.0 if no token was generated.
        """
        total = sum(len(y) for y in self.completions)
        if total == 0:
            return 0.0
        nonzero = sum(abs(self._advantage[c]) > tol for path in self.paths for c in path[1:])
        return nonzero / total
