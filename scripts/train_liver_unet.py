#!/usr/bin/env python
"""Train the 2D liver U-Net (models/unet.py) from CT scans with liver masks.

The training itself is models/training.py (data, augmentation, optimisation, checkpoints,
outputs; every option is described there and in docs/UNET.md). This command line gives it the
sender's file reader (sender.io: NIfTI, DICOM folders, NRRD, MHA) and the sender's ROI
post-processing for the validation figures (sender/roi/safety.py: roi_metrics), which
models/ may not import.

Outputs in --out: checkpoint.pt (resumable, --resume), liver_unet.pt (half-precision weights
for the sender), liver_unet.json (sidecar: data, preprocessing, validation, the command that
retrains it) and history.json.

Examples:
    # fold A: train on the abdomen CT, validate on the torso CT
    python scripts/train_liver_unet.py --out runs/fold_a \\
        --train ../shared/data/abdomen_ct_dicom ../shared/data/abdomen_ct_liver.nii.gz \\
        --val ../shared/data/torso_ct_sm.nii.gz ../shared/data/torso_ct_sm_liver.nii.gz

    # a LiTS download plus 100 phantoms, 20 % of the patients held out, on a GPU
    python scripts/train_liver_unet.py --out runs/lits --dataset ~/data/LiTS \\
        --phantoms 100 --steps 20000 --batch-size 32 --device cuda

    # TotalSegmentator's multi-label masks: the liver is label 5
    python scripts/train_liver_unet.py --out runs/ts --dataset ~/data/Totalsegmentator --label 5

    # continue an interrupted run: the same command plus --resume
    python scripts/train_liver_unet.py --out runs/fold_a --resume \\
        --train ../shared/data/abdomen_ct_dicom ../shared/data/abdomen_ct_liver.nii.gz \\
        --val ../shared/data/torso_ct_sm.nii.gz ../shared/data/torso_ct_sm_liver.nii.gz
"""

from __future__ import annotations

import sys

from models.training import TrainingHooks, main
from sender.io import load_volume
from sender.roi.safety import roi_metrics


def sender_hooks() -> TrainingHooks:
    """The sender's file reader and ROI scoring (default post-processing of the U-Net's map)."""
    return TrainingHooks(
        read_volume=load_volume,
        score_roi=lambda probability, liver, spacing:
            roi_metrics(probability, liver, spacing).to_dict())


if __name__ == "__main__":
    sys.exit(main(hooks=sender_hooks(), description=__doc__))
