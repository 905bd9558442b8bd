"""The options of one ranking (``RankConfig``) and their choices, in a module light enough for the command line
to read its defaults without loading the networks' libraries (``asfda --help`` stays quick)."""

from __future__ import annotations

from dataclasses import dataclass

from ASFDALib.errors import ValueOutOfRange

STRATEGIES = ("asfda", "dkd", "asd", "random", "fg-random", "entropy", "epistemic", "coreset", "typiclust", "clasp-pe")
FUSIONS = ("sum", "gated", "gap-first")  # how DKD and ASD are combined (selection.greedy_dkd_asd)
DEFAULT_FUSION = "gap-first"  # chosen on validation (docs/method.md "How DKD and ASD are combined")
KNOWLEDGE_CHOICES = ("auto", "bn", "stats", "prototype", "energy")  # "auto": selection.KNOWLEDGE's first available


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

    def __post_init__(self) -> None:
        # the command line's checks, so a script's wrong value fails here, not as a ranking that selects nothing
        if self.strategy not in STRATEGIES:
            raise ValueOutOfRange(f"RankConfig.strategy {self.strategy!r}: use one of {', '.join(STRATEGIES)}")
        if self.fusion not in FUSIONS:
            raise ValueOutOfRange(f"RankConfig.fusion {self.fusion!r}: use one of {', '.join(FUSIONS)}")
        if self.knowledge not in KNOWLEDGE_CHOICES:
            raise ValueOutOfRange(f"RankConfig.knowledge {self.knowledge!r}: use one of {', '.join(KNOWLEDGE_CHOICES)}")
        for name, ok, allowed in (
            ("budget", self.budget >= 0, "0 or more (0 scores and ranks, selecting none)"),
            ("alpha", 0 <= self.alpha <= 1, "in [0, 1]"),
            ("mc_passes", self.mc_passes >= 1, "1 or more"),
            ("seed", self.seed >= 0, "0 or more"),
        ):
            if not ok:
                raise ValueOutOfRange(f"RankConfig.{name} {getattr(self, name)!r}: use a value {allowed}")
