"""The liver U-Net shipped with the sender: network, preprocessing, inference, bundled weights.

* :mod:`models.unet`: the 2D five-level U-Net, its config and the weights file format
  (read with ``torch.load(weights_only=True)``);
* :mod:`models.preprocessing`: canonical orientation, HU window, in-plane resampling;
* :mod:`models.inference`: whole-volume probability maps, batched, on CPU or CUDA;
* :mod:`models.phantoms`: synthetic abdominal phantoms used to supplement training data, and
  synthetic liver lesions (:func:`models.phantoms.insert_lesion`, a training augmentation);
* :mod:`models.augment`: the training augmentations of one slice;
* :mod:`models.training`: the training procedure (``scripts/train_liver_unet.py`` is its
  command line, which injects the sender's file reader and ROI scoring: ``models`` imports
  only ``shared``, torch, numpy and scipy);
* ``liver_unet.pt`` / ``liver_unet.json``: the bundled weights and their sidecar (data,
  preprocessing, validation, how to retrain); see ``docs/UNET.md``.

The sender uses it through :class:`sender.roi.unet.UNetProvider`. This package needs torch;
``shared/`` and ``receiver/`` never import it.
"""
