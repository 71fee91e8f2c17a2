"""Probes on stored embeddings: logistic regression, linear SVM and kNN heads with honest group splits.

``run_probe`` fits and evaluates heads (``embedkit probe``); ``load_probe`` reads a saved probe folder
(``embedkit predict``); ``estimate_proportions`` estimates class fractions per group (``embedkit proportions``).
"""

from .evaluate import ProbeReport, ProbeSettings, parse_heads, run_probe, summary_table
from .heads import HeadOptions
from .saved import HEADS, Probe, load_probe

__all__ = ["HEADS", "HeadOptions", "Probe", "ProbeReport", "ProbeSettings", "load_probe", "parse_heads", "run_probe",
           "summary_table"]
