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
    """A note naming the values of C whose L-BFGS fit stopped at --max-iter without converging, in any run."""
    per_run = record.get("hyperparameters_per_run") or []
    bad_c = sorted({c for run in per_run for c in run.get("not_converged_C", [])})
    if not bad_c:
        bad_c = sorted({s.get("C") for s in record.get("validation_search") or []
                        if isinstance(s, dict) and s.get("converged") is False})
    chosen_bad = sum(1 for run in per_run if run.get("converged") is False)
    if not bad_c and not chosen_bad:
        return []
    values = ", ".join(f"{c:g}" for c in bad_c)
    hit = f" (the chosen C in {chosen_bad} of {len(per_run)} runs)" if chosen_bad else ""
    return [f"{head}: did NOT converge within --max-iter for C={values}{hit}; raise --max-iter"]


def search_notes(results: Sequence) -> list[str]:
    """Grid-edge and convergence notes for every head result (objects with ``head`` and ``record``)."""
    return [n for r in results for n in grid_edge_notes(r.head, r.record) + convergence_notes(r.head, r.record)]
