"""Refuses, with an ImportError that says why, a CPU the compiled core cannot run on.

The extension is built for x86-64-v3 (AVX2 and FMA, see ``.cargo/config.toml``); loading it on an
older x86 CPU would kill the process with an illegal instruction instead.
"""

import platform


def _missing_x86_features() -> set[str]:
    if platform.machine() not in ("x86_64", "AMD64"):
        return set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return {"avx2", "fma"} - set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_missing = _missing_x86_features()
if _missing:
    raise ImportError(
        f"hooked_encoder's compiled core needs AVX2 and FMA (x86-64-v3), and this CPU lacks "
        f"{sorted(_missing)}. Build it for this CPU from a source checkout with: "
        "RUSTFLAGS='-C target-cpu=native' pip install ."
    )
