"""The ``asfda`` command line: its parser, help texts and entry point; :mod:`ASFDALib.app.commands` runs them."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ASFDALib.adaptation.recipe import (
    AUGMENTS,
    FALLBACKS,
    LOWER_RATE_FOR,
    MIXES,
    RELIABILITY,
    STAGE2_LR,
    TEACHERS,
    FinetuneConfig,
)
from ASFDALib.app import commands
from ASFDALib.app.arguments import (
    choice_list,
    device,
    existing_dir,
    existing_path,
    fraction,
    json_object,
    new_path,
    non_negative_int,
    positive_float,
    positive_int,
    positive_ints,
    probability,
    seed_list,
    unit_interval,
)
from ASFDALib.errors import ASFDAError, Terminated, brief, interrupted_exit_code
from ASFDALib.models.formats import FORMATS
from ASFDALib.outputs import is_session_folder

RANK_EXAMPLES = """
examples:
  asfda rank
      rank the built-in sample MRI pool with the built-in model (a first look, ~1 minute on a CPU)
  asfda rank --model bundles/spleen_ct_segmentation --images /data/target_mri --budget 8 --out ~/asfda/liver
      rank a folder with a MONAI bundle; results in ~/asfda/liver/ranking.{csv,json,png}
  asfda rank --model unet.pt --network UNet --network-args '{"spatial_dims":3,"in_channels":1,
             "out_channels":4,"channels":[16,32,64,128],"strides":[2,2,2]}' --card card.json --images scans/
      a plain state dict plus the MONAI network it belongs to
  asfda rank --out ~/asfda/liver --alpha 0.8
      re-rank with more weight on DKD: instant, every volume's sweep is cached in the session folder
  torchrun --nproc_per_node 4 -m ASFDALib.app.cli rank --images /data/pool --out ~/asfda/liver
      the volumes shared among 4 processes (GPUs), ranked as one process would

What is computed: one sliding-window pass per volume gives DKD (knowledge gap to the source model x
diversity against the query and labelled volumes, temperature-scaled) and ASD (class-balanced entropy
inside the adaptive foreground). The query is built greedily: with nothing labelled the first pick is the
volume with the largest DKD (where the source model knows least); each further pick maximises
s_div * (alpha * pct(s_src) + (1 - alpha) * pct(ASD)) among the volumes left (pct: percentile rank; s_div
holds back volumes like one already picked or labelled), then diversity is recomputed. --fusion gated
scores the first pick that way too; --fusion sum ranks by the paper's alpha * pct(DKD) + (1 - alpha) *
pct(ASD) instead.
Unreadable volumes are skipped and listed with the reason; the exit code is 1 only when no volume could
be scored.

columns of ranking.csv / ranking.json (the terminal shows the pick's score, gap, div, ASD, fg mL):
"""

WORKFLOW = """the workflow, one step after the other (after rank, S is all a step needs):
  1. asfda rank --model M --images SCANS --out S   rank scans, pick the query
  2. asfda labels import S --from LABELS           the clinician's labels
  3. asfda finetune S                              adapt: labels + pseudo-labels
  4. asfda predict S --images NEW --out PRED       segment with it
     asfda evaluate --pred PRED --labels GT --session S      Dice and HD95
  5. asfda export S --out BUNDLE                   a MONAI bundle of it
     asfda rank --out S                            next round: re-rank the rest
other commands: stats (for model providers), demo, benchmark, phantoms.
'asfda COMMAND --help' shows the options and examples of each command."""

MAP_HELP = (
    "file label values -> model classes: VALUE=CLASS terms separated by , or ; where VALUE is a number, "
    "a range (41-48) or * (every value not listed) and CLASS a class number or name from the card; "
    "values before an = share it, e.g. '41-48=2,49,50=vertebral body,*=0'"
)
RECIPE = FinetuneConfig()  # the one recipe: the help shows its defaults


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the message and where to read more, not the whole usage block."""

    argv: list[str] = []  # the command line, for hints that name what was given (main sets it)

    def error(self, message: str):
        if "arguments are required" in message and "--images" in message:  # a folder of scans, but no --images?
            message = _scans_given_without_images(self.argv) or message
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _rank_epilog() -> str:
    from ASFDALib.query.columns import COLUMN_LEGEND

    return RANK_EXAMPLES + "".join(f"  {name:<18} {meaning}\n" for name, meaning in COLUMN_LEGEND.items())


def _add_model_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        type=existing_path,
        required=required,
        help="MONAI bundle folder, state dict or checkpoint (.pt, .pth, .ckpt, .safetensors), TorchScript (.ts), "
        "torch.export program (.pt2) or nnU-Net v2 fold_N/checkpoint_final.pth; default: the built-in small model",
    )
    group.add_argument(
        "--card",
        type=existing_path,
        help="model card (JSON/YAML: class_names, spacing, roi_size, intensity); "
        "default: <model>.card.json or asfda_card.json / model_card.json beside the model",
    )
    _add_loading_arguments(group)
    group.add_argument(
        "--device", type=device, default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:1"
    )


def _add_loading_arguments(group) -> None:
    """How a model file is read beyond its card: the network of a state dict, the head's class map, trust."""
    group.add_argument("--network", help="MONAI network class for a state dict, e.g. UNet, SegResNet, SwinUNETR")
    group.add_argument(
        "--network-args",
        type=json_object,
        default={},
        help="JSON constructor arguments for --network (out_channels becomes the card's class count)",
    )
    group.add_argument(
        "--class-map",
        help="which pre-trained head rows the target classes keep. Classes with the same name as one of the card's "
        "source_classes keep theirs; TARGET=SOURCE pairs separated by commas add or override pairs, e.g. "
        "'kidney=right kidney', and 'kidney=' starts kidney anew. Unmapped classes start from a new "
        "initialisation",
    )
    group.add_argument(
        "--trust",
        action="store_true",
        help="allow formats that run code from the file (TorchScript, torch.export programs, pickled objects in "
        "checkpoints, bundle configs with $ expressions or custom _target_, the bundle's own scripts/); only for "
        "files from people you trust",
    )


