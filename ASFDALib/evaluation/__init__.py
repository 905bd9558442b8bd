"""How good a segmentation is: Dice and HD95, per case and per folder."""
