"""What each column of a ranking (ranking.csv, ranking.json, the terminal table) means, in words a reader
can follow, with the method's symbol beside where it has one (docs/method.md defines them). Pure Python,
so ``asfda rank --help`` prints it without loading torch."""

from __future__ import annotations

COLUMN_LEGEND = {
    "rank": "order of the pick (1 = label first)",
    "file": "the volume",
    "status": "scored, labelled (already has a label) or skipped (with the reason)",
    "selected": "in this round's query",
    "priority": "rank-consistent priority: 1 for the first pick down to 1/N for the last",
    "pick_score": "score when picked = diversity*(alpha*pct(knowledge_gap) + (1-alpha)*pct(ASD)) among the volumes "
    "left then; a first pick with nothing labelled: its DKD (--fusion gated: the formula for it too; --fusion sum: "
    "alpha*pct(DKD) + (1-alpha)*pct(ASD))",
    "dkd": "DKD = knowledge gap x diversity",
    "knowledge_gap": "s_src: how far the volume is from what the source model knows (0..1), scaled among the "
    "volumes left at its pick (the temperature is recomputed at each pick: compare rows by source_divergence)",
    "diversity": "s_div: how far it is from the labelled and already picked volumes (0..1), at its pick",
    "source_divergence": "d_src: the raw divergence behind knowledge_gap, the same scale for every row",
    "asd": "ASD: class-balanced entropy in the adaptive foreground (0..1)",
    "entropy": "whole-volume mean normalised entropy (0..1)",
    "foreground_ml": "predicted foreground volume in mL",
    "source_knowledge": "K_s: what the source knowledge came from (bn, stats, prototype, energy)",
    "reason": "why a volume was skipped",
}
