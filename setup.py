"""Build of the optional compiled fast path (listener/_hotpath.c); everything else is in pyproject.toml.

``optional=True``: where no C compiler is found, the install goes on and the listener runs its
pure-Python path (same events, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "listener._hotpath",
            ["listener/_hotpath.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
        )
    ]
)
