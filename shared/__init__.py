"""Common code of the dlad-stream sender and receiver: volume type, wire format, codecs.

Nothing under ``shared`` may import torch or itk: the receiver installs without them.
"""
