"""The loader's guard against a native library built for another torch (lorsum_kernels/_native.py)."""

from __future__ import annotations

import os

import torch

from lorsum_kernels import _native


def test_same_release_loads_whatever_the_local_tag():
    assert _native.torch_mismatch("2.13.0+cpu", "2.13.0+cpu") is None
    assert _native.torch_mismatch("2.13.0+cpu", "2.13.0+cu130") is None
    assert _native.torch_mismatch(None, "2.14.1") is None  # built before the version was recorded


def test_another_release_is_refused_with_the_fix():
    why = _native.torch_mismatch("2.13.0+cpu", "2.14.1+cu130")
    assert why is not None and "2.13.0" in why and "2.14.1" in why and "--no-build-isolation" in why
    assert _native.torch_mismatch("2.13.0", "2.13.1") is not None


def test_a_built_library_records_the_torch_it_was_built_against():
    if not _native.NATIVE_AVAILABLE or not os.path.exists(_native._BUILT_TORCH_FILE):
        import pytest

        pytest.skip("no native library built by this setup.py here")
    assert _native._built_torch_version().split("+")[0] == torch.__version__.split("+")[0]