BENCH_ROWS = (
    "source", "random", "fg-random", "entropy", "epistemic", "coreset", "typiclust", "clasp-pe", "dkd", "asd",
    "asfda", "asfda+ssft", "ssft-control", "full",
)  # fmt: skip  # ASFDALib.bench.benchmark.ROWS, listed here so --help does not load torch (a test pins them equal)
BENCH_SCENARIOS = ("mri", "ct-shift", "mri-rich")


def build_parser() -> argparse.ArgumentParser:
    from ASFDALib.query.config import DEFAULT_FUSION, FUSIONS, KNOWLEDGE_CHOICES, STRATEGIES, RankConfig

    parser = Parser(
        prog="asfda",
        description="Adapt a medical vision foundation model to a new hospital's scans with few labels:\n"
        "rank unlabeled volumes by DKD + ASD, label the query, fine-tune.",
        epilog=WORKFLOW,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rank = sub.add_parser(
        "rank",
        help="rank a folder of unlabeled target volumes and pick the query",
        description="Rank unlabeled target volumes by the combined DKD/ASD score and pick the ones to label.",
        epilog=_rank_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(rank)
    rank.add_argument(
        "--images",
        type=existing_dir,
        help="folder of volumes (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, "
        "DICOM series folders); default: a built-in sample pool",
    )
    rank.add_argument(
        "--recursive",
        action="store_true",
        help="also search sub-folders (a BIDS dataset's derivatives/, sourcedata/ and code/ hold no scans: left out)",
    )
    rank.add_argument(
        "--out",
        type=new_path,
        default=Path("asfda-session"),
        help="session folder for ranking.csv/json/png and the score cache (default: %(default)s)",
    )
    rank.add_argument(
        "--budget",
        type=positive_int,
        help=f"how many volumes the round queries (default: the session's last round's, else {RankConfig.budget}); "
        "a re-rank before fine-tuning counts the round's labelled volumes in it",
    )
    rank.add_argument(
        "--alpha",
        type=unit_interval,
        default=0.5,
        help="weight of DKD against ASD in [0, 1]; 1 = DKD only (default: %(default)s)",
    )
    rank.add_argument(
        "--fusion",
        choices=FUSIONS,
        default=DEFAULT_FUSION,
        help="how DKD and ASD are combined: sum = alpha * pct(DKD) + (1 - alpha) * pct(ASD), the paper's; gated = "
        "s_div * (alpha * pct(s_src) + (1 - alpha) * pct(ASD)), diversity holding back near-duplicates of a pick "
        "whichever term favours them; gap-first = gated, with a first pick by DKD alone when nothing is labelled "
        "(default: %(default)s; docs/method.md says which was chosen and why)",
    )
    rank.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="asfda",
        help="asfda (DKD+ASD, default), dkd, asd, or a baseline: random, fg-random (random among "
        "volumes with predicted foreground), entropy (whole volume), epistemic (MC dropout), coreset, "
        "typiclust (most typical volume of each uncovered k-means cluster of the embedding; Hacohen et al. 2022), "
        "clasp-pe (class-stratified, Gumbel-noised predictive entropy; nnActive's ClaSP PE)",
    )
    rank.add_argument(
        "--knowledge",
        choices=KNOWLEDGE_CHOICES,
        default="auto",
        help="source knowledge for DKD: BatchNorm statistics, the card's source-statistics file, or free "
        "energy, auto picks the first available; prototype (the pointwise head's class prototypes) only when "
        "asked (default: %(default)s)",
    )
    rank.add_argument("--mc-passes", type=positive_int, help="MC-dropout passes for --strategy epistemic (default: 5)")
    rank.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the random baselines (default: %(default)s)"
    )
    rank.add_argument(
        "--show", type=non_negative_int, default=30, help="rows shown in the terminal table (default: %(default)s)"
    )
    rank.set_defaults(func=commands.cmd_rank)

    stats = sub.add_parser(
        "stats",
        help="compute a source-statistics file from source-domain volumes (for model providers)",
        description="Summarise source-domain volumes into per-channel feature statistics (no images or labels "
        "leave your site) so that users of the model get DKD's knowledge-gap term.",
        epilog="example:\n  asfda stats --model unet.pt --images /data/source_ct --out source_stats.npz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(stats)
    stats.add_argument("--images", type=existing_dir, required=True, help="folder of source-domain volumes")
    stats.add_argument("--out", type=new_path, required=True, help="output .npz file")
    stats.add_argument("--recursive", action="store_true", help="also search sub-folders")
    stats.set_defaults(func=commands.cmd_stats)

    labels = sub.add_parser(
        "labels",
        help="show which queried volumes are labelled, or import label files into a session",
        # argparse would print the one positional as "[import] SESSION [[import] SESSION ...]"
        usage="asfda labels [-h] SESSION\n       asfda labels import SESSION --from PATH [--map MAP] "
        "[--all | --cases NAMES]",
        epilog="examples:\n  asfda labels ~/asfda/liver\n"
        "  asfda labels import ~/asfda/liver --from ~/exports/labels --map 7=1,8=2\n"
        "  asfda labels import ~/spine --from derivatives/ --map '41-48=2,49,50=vertebral body,*=0'\n"
        "  asfda labels import ~/asfda/liver --from late_labels/ --cases case12.nii.gz   # one not queried\n\n"
        "Only the labels of queried volumes are imported unless --all or --cases says otherwise: every other\n"
        "unlabeled volume stays in the pool that fine-tuning pseudo-labels.\n\n"
        "exit status of import: 0 when every label file of an asked-for volume came in (a file of no volume\n"
        "in the pool is skipped, not an error); 1 when one was refused, even if others came in (the output\n"
        "says which, and why), when nothing could be imported (0 where every asked-for volume is labelled\n"
        "already), or when --map does not read against the model's classes; 2 for arguments the command line\n"
        "cannot parse.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    labels.add_argument(
        "words",
        nargs="+",
        metavar="[import] SESSION",
        help="a session folder: lists its queried volumes and their labels; 'import SESSION' with --from "
        "imports label files into it",
    )
    labels.add_argument(
        "--from",
        dest="source",
        metavar="PATH",
        type=existing_path,
        help="label file or folder to import; files pair with images by case name: case_seg, case_mask, "
        "case.seg.nrrd for the image case; case for nnU-Net's case_0000; BIDS names by their entities "
        "(the suffix and seg/desc entities ignored; a derivative's label entity too where nothing else fits; "
        "sub-01_T1w_desc-x_dseg only for the T1w); a recursive pool's labels in sub-folders that mirror it "
        "(a BIDS derivatives/PIPELINE tree) pair with the scans of their own sub-folder; a label that fits no image "
        "or several is refused",
    )
    labels.add_argument("--map", help=MAP_HELP)
    labels.add_argument("--all", action="store_true", help="import labels of every volume, not only the queried ones")
    labels.add_argument(
        "--cases",
        metavar="NAMES",
        help="comma-separated images to import labels for (default: the volumes queried so far)",
    )
    labels.set_defaults(func=commands.cmd_labels)

    finetune = sub.add_parser(
        "finetune",
        help="fine-tune the session's model on its labels plus reliable pseudo-labels",
        description="Stage 1 on the labelled volumes; then the most reliable unlabeled volumes get pseudo-labels "
        "(--pseudo-gate: by default the volumes and voxels where the adapted model agrees with the model the round "
        "started from, or, where that model vouches for none, with its own flipped views; or its confident voxels) "
        "and stage 2 trains on both, the pseudo-labelled patches strongly augmented (where the fallback judged, "
        "also through random intensity curves), or on the labels alone when no volume passes. Checkpoints every "
        "--checkpoint-every iterations; Ctrl-C keeps the last one. A round that has run already needs a choice: "
        "--resume an interrupted run (same data order), --extend a finished one, or --restart the round. "
        "session.json records the iterations that ran.",
        epilog="examples:\n  asfda finetune ~/asfda/liver\n  asfda finetune ~/asfda/liver --resume"
        "\n  asfda finetune ~/asfda/liver --extend --pseudo-iterations 400"
        "\n  asfda finetune ~/asfda/liver --extend --blend-start 0.3   # hand over anew, training nothing"
        "\n  torchrun --nproc_per_node 4 -m ASFDALib.app.cli finetune ~/asfda/liver   # DistributedDataParallel",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    finetune.add_argument("session", type=existing_dir, help="session folder with imported labels")
    finetune.add_argument(
        "--iterations",
        type=positive_int,
        help=f"stage-1 iterations (default: {RECIPE.iterations}; with --extend: the new total; --resume keeps "
        "the run's own)",
    )
    finetune.add_argument(
        "--pseudo-iterations",
        type=non_negative_int,
        help=f"stage-2 iterations (default: {RECIPE.pseudo_iterations}; with --extend: the new total; --resume "
        "keeps the run's own)",
    )
    finetune.add_argument("--no-pseudo", action="store_true", help="stage 1 only (no pseudo-labels)")
    finetune.add_argument(
        "--images",
        type=existing_dir,
        help="the pool's folder where it has moved since the session ranked it (another disk or drive letter); "
        "its labelled volumes must be the same scans, and the session records the new place",
    )
    again = finetune.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        dest="mode",
        action="store_const",
        const="resume",
        help="continue an interrupted run of this round to its own iteration counts",
    )
    again.add_argument(
        "--extend",
        dest="mode",
        action="store_const",
        const="extend",
        help="train a finished run further, to the --iterations / --pseudo-iterations you give (with only "
        "--blend-start: hand its stage 2 over anew at that share, training nothing)",
    )
    again.add_argument(
        "--restart",
        dest="mode",
        action="store_const",
        const="restart",
        help="train this round again from its start (the earlier run is kept aside, not deleted)",
    )
    finetune.set_defaults(mode="new")
    finetune.add_argument(
        "--batch-size",
        type=positive_int,
        help=f"patches per step (default: {RECIPE.batch_size}; --resume keeps the run's own)",
    )
    finetune.add_argument(
        "--lr",
        type=positive_float,
        help=f"learning rate of new layers (default: {RECIPE.lr}; --resume keeps the run's own); tensors loaded "
        f"from the checkpoint get {RECIPE.encoder_lr_scale:g}x of it",
    )
    finetune.add_argument(
        "--checkpoint-every",
        type=positive_int,
        help=f"iterations between checkpoints (default: {RECIPE.checkpoint_every}; --resume and --extend keep the "
        "run's own)",
    )
    finetune.add_argument(
        "--keep-fraction",
        type=fraction,
        help="at most this share of the unlabeled pool gets pseudo-labels, the most reliable first, whichever "
        f"gate judges (--pseudo-gate or its fallback; default: {RECIPE.keep_fraction})",
    )
    finetune.add_argument(
        "--pseudo-gate",
        dest="reliability",
        choices=RELIABILITY,
        help=f"what makes a pseudo-label reliable (default: {RECIPE.reliability}): confidence, the model's own "
        "probability; flips, agreement with its predictions of the volume flipped along each axis; rounds, "
        "agreement with the model this round started from (the source model in round 1), so stage 2 rehearses "
        "what that model did well; where it segments nothing (a new modality, say) no volume passes, and "
        "--pseudo-fallback judges instead",
    )
    finetune.add_argument(
        "--pseudo-fallback",
        dest="fallback",
        choices=FALLBACKS,
        help=f"the gate that judges the pool when --pseudo-gate keeps no volume (default: {RECIPE.fallback}): a "
        "source model that segments nothing on this data cannot vouch for any volume under rounds, so the "
        "adapted model's flipped views are asked instead; none: stage 2 then trains on the labels alone",
    )
    finetune.add_argument(
        "--pseudo-augment",
        choices=AUGMENTS,
        help=f"how the pseudo-labelled patches are augmented (default: {RECIPE.pseudo_augment}): weak, as the "
        "labelled ones; strong, with more intensity change (scale, shift, gamma, noise) that the model must see "
        "through, its pseudo-label made on the unchanged volume; remap, strong and then half the patches through "
        "a random intensity curve that may swap tissues' brightness, as another sequence or modality does; "
        "remap-if-fallback, the curves only where the fallback gate judged (the source model vouched for no "
        "volume: contrast may be what changed), strong where the asked gate did; --resume and --extend keep the "
        "run's own "
        "(--resume refuses another; --extend may change it)",
    )
    finetune.add_argument(
        "--pseudo-teacher",
        choices=TEACHERS,
        help=f"who labels the pseudo-labelled patches (default: {RECIPE.teacher}): fixed, the adapted model's "
        "labels, made once by the gate; ema, a moving average of the model, online, on each patch (its voxels "
        f"of probability {RECIPE.confidence} or more), so the labels improve as the model does; ema-if-fallback, "
        "ema where the fallback gate judged (--pseudo-gate kept no volume, so the labels are the adapted "
        "model's own, errors included), fixed where --pseudo-gate did; --resume and --extend keep the run's "
        "own (naming another is refused: --restart trains the round with it)",
    )
    finetune.add_argument(
        "--pseudo-mix",
        choices=MIXES,
        help=f"what each pseudo-labelled patch is mixed with (default: {RECIPE.pseudo_mix}): copy-paste, the "
        "labelled patch of its batch, a cuboid of two thirds of each side pasted one way or the other, the labels "
        "following (bidirectional copy-paste), so the pool's volumes are not learnt apart from the labelled ones; "
        "only the fixed teacher's labels are mixed (an EMA teacher labels each patch as it is drawn); --resume "
        "and --extend keep the run's own (--resume refuses another; --extend may change it)",
    )
    finetune.add_argument(
        "--blend-start",
        type=probability,
        metavar="SHARE",
        help=f"hand over the round's model as (1 - SHARE) x its tuned weights + SHARE x the weights the round "
        f"started from (default: {RECIPE.blend_start:g}), where the rounds gate kept volumes: the starting model "
        "vouched for part of the pool, so keeping some of it keeps what it did well on sites the labels left "
        "out; elsewhere (a fallback judged, as across modalities) the tuned weights go as they are; 0: never; "
        "0 <= SHARE < 1. last.pt keeps the tuned weights, so --extend goes on from them; --resume and --extend "
        "keep the run's share unless given another (it acts at the handover, after the training); --extend with "
        "only --blend-start hands a finished stage 2 over anew at that share, training nothing",
    )
    finetune.add_argument(
        "--confidence",
        type=probability,
        help=f"with --pseudo-gate confidence, voxels below this probability are ignored (default: {RECIPE.confidence})",
    )
    finetune.add_argument(
        "--min-agreement",
        type=unit_interval,
        help="with --pseudo-gate flips or rounds (or a flips fallback), no volume whose views agree less "
        "(class-balanced Dice; for flips the least of the three flipped views; 0 where neither view finds an "
        f"organ) gets pseudo-labels (default: {RECIPE.min_agreement})",
    )
    finetune.add_argument(
        "--stage2-lr",
        choices=STAGE2_LR,
        help=f"stage 2's learning rate: constant, or cosine, decaying to zero over the stage so the model "
        f"handed over is a settled end point (default: {RECIPE.stage2_lr}; --resume and --extend keep the "
        "run's own, --resume refuses another, and an extended cosine decays over the new total from where it "
        "stands)",
    )
    finetune.add_argument(
        "--seed",
        type=non_negative_int,
        help=f"seed of patches and augmentation (default: {RECIPE.seed}; --resume keeps the run's own)",
    )
    finetune.add_argument(
        "--device", type=device, default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:1"
    )
    finetune.set_defaults(func=commands.cmd_finetune)

    predict = sub.add_parser(
        "predict",
        help="label maps for a folder, in each input's own grid and format",
        description="Segment a folder with the session's newest fine-tuned model (or the source model:\n"
        "--source-model), one label map per input in its own grid and format. The folder's manifest records\n"
        "which model made each map and the image it segments, which evaluate reads.",
        epilog="examples:\n  asfda predict ~/asfda/liver --images /data/new --out /data/pred\n"
        "  asfda predict ~/asfda/liver --images /data/pool --recursive --out /data/pred\n"
        "      a pool of sub-folders (site1/a.nii.gz, sub-01/anat/sub-01_T1w.nii.gz), as rank --recursive reads it:\n"
        "      each map at its scan's path under --out (/data/pred/site1/a.nii.gz), which evaluate pairs with a\n"
        "      reference folder of the same sub-folders (or a flat one, by file name)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_argument("session", type=existing_dir, help="session folder (its adapted model is used)")
    predict.add_argument("--images", type=existing_dir, required=True, help="folder of volumes to segment")
    predict.add_argument(
        "--recursive",
        action="store_true",
        help="also search sub-folders, as rank --recursive does; each map goes to the same sub-folder of --out",
    )
    predict.add_argument(
        "--out",
        type=new_path,
        required=True,
        help="folder for the label maps (one per input, same name and format; DICOM series -> NIfTI); "
        "never the --images folder, and never over a file the session uses",
    )
    predict.add_argument("--source-model", action="store_true", help="use the model before adaptation")
    predict.add_argument(
        "--device", type=device, default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:1"
    )
    predict.set_defaults(func=commands.cmd_predict)

    evaluate = sub.add_parser(
        "evaluate",
        help="Dice and HD95 per class of predictions against reference labels",
        description="Dice and HD95 per class and case, and their mean. With --session the cases the session\n"
        "trained on (labelled or pseudo-labelled, known by content, not by name) are noted and left out of\n"
        "the mean, so that it is a held-out figure.",
        epilog="examples:\n  asfda evaluate --pred /data/pred --labels /data/gt --session ~/asfda/liver\n"
        "  asfda evaluate --pred pred/ --labels raw_gt/ --card card.json --map '41-48=2,49,50=vertebral body,*=0'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("--pred", type=existing_dir, required=True, help="folder of predicted label maps")
    evaluate.add_argument(
        "--labels", type=existing_dir, required=True, help="folder of reference labels (paired by case name)"
    )
    classes = evaluate.add_mutually_exclusive_group()
    classes.add_argument("--session", type=Path, help="session folder: class names from its model card")
    classes.add_argument("--card", type=existing_path, help="model card, for class names")
    evaluate.add_argument("--map", help="for the reference labels: " + MAP_HELP)
    evaluate.add_argument("--out", type=new_path, help="CSV path (default: PRED/evaluation.csv)")
    evaluate.set_defaults(func=commands.cmd_evaluate)

    export = sub.add_parser(
        "export",
        help="write the adapted model as a MONAI bundle, a torch.export program (.pt2) or TorchScript",
        description="Write the session's adapted model (the source model with --source-model) in a form other\n"
        "tools load: a MONAI bundle (configs, weights, card and how it was adapted; runs with MONAI's own runner),\n"
        "a torch.export program or TorchScript (both load back only with --trust: they run stored code).\n"
        "It never writes over an existing export, the base model or its card, or into a base bundle's folder.",
        epilog="examples:\n  asfda export ~/asfda/liver --format bundle --out liver_bundle/\n"
        "  python -m monai.bundle run --config_file liver_bundle/configs/inference.json \\\n"
        "      --meta_file liver_bundle/configs/metadata.json --bundle_root liver_bundle \\\n"
        "      --dataset_dir /data/target_mri --output_dir ~/pred   # pip install 'monai[ignite,fire]'\n"
        "  asfda export ~/asfda/liver --format pt2 --out liver.pt2   # load back: --model liver.pt2 --trust",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("session", type=existing_dir, help="session folder (its adapted model is exported)")
    export.add_argument(
        "--format",
        choices=FORMATS,
        help="bundle: runs with MONAI's bundle runner, metadata records the adaptation; pt2: a torch.export program, "
        "TorchScript's successor; torchscript: deprecated by torch. Default: the one --out's suffix names (.pt2, .ts), "
        "else the format that carries the session's model, as the panel offers it: bundle, or pt2 where no bundle "
        "can (an nnU-Net ResidualEncoderUNet, a .pt2 model; a TorchScript model: torchscript)",
    )
    export.add_argument(
        "--out",
        type=new_path,
        required=True,
        help="a new or empty folder (bundle) or a new file (pt2, torchscript; or a folder for it)",
    )
    export.add_argument(
        "--source-model",
        action="store_true",
        help="export the model as it came (before adaptation); without it a session never fine-tuned is refused",
    )
    export.set_defaults(func=commands.cmd_export)

    demo = sub.add_parser(
        "demo",
        help="the whole method on a shipped model in a few minutes (ground truth plays the clinician)",
        description="Generates a 3-site target pool, ranks it, takes the ground truth of the query as the "
        "clinician's labels, fine-tunes with selective pseudo-labels, and reports test Dice of the source model, "
        "of random selection with the same budget, and of ASFDA. --scenario ct-shift (default): the benchmark's "
        "CT source model on three CT hospitals; mri: the built-in model on MRI-like sites, where it segments "
        "nothing before adaptation.",
        epilog="example:\n  asfda demo --out asfda-demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--out", type=new_path, default=Path("asfda-demo"), help="output folder (default: %(default)s)")
    demo.add_argument(
        "--scenario",
        choices=("ct-shift", "mri"),
        default="ct-shift",
        help="ct-shift: the CT source model on three CT hospitals; mri: the built-in model on MRI-like sites, "
        "which it does not segment (default: %(default)s)",
    )
    demo.add_argument(
        "--pool", type=positive_int, default=24, help="unlabeled target volumes to rank (default: %(default)s)"
    )
    demo.add_argument(
        "--test", type=positive_int, default=8, help="held-out volumes the Dice is measured on (default: %(default)s)"
    )
    demo.add_argument(
        "--budget", type=positive_int, default=4, help="volumes to label, for ASFDA and random (default: %(default)s)"
    )
    demo.add_argument(
        "--iterations", type=positive_int, default=200, help="per fine-tuning stage (default: %(default)s)"
    )
    demo.add_argument(
        "--device", type=device, default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:1"
    )
    demo.set_defaults(func=commands.cmd_demo)

    bench = sub.add_parser(
        "benchmark",
        help="the active-learning benchmark: every strategy, budgets x seeds, on phantoms or on your own data",
        description="Every query strategy fine-tuned with the same recipe, budgets x seeds, Dice on a disjoint\n"
        "labelled test set; per row the paired difference to random (same seed) with a 95% bootstrap interval\n"
        "(3 seeds at least; 5 or more to tell a few points apart), and ASFDA paired against every other query.\n\n"
        "Phantoms (no folders): --scenario ct-shift (hospital shift within CT; the default) or mri-rich (CT ->\n"
        "MRI), each fine-tuning its shipped source model; mri is the earlier protocol, kept for the record.\n\n"
        "Your data: --pool DIR --test DIR [--validation DIR], each with images/ and labels/ holding the same\n"
        "file names (the layout `asfda phantoms` writes). Every pool volume needs its label: the benchmark plays\n"
        'the clinician. An optional cases.json in the test folder, {"cases": [{"name", "site", "subgroup"}]},\n'
        "adds Dice per site.\n\n"
        "Writes OUT/results.json (every run as it finishes: the same command resumes it; rows, seeds or budgets\n"
        "can be added later), summary.json, benchmark.json, benchmark.md, benchmark.png, benchmark_diff.png\n"
        "(with --eval-at also curves.json, benchmark_curves.png), and working files (stage1/, work/, cache/;\n"
        "deleting them costs only time). It trains seeds x (budgets x budgeted rows + full) models; rows whose\n"
        "query and seed are the same share one training, and one stage 1.",
        epilog="examples:\n"
        "  asfda benchmark --scenario ct-shift --validation 12 --budgets 2,4 --iterations 400 --lr 1e-3 \\\n"
        "      --full-iterations 2400 --rows source,random,typiclust,asfda,full --out bench-ct/   # hours on 2 cores\n"
        "  asfda benchmark --quick --out /tmp/b    # a smoke run (seconds)\n"
        "  asfda benchmark --model unet.pt --card card.json --pool data/pool --test data/test \\\n"
        "      --validation data/val --budgets 2,4 --seeds 0,1,2 --rows random,typiclust,asfda --out my-bench/\n"
        "  (choose --iterations, --full-iterations and --lr on the validation curves first:\n"
        "   --rows random,full --eval-at 100,200,400; the whole pool's further: --rows full --full-iterations 3200\n"
        "   --eval-at 400,800,1600,2400)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument(
        "--out", type=new_path, required=True, help="the benchmark's folder (not inside an input folder); it resumes"
    )
    bench.add_argument("--quick", action="store_true", help="1 seed, budget 2, a few iterations: checks that it runs")
    bench.add_argument(
        "--model",
        type=existing_path,
        help="model to adapt (required with your own folders; default: the scenario's shipped source model)",
    )
    bench.add_argument("--card", type=existing_path, help="its model card (default: found beside the model)")
    _add_loading_arguments(bench.add_argument_group("model loading (as asfda rank reads the model)"))
    bench.add_argument("--pool", help="folder of the unlabelled pool (images/ + labels/), or a phantom count")
    bench.add_argument("--test", help="folder of the test set, or a phantom count")
    bench.add_argument(
        "--validation",
        help="folder of a validation set (or a phantom count): each run is also scored there, for choices",
    )
    bench.add_argument(
        "--budgets", type=positive_ints, help="labelled volumes per run (default 2,4,8; each below the pool's size)"
    )
    bench.add_argument(
        "--seeds",
        type=seed_list,
        help="training seeds: a comma list (0,1,2; one seed alone: 2,) or a count N (seeds 0..N-1; default 5)",
    )
    bench.add_argument(
        "--rows", type=choice_list(BENCH_ROWS), help=f"comma list of rows (default: all): {', '.join(BENCH_ROWS)}"
    )
    bench.add_argument(
        "--iterations",
        type=positive_int,
        help="fine-tuning iterations per run (default 300; asfda+ssft and ssft-control train 1.5x as long)",
    )
    bench.add_argument(
        "--full-iterations",
        type=positive_int,
        help="the upper bound's (full row's) iterations (default: --iterations): the whole pool converges "
        "later than a few labels; choose them on the validation curves (--rows full --full-iterations 3200 "
        "--eval-at 400,800,1600,2400); part of the protocol",
    )
    bench.add_argument(
        "--lr", type=positive_float, help=f"the recipe's learning rate (default {RECIPE.lr:g}, asfda finetune's)"
    )
    bench.add_argument(
        "--encoder-lr-scale",
        type=positive_float,
        help=f"learning-rate factor of the pre-trained tensors (default {RECIPE.encoder_lr_scale:g}, as asfda "
        "finetune); choose both on --validation, never on --test",
    )
    bench.add_argument(
        "--lower-rate-for",
        choices=LOWER_RATE_FOR,
        help=f"which checkpoint tensors take that factor: every loaded one, or only those in the encoder "
        f"(default: {RECIPE.lower_rate_for}, as asfda finetune; the CT and CT -> MRI tables ran with encoder)",
    )
    bench.add_argument(
        "--fusion",
        choices=FUSIONS,
        help=f"how the ASFDA rows combine DKD and ASD (default: {DEFAULT_FUSION}, as asfda rank); part of the "
        "protocol a results.json resumes with",
    )
    bench.add_argument(
        "--pseudo-gate",
        choices=RELIABILITY,
        help=f"what makes the asfda+ssft row's pseudo-labels reliable (default: {RECIPE.reliability}, as asfda "
        "finetune; see its --help); part of the protocol a results.json resumes with",
    )
    bench.add_argument(
        "--pseudo-fallback",
        choices=FALLBACKS,
        help=f"the gate that judges when --pseudo-gate keeps no volume (default: {RECIPE.fallback}, as asfda "
        "finetune); part of the protocol",
    )
    bench.add_argument(
        "--pseudo-augment",
        choices=AUGMENTS,
        help=f"how the asfda+ssft row augments its pseudo-labelled patches (default: {RECIPE.pseudo_augment}, as "
        "asfda finetune); part of the protocol",
    )
    bench.add_argument(
        "--pseudo-teacher",
        choices=TEACHERS,
        help=f"who labels the asfda+ssft row's pseudo-labelled patches (default: {RECIPE.teacher}, as asfda "
        "finetune; see its --help); part of the protocol",
    )
    bench.add_argument(
        "--pseudo-mix",
        choices=MIXES,
        help=f"what the asfda+ssft row mixes its pseudo-labelled patches with, where the fixed teacher labels them "
        f"(default: {RECIPE.pseudo_mix}, as asfda finetune; see its --help); part of the protocol",
    )
    bench.add_argument(
        "--blend-start",
        type=probability,
        metavar="SHARE",
        help=f"the starting weights' share of the asfda+ssft row's handed-over model where the rounds gate kept "
        f"volumes (default: {RECIPE.blend_start:g}, as asfda finetune; its control blends where the gate would "
        "have; the tables made before 2026-12-05's ninth session ran with 0); part of the protocol",
    )
    bench.add_argument(
        "--ema-weight",
        type=positive_float,
        help=f"the loss weight of the patches an EMA teacher labels in the asfda+ssft row (default: "
        f"{RECIPE.ema_weight:g}, as asfda finetune; the tables made before 2026-12-05's sixth session ran with 1); "
        "part of the protocol",
    )
    bench.add_argument(
        "--min-agreement",
        type=unit_interval,
        help=f"with --pseudo-gate flips or rounds, the volume floor of agreement (default: {RECIPE.min_agreement}, "
        "as asfda finetune); part of the protocol",
    )
    bench.add_argument(
        "--stage2-lr",
        choices=STAGE2_LR,
        help=f"stage 2's learning rate in the asfda+ssft row (default: {RECIPE.stage2_lr}, as asfda finetune); "
        "with cosine the ssft-control row runs the same two stages on the labels alone; part of the protocol",
    )
    bench.add_argument(
        "--pseudo-iterations",
        type=positive_int,
        help="stage 2's iterations in the asfda+ssft row, after --iterations of stage 1 (default: half as many, "
        "as asfda finetune's 200 after 400); its control trains as long in all; part of the protocol",
    )
    bench.add_argument(
        "--eval-at",
        type=positive_ints,
        help="with a validation set: also score it after these stage-1 iterations (learning curves), e.g. 100,200",
    )
    bench.add_argument(
        "--scenario",
        choices=BENCH_SCENARIOS,
        help="phantom data: ct-shift (hospital shift within CT; --model Resources/BenchmarkModels/"
        "ct_source_batch.pt), mri-rich (CT -> three MRI-like sites, deformed five-organ anatomy; --model "
        "Resources/BenchmarkModels/ct_source_batch_percentile.pt), mri (the built-in model on ellipsoid organs: "
        "the earlier protocol, kept for the record) (default: ct-shift; none with your own --pool and --test)",
    )
    bench.add_argument(
        "--device", type=device, default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:1"
    )
    bench.add_argument(
        "--report-only",
        action="store_true",
        help="summarise the runs already in OUT/results.json (e.g. of an unfinished benchmark): the rows and "
        "budgets that ran, or those of them --rows and --budgets name; with your own data give --model, --pool "
        "and --test again",
    )
    bench.set_defaults(func=commands.cmd_benchmark)

    phantoms = sub.add_parser(
        "phantoms",
        help="generate labelled abdominal phantoms (CT-like source or MRI-like target)",
        description="Synthetic abdominal volumes (a body with fat, muscle and spine; liver, kidneys, gallbladder) "
        "with their labels, in the layout rank, labels import, evaluate and benchmark read: the embedded "
        "model was trained on the CT-like domain, the MRI-like one is a shifted target for it.",
        epilog="examples:\n  asfda phantoms --domain mri --count 20 --out pool/\n"
        "  asfda phantoms --domain mri --count 5 --seed 1 --out test/   # another seed: other volumes (a test set)\n"
        "label values: 1 liver, 2 kidney, 3 gallbladder (a card's class_names: background, liver, kidney, "
        "gallbladder)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    phantoms.add_argument("--out", type=new_path, required=True, help="writes OUT/images and OUT/labels")
    phantoms.add_argument("--count", type=positive_int, default=10, help="volumes to write (default: %(default)s)")
    phantoms.add_argument(
        "--domain",
        choices=("ct", "mri"),
        default="mri",
        help="ct: the embedded model's source domain; mri: T2-like contrasts, bias field, Rician noise "
        "(default: %(default)s)",
    )
    phantoms.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the same seed writes the same volumes, so a test set beside a pool needs another (default: %(default)s)",
    )
    phantoms.add_argument("--no-labels", action="store_true", help="write OUT/images only")
    phantoms.set_defaults(func=commands.cmd_phantoms)
    return parser


SCALES_OUT = ("rank", "finetune")  # the commands that shard their work across torchrun's processes


def _scans_given_without_images(argv: list[str]) -> str | None:
    """For ``predict``/``stats`` given a folder of scans without ``--images`` (``asfda predict SCANS``): the
    hint that names the option, which argparse's "required: --images" would not; None otherwise. Asked only
    once argparse found --images missing (``--images=DIR`` and abbreviations are its to read)."""
    if len(argv) < 2 or argv[0] not in ("predict", "stats"):
        return None
    from ASFDALib.data.volumes import has_image_suffix

    for word in (w for w in argv[1:] if not w.startswith("-")):
        folder = Path(word)
        if not folder.is_dir() or is_session_folder(folder):
            continue
        scans = folder / "images" if (folder / "images").is_dir() else folder  # a dataset's images/
        if not any(has_image_suffix(p) for p in scans.iterdir()):
            continue
        if argv[0] == "stats":
            return f"{word}: give the source-domain scans as --images {scans}"
        return f"{word} holds scans, not a session: asfda predict SESSION --images {scans} --out PRED"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    commands_ = next(a for a in parser._actions if a.dest == "command")
    for command in commands_.choices.values():
        command.argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(argv)
    if args.command == "labels":  # `labels import --from DIR SESSION`: the session after the option is still its
        args.words += [u for u in unknown if not u.startswith("-")]
        unknown = [u for u in unknown if u.startswith("-")]
        if not unknown and (problem := commands.labels_argument_problem(args)):
            commands_.choices["labels"].error(problem)
    if unknown:  # the command's own usage and help, not the top-level list of commands
        folder = next((u for u in unknown if not u.startswith("-") and Path(u).is_dir()), None)
        takes = {a.dest for a in commands_.choices[args.command]._actions}
        if folder is not None and "images" in takes and getattr(args, "images", None) is None:
            scans = Path(folder) / "images" if (Path(folder) / "images").is_dir() else Path(folder)  # a dataset's
            commands_.choices[args.command].error(f"unrecognized argument {folder}: give scans as --images {scans}")
        commands_.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(args, "mc_passes", None) and args.strategy != "epistemic":  # the other strategies make one pass
        commands_.choices[args.command].error("--mc-passes is for --strategy epistemic (MC dropout); leave it out")
    if getattr(args, "network_args", None) and not getattr(args, "network", None):  # an argument error: exit 2
        commands_.choices[args.command].error("--network-args needs --network NAME (the MONAI network they build)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in SCALES_OUT:
        # every process would do the whole job, and write the same files
        if os.environ.get("RANK", "0") == "0":
            print(
                f"asfda {args.command}: error: runs in one process; run it without torchrun "
                f"(only {' and '.join(SCALES_OUT)} scale out)",
                file=sys.stderr,
            )
        return 1
    with _terminate_as_interrupt():
        code = _run(args)
    if "ASFDALib.distributed" in sys.modules:  # loaded by the commands that can run under torchrun
        sys.modules["ASFDALib.distributed"].shutdown(wait=code == 0)
    return code


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill``, ``timeout``, a batch scheduler's stop, torchrun stopping its workers) takes Ctrl-C's
    path, so the run is recorded as interrupted and a re-run resumes, and exits 143 as terminated; the previous
    handler comes back after."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_PIPE_GONE = 128 + signal.SIGPIPE if hasattr(signal, "SIGPIPE") else 1  # the shell's status for SIGPIPE


def _stdout_is_null() -> bool:
    """Whether stdout now writes to the null device (where a closed pipe's output was sent)."""
    try:
        return os.path.samestat(os.fstat(sys.stdout.fileno()), os.stat(os.devnull))
    except (OSError, ValueError, AttributeError):  # no file descriptor (an embedding host's stream), or no stat
        return False


def _run(args: argparse.Namespace) -> int:
    try:
        code = args.func(args)
        sys.stdout.flush()  # a pipe's reader that left shows here, not after the interpreter's last flush
        return code
    except BrokenPipeError:
        # the reader of the output left (`| head`): stop quietly, as a Unix tool stopped by SIGPIPE does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _PIPE_GONE
    except SystemExit as exc:
        # rich's console meets the same (Console.on_broken_pipe): it points stdout at the null device and exits 1
        if exc.code == 1 and _stdout_is_null():
            return _PIPE_GONE
        raise
    except ASFDAError as exc:
        print(f"asfda {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"interrupted; {_what_is_kept(args)}", file=sys.stderr)
        return interrupted_exit_code(exc)
    except RuntimeError as exc:
        if "ASFDALib.distributed" not in sys.modules or not sys.modules["ASFDALib.distributed"].peer_lost(exc):
            raise
        # not this process's error: torchrun stops it next, and the job goes on as after an interruption
        why = brief(exc)
        print(
            f"asfda {args.command}: stopped: another process of the torchrun job left ({why}); {_what_is_kept(args)}",
            file=sys.stderr,
        )
        return 1


def _what_is_kept(args: argparse.Namespace) -> str:
    """What a stopped command leaves, and how to go on."""
    return {
        "rank": "finished volumes are cached and a re-run resumes from there",
        "benchmark": "finished runs are in results.json and a re-run resumes from there",
        "demo": "a re-run makes what is missing",
        "phantoms": f"the volumes written are kept in {getattr(args, 'out', '--out')}; run it again with a "
        "new --out, or remove that folder first",
        "finetune": "'--resume' goes on from the newest checkpoint, if one was written",
        "predict": "the maps written are kept and a re-run replaces them",
    }.get(args.command, "nothing half-written is kept; run it again")


if __name__ == "__main__":
    sys.exit(main())
