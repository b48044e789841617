"""Declares the optional C accelerator only; all project metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # optional: a failed compile (no gcc in the image) falls back to the pure-Python scanner
        Extension("data_plane.postgres._framescan", ["data_plane/postgres/_framescan.c"], optional=True),
        Extension("data_plane.postgres._sqlshape", ["data_plane/postgres/_sqlshape.c"], optional=True),
        Extension("data_plane.postgres._rowmask", ["data_plane/postgres/_rowmask.c"],
                  depends=["data_plane/_sha256.h"], optional=True),
        Extension("data_plane.core._recording", ["data_plane/core/_recording.c"],
                  depends=["data_plane/_sha256.h"], optional=True),
    ]
)
