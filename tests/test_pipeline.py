"""The sender's chain defaults: which coding mode diffuses (sender.pipeline.default_diffusion)."""

from __future__ import annotations

import numpy as np
import pytest

from sender.cli import build_parser, settings_from_args
from sender.diffusion import DiffusionSettings
from sender.encoder import EncodeSettings
from sender.pipeline import PHANTOM, build_encoder, default_diffusion


def test_layered_modes_do_not_diffuse_and_a_single_lossless_codec_does():
    """The figures of docs/BENCHMARKS.md ("What diffusion buys"): none in the layered modes,
    the paper's scheme with one lossless codec."""
    assert default_diffusion(EncodeSettings()).iterations == 0
    assert default_diffusion(EncodeSettings(exact=True)).iterations == 0
    assert default_diffusion(EncodeSettings(codec="jpegls")) == DiffusionSettings()
    assert DiffusionSettings().iterations == 15  # the scheme itself keeps the paper's steps


@pytest.mark.parametrize(("options", "iterations"), [
    ([], 0), (["--exact"], 0), (["--codec", "jpegls"], 15), (["--iterations", "7"], 7),
    (["--codec", "zstd", "--iterations", "0"], 0)])
def test_cli_iterations_follow_the_mode_unless_given(options, iterations):
    args = build_parser().parse_args(["ct.nii.gz", "--out", "x.dlad", *options])
    _, diffusion, _ = settings_from_args(args)
    assert diffusion.iterations == iterations


def test_build_encoder_applies_the_default_of_the_mode():
    layered = build_encoder(PHANTOM)
    assert layered.header.provenance["diffusion"]["iterations"] == 0
    np.testing.assert_array_equal(np.asarray(layered.study.diffused), layered.study.volume.data)
    single = build_encoder(PHANTOM, encode=EncodeSettings(codec="jpegls"))
    assert single.header.provenance["diffusion"]["iterations"] == 15
    diffused, original, roi = np.asarray(single.study.diffused), single.study.volume.data, \
        single.study.roi
    assert (diffused[~roi] != original[~roi]).mean() > 0.1
    np.testing.assert_array_equal(diffused[roi], original[roi])
