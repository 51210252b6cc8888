"""Which accelerators really work on this machine: one answer for the exporters and the runtime.

``cuda_usable`` is asked by the runtime (``serving.providers``: which provider a session gets) and by
the optimized exporter (``--target cuda``: whether its check can run the graph here); both import it
from here, since converters and serving never import each other.
"""

from __future__ import annotations

import ctypes
from pathlib import Path


def cuda_usable() -> bool:
    """True when onnxruntime's CUDA provider would really load: a GPU, its driver and the CUDA libraries.

    Checked quietly with the dynamic loader: onnxruntime-gpu itself logs errors when it tries and fails.
    """
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
            return False
        capi = Path(ort.__file__).parent / "capi"
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / "libonnxruntime_providers_cuda.so"))
    except (OSError, AttributeError):
        return False
    return True
