"""Build of the optional compiled fast path (listener/_hotpath_c/*.c); everything else is in pyproject.toml.

``optional=True``: where no C compiler is found, the install goes on and the listener runs its
pure-Python path (same events, slower).
"""

from pathlib import Path

from setuptools import Extension, setup

HOTPATH = Path("listener/_hotpath_c")  # one file per concern behind hotpath.h (see its top)

setup(
    ext_modules=[
        Extension(
            "listener._hotpath",
            sorted(str(p) for p in HOTPATH.glob("*.c")),
            depends=sorted(str(p) for p in HOTPATH.glob("*.h")),
            optional=True,
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
                                "-fvisibility=hidden"],
        )
    ]
)
