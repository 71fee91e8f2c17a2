"""Warnings a probe run must print: a hyper-parameter chosen on the edge of its grid, a linear fit that did not converge."""

from __future__ import annotations

from typing import Sequence


def grid_edge_notes(head: str, record: dict) -> list[str]:
    """A note when a run chose the lowest or highest value of its grid (the optimum may lie beyond it)."""
    name = "k" if head == "knn" else "C"
    grid = sorted(record.get("search_grid", {}).get(name, []))
    if len(grid) < 2:
        return []
    chosen = [run[name] for run in record.get("hyperparameters_per_run", []) if name in run]
    low = sum(1 for v in chosen if v <= grid[0])
    high = sum(1 for v in chosen if v >= grid[-1])
    flag = "--k" if name == "k" else "--C"
    notes = []
    if low:
        notes.append(f"{head}: {name}={grid[0]:g} is the LOWEST value of the grid and was chosen in {low} of "
                     f"{len(chosen)} runs; widen {flag} below it")
    if high:
        notes.append(f"{head}: {name}={grid[-1]:g} is the HIGHEST value of the grid and was chosen in {high} of "
                     f"{len(chosen)} runs; widen {flag} above it")
    return notes


def convergence_notes(head: str, record: dict) -> list[str]:
    """A note naming the values of C whose L-BFGS fit stopped at --max-iter without converging."""
    search = record.get("validation_search") or []
    bad = [s for s in search if isinstance(s, dict) and s.get("converged") is False]
    if not bad:
        return []
    chosen = record.get("hyperparameters", {}).get("C")
    hit = any(s.get("C") == chosen for s in bad)
    values = ", ".join(f"{s.get('C'):g}" for s in bad)
    return [f"{head}: did NOT converge within --max-iter for C={values}"
            + (" (including the chosen C)" if hit else "") + "; raise --max-iter"]


def search_notes(results: Sequence) -> list[str]:
    """Grid-edge and convergence notes for every head result (objects with ``head`` and ``record``)."""
    return [n for r in results for n in grid_edge_notes(r.head, r.record) + convergence_notes(r.head, r.record)]
