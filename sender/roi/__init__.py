"""Liver probability providers and the paper's post-processing that turns a map into the ROI."""
