"""The lightweight dlad-stream receiver: decodes chunks and reassembles the volume.

Nothing under ``receiver`` may import torch or itk.
"""
