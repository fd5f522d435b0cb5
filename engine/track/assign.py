"""Joint assignment of detections to tracks: candidate subnets and named strategies.

The linker gates each live track's candidates around its predicted position and hands the
gated links (track, blob, cost) to an :class:`Assigner`. The links split into *subnets*
(connected components of the bipartite track-blob graph, as in trackpy's
``subnetlinker.py``); each subnet is solved on its own:

- one track, or one blob: the cheapest link wins (the exact optimum, no solver needed);
- otherwise the named strategy resolves the conflict jointly.

Strategies (chosen by name in the constructor, one shared signature
``strategy(tracks, blobs, costs, miss_cost) -> list[(track, blob)]``):

``"lsa"``
    Minimum total cost over the subnet, with the option of leaving a track or a blob unmatched
    at ``miss_cost`` each (the augmented assignment problem, solved by
    :func:`scipy.optimize.linear_sum_assignment`).
``"greedy"``
    Cheapest link first (the report's nearest-neighbour heuristic); kept as a baseline.

Subnets larger than ``max_subnet`` tracks or blobs are solved greedily and counted as
*ambiguous* (pitfalls.md #17: large search windows make subnets explode).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

__all__ = ["Assigner", "STRATEGIES", "assign_lsa", "assign_greedy", "subnets"]

Link = tuple[int, int]


def assign_greedy(tracks: Sequence[int], blobs: Sequence[int], costs: dict[Link, float],
                  miss_cost: float) -> list[Link]:
    """Cheapest link first; a track or blob is used at most once."""
    used_t: set[int] = set()
    used_b: set[int] = set()
    out = []
    for (t, b), c in sorted(costs.items(), key=lambda kv: kv[1]):
        if t in used_t or b in used_b or c >= 2.0 * miss_cost:
            continue
        used_t.add(t)
        used_b.add(b)
        out.append((t, b))
    return out


def assign_lsa(tracks: Sequence[int], blobs: Sequence[int], costs: dict[Link, float],
               miss_cost: float) -> list[Link]:
    """Minimum-cost assignment with "unmatched" options, solved exactly.

    The (nt + nb) square matrix is ``[[C, M], [M', 0]]``: ``C`` holds the gated link costs
    (forbidden links cost far more than leaving both ends unmatched), ``M``/``M'`` are diagonal
    with ``miss_cost`` for a track/blob left unmatched.
    """
    from scipy.optimize import linear_sum_assignment

    nt, nb = len(tracks), len(blobs)
    ti = {t: i for i, t in enumerate(tracks)}
    bi = {b: j for j, b in enumerate(blobs)}
    big = 1e6 * (miss_cost + 1.0)
    m = np.full((nt + nb, nb + nt), big)
    m[nt:, nb:] = 0.0
    for (t, b), c in costs.items():
        m[ti[t], bi[b]] = c
    idx_t = np.arange(nt)
    m[idx_t, nb + idx_t] = miss_cost
    idx_b = np.arange(nb)
    m[nt + idx_b, idx_b] = miss_cost
    rows, cols = linear_sum_assignment(m)
    out = []
    for r, c in zip(rows.tolist(), cols.tolist()):
        if r < nt and c < nb and (tracks[r], blobs[c]) in costs:
            out.append((tracks[r], blobs[c]))
    return out


STRATEGIES: dict[str, Callable[..., list[Link]]] = {"lsa": assign_lsa, "greedy": assign_greedy}


def subnets(links: Iterable[Link]) -> list[tuple[list[int], list[int]]]:
    """Connected components of the bipartite graph of ``links``: ``[(tracks, blobs), ...]``."""
    parent: dict[tuple[str, int], tuple[str, int]] = {}

    def find(a):
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    for t, b in links:
        kt, kb = ("t", t), ("b", b)
        parent.setdefault(kt, kt)
        parent.setdefault(kb, kb)
        rt, rb = find(kt), find(kb)
        if rt != rb:
            parent[rb] = rt
    groups: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
    for k in parent:
        g = groups.setdefault(find(k), ([], []))
        (g[0] if k[0] == "t" else g[1]).append(k[1])
    return [(sorted(t), sorted(b)) for t, b in groups.values()]


class Assigner:
    """Splits gated links into subnets and solves each with the named strategy.

    Parameters
    ----------
    strategy : {"lsa", "greedy"}
        How conflicts inside a subnet are resolved.
    max_subnet : int
        Subnets with more tracks or blobs than this are solved greedily and counted.

    Attributes
    ----------
    stats : dict
        ``contested`` (subnets with a real conflict), ``ambiguous`` (subnets over the cap).
    """

    def __init__(self, strategy: str = "lsa", max_subnet: int = 12):
        try:
            self._solve = STRATEGIES[strategy]
        except KeyError:
            raise ValueError(f"unknown assignment strategy {strategy!r}; choose one of "
                             f"{', '.join(STRATEGIES)}") from None
        if max_subnet < 1:
            raise ValueError(f"max_subnet must be >= 1, got {max_subnet!r}")
        self.strategy = strategy
        self.max_subnet = int(max_subnet)
        self.stats = {"contested": 0, "ambiguous": 0}

    def __call__(self, costs: dict[Link, float], miss_cost: float) -> list[Link]:
        """Links kept, as ``(track, blob)`` pairs; ``costs`` maps gated links to their cost."""
        if not costs:
            return []
        # fast path: no track and no blob appears twice -> nothing to resolve
        ts = [t for t, _ in costs]
        bs = [b for _, b in costs]
        if len(set(ts)) == len(ts) and len(set(bs)) == len(bs):
            return list(costs)
        out: list[Link] = []
        for tracks, blobs in subnets(costs):
            sub = {(t, b): costs[(t, b)] for t in tracks for b in blobs if (t, b) in costs}
            if len(tracks) == 1 or len(blobs) == 1:
                out.append(min(sub, key=sub.__getitem__))
                continue
            self.stats["contested"] += 1
            if len(tracks) > self.max_subnet or len(blobs) > self.max_subnet:
                self.stats["ambiguous"] += 1
                out.extend(assign_greedy(tracks, blobs, sub, miss_cost))
            else:
                out.extend(self._solve(tracks, blobs, sub, miss_cost))
        return out
