"""Declares the optional C accelerators only; all project metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # optional: a failed compile (no gcc in the image) falls back to the pure-Python scanner
        Extension("data_plane.postgres._framescan", ["data_plane/postgres/_framescan.c"], optional=True),
        Extension("data_plane.postgres._sqlshape", ["data_plane/postgres/_sqlshape.c"],
                  depends=["data_plane/postgres/sqlshape_scan.h"], optional=True),
        Extension("data_plane.postgres._rowmask", ["data_plane/postgres/_rowmask.c"],
                  depends=["data_plane/_sha256.h"], optional=True),
        Extension("data_plane.core._recording", ["data_plane/core/_recording.c"],
                  depends=["data_plane/_sha256.h", "data_plane/_record.h"], optional=True),
        # the C data path of the PostgreSQL relay: needs OpenSSL's headers (libssl-dev); without it,
        # every session stays on the Python relay
        Extension("data_plane.postgres._fastrelay", ["data_plane/postgres/_fastrelay.c"],
                  depends=["data_plane/_sha256.h", "data_plane/_record.h", "data_plane/_spoolmap.h",
                           "data_plane/postgres/pgtrack.h", "data_plane/postgres/pgtrack_py.h",
                           "data_plane/postgres/sqlshape_scan.h"],
                  libraries=["ssl", "crypto"], extra_compile_args=["-pthread"], extra_link_args=["-pthread"],
                  optional=True),
        Extension("data_plane.postgres._pgtrack", ["data_plane/postgres/_pgtrack.c"],
                  depends=["data_plane/_sha256.h", "data_plane/postgres/pgtrack.h",
                           "data_plane/postgres/pgtrack_py.h"], optional=True),
    ]
)
