"""Finds the CUDA libraries a CUDA build of the compiled core links against.

A CUDA build needs CUDA 13's runtime (libcudart), cuBLAS and cuRAND, and the driver's libcuda,
at import time. When the dynamic loader cannot find them on its own (no CUDA toolkit on
``LD_LIBRARY_PATH``), they are taken from NVIDIA's pip wheels (``nvidia-cuda-runtime``,
``nvidia-cublas``, ``nvidia-curand``), which PyTorch's CUDA 13 builds install too. CPU builds
never get here.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

_LIBRARIES = (
    "libcudart.so.13",
    "libcublasLt.so.13",
    "libcublas.so.13",
    "libcurand.so.10",
    "libnvrtc.so.13",
)


def _wheel_library_dirs() -> list[Path]:
    dirs = []
    for entry in sys.path:
        lib = Path(entry or ".") / "nvidia" / "cu13" / "lib"
        if lib.is_dir():
            dirs.append(lib)
    return dirs


def preload() -> None:
    """Loads the CUDA libraries found in NVIDIA's wheels, globally, so that the extension's
    dependencies resolve by their sonames."""
    for directory in _wheel_library_dirs():
        for name in _LIBRARIES:
            path = directory / name
            if path.is_file():
                ctypes.CDLL(os.fspath(path), mode=ctypes.RTLD_GLOBAL)


def missing_library_message(error: ImportError) -> str:
    return (
        f"this is a CUDA build of hooked_encoder and a CUDA library is missing ({error}). "
        "It needs an NVIDIA driver (libcuda.so.1) and CUDA 13's runtime, cuBLAS and cuRAND: "
        "put a CUDA 13 toolkit's lib64 on LD_LIBRARY_PATH, or pip install nvidia-cuda-runtime "
        "nvidia-cublas nvidia-curand (PyTorch's CUDA 13 wheels bring them)."
    )
