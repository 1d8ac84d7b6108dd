"""Ordered tree edit distance (Zhang & Shasha 1989), for OCRBench v2's TEDS and STEDS.

The published evaluation computes TEDS with APTED and the document-parsing STEDS with
zss; both return the exact minimum cost of an ordered edit script (delete a node, insert a
node, rename a node), which is what `tree_edit_distance` computes, so any exact algorithm
gives the published numbers. Inserting and deleting cost 1 each in both published metrics;
renaming is the caller's ``rename_cost``.

Zhang-Shasha numbers the nodes in postorder, notes each node's leftmost leaf, and fills
one forest-distance table per pair of "key roots" (the highest node sharing a leftmost
leaf). Time O(|A| |B| min(depth, leaves)^2); the trees here are tables and documents, a few
levels deep.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = ["postorder", "tree_edit_distance"]

Node = TypeVar("Node")


def postorder(root: Node, children: Callable[[Node], Sequence[Node]]) -> tuple[list, list[int]]:
    """(nodes in postorder, index of each node's leftmost leaf), without recursion (a
    malformed page may nest thousands of elements)."""
    nodes: list = []
    leftmost: list[int] = []
    # each entry: node, its children, how many of them were visited, its leftmost leaf
    stack: list[list[Any]] = [[root, list(children(root)), 0, None]]
    while stack:
        entry = stack[-1]
        node, kids, visited, _ = entry
        if visited < len(kids):
            entry[2] += 1
            child = kids[visited]
            stack.append([child, list(children(child)), 0, None])
            continue
        stack.pop()
        index = len(nodes)
        own = entry[3] if entry[3] is not None else index
        nodes.append(node)
        leftmost.append(own)
        if stack and stack[-1][3] is None:      # the first child to finish is the leftmost
            stack[-1][3] = own
    return nodes, leftmost


def _key_roots(leftmost: list[int]) -> list[int]:
    highest: dict[int, int] = {}
    for index, leaf in enumerate(leftmost):
        highest[leaf] = index
    return sorted(highest.values())


def tree_edit_distance(a: Node, b: Node, children: Callable[[Node], Sequence[Node]],
                       rename_cost: Callable[[Node, Node], float]) -> float:
    """The least total cost of deletions (1 each), insertions (1 each) and renames
    (``rename_cost(node_of_a, node_of_b)``, >= 0) that turn tree ``a`` into tree ``b``;
    ``children(node)`` lists a node's children in order."""
    nodes_a, left_a = postorder(a, children)
    nodes_b, left_b = postorder(b, children)
    renames: dict[tuple[int, int], float] = {}

    def rename(i: int, j: int) -> float:
        key = (i, j)
        if key not in renames:
            renames[key] = float(rename_cost(nodes_a[i], nodes_b[j]))
        return renames[key]

    tree = [[0.0] * len(nodes_b) for _ in nodes_a]
    for i in _key_roots(left_a):
        for j in _key_roots(left_b):
            li, lj = left_a[i], left_b[j]
            if li == i and lj == j:          # two leaves: rename, or delete and insert
                tree[i][j] = min(2.0, rename(i, j))
                continue
            rows, cols = i - li + 2, j - lj + 2
            forest = [[0.0] * cols for _ in range(rows)]
            for x in range(1, rows):
                forest[x][0] = forest[x - 1][0] + 1.0
            for y in range(1, cols):
                forest[0][y] = forest[0][y - 1] + 1.0
            for x in range(1, rows):
                node_a = li + x - 1
                whole_a = left_a[node_a] == li
                previous, current = forest[x - 1], forest[x]
                tree_a, before_row = tree[node_a], forest[left_a[node_a] - li]
                for y in range(1, cols):
                    node_b = lj + y - 1
                    value = previous[y] + 1.0
                    if current[y - 1] + 1.0 < value:
                        value = current[y - 1] + 1.0
                    if whole_a and left_b[node_b] == lj:
                        candidate = previous[y - 1] + rename(node_a, node_b)
                        if candidate < value:
                            value = candidate
                        tree_a[node_b] = value
                    else:
                        candidate = before_row[left_b[node_b] - lj] + tree_a[node_b]
                        if candidate < value:
                            value = candidate
                    current[y] = value
    return tree[-1][-1] if nodes_a and nodes_b else float(len(nodes_a) + len(nodes_b))
