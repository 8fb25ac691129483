"""What this CPU's int8 dot product can do: where --overflow-fix matters."""

import functools
import platform
from pathlib import Path

# x86 extensions with an 8-bit dot product that accumulates in 32 bits (no 16-bit intermediate to saturate)
_EXACT_INT8_DOT = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=None)
def int8_dot_saturates() -> bool | None:
    """True on an x86 CPU whose u8 x s8 products pass through a saturating 16-bit sum (VPMADDUBSW: SSE4,
    AVX2, AVX-512 without VNNI), False where they cannot saturate, None where this cannot be told."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return False if machine in ("aarch64", "arm64") else None  # Arm's int8 dot products widen to 32 bits
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None  # not Linux: no flags to read here
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    if flags is None:
        return None
    return not any(f in flags for f in _EXACT_INT8_DOT)
