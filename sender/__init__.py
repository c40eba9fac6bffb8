"""The dlad-stream sender: volume loading, ROI, probability-steered diffusion, layered encoding."""
