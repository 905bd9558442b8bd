"""The options of one ranking (``RankConfig``) and their choices, in a module light enough for the command line
to read its defaults without loading the networks' libraries (``asfda --help`` stays quick)."""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("asfda", "dkd", "asd", "random", "fg-random", "entropy", "epistemic", "coreset", "typiclust", "clasp-pe")
FUSIONS = ("sum", "gated", "gap-first")  # how DKD and ASD are combined (selection.greedy_dkd_asd)
DEFAULT_FUSION = "gap-first"  # chosen on validation (docs/method.md "How DKD and ASD are combined")


@dataclass
class RankConfig:
    """Options of one ranking: the query (budget, alpha, strategy) and how to compute it."""

    budget: int = 4
    alpha: float = 0.5
    strategy: str = "asfda"
    knowledge: str = "auto"
    device: str = "auto"
    seed: int = 0
    recursive: bool = False
    mc_passes: int = 5
    # The method's ablation switches (selection.select); the defaults are the method.
    layers: str = "auto"
    dynamic_temperature: bool = True
    diversity: bool = True
    fusion: str = DEFAULT_FUSION
