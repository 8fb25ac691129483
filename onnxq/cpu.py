"""What this CPU's int8 dot product can do: where --overflow-fix matters, and what bench and build name."""

import functools
import platform
from pathlib import Path

# x86 extensions with an 8-bit dot product that accumulates in 32 bits (no 16-bit intermediate to saturate)
_EXACT_INT8_DOT = ("avx512_vnni", "avx_vnni", "amx_int8")
_X86 = ("x86_64", "amd64", "i386", "i486", "i586", "i686", "x86")
_ARM = ("aarch64", "arm64")

SATURATION = ("this CPU has no VNNI: its int8 convolutions add each pair of u8 x s8 products into a 16-bit "
              "sum, which 8-bit weights can overflow")


def saturates(machine: str, cpuinfo: str | None) -> bool | None:
    """True for an x86 CPU whose u8 x s8 products pass through a saturating 16-bit sum (VPMADDUBSW: SSE4,
    AVX2, AVX-512 without VNNI), False where they cannot saturate, None where this cannot be told.
    cpuinfo: the text of /proc/cpuinfo, None where there is none."""
    machine = machine.lower()
    if machine in _ARM:
        return False  # Arm's int8 dot products (SDOT, SMMLA) widen to 32 bits
    if machine not in _X86 or cpuinfo is None:
        return None
    flags = _field(cpuinfo, "flags")
    if flags is None:
        return None
    return not any(f in flags.split() for f in _EXACT_INT8_DOT)


def _field(cpuinfo: str | None, key: str) -> str | None:
    """The first `key: value` line's value in /proc/cpuinfo's text."""
    return next((ln.split(":", 1)[1].strip() for ln in (cpuinfo or "").splitlines() if ln.startswith(key)), None)


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None  # not Linux: no flags to read here


@functools.lru_cache(maxsize=None)
def int8_dot_saturates() -> bool | None:
    """saturates() for this machine."""
    return saturates(platform.machine(), _cpuinfo())


def describe_cpu(cpuinfo: str | None, machine: str) -> dict:
    """{"name", "int8"}: the CPU's model name and its exact int8 dot-product extensions (VNNI, AMX): the
    int8 kernels a CPU runtime picks, and so its speed, depend on them (bench/latency.py)."""
    flags = (_field(cpuinfo, "flags") or "").split()
    return {"name": _field(cpuinfo, "model name") or machine, "int8": [f for f in _EXACT_INT8_DOT if f in flags]}


def this_cpu() -> dict:
    """describe_cpu() for this machine."""
    return describe_cpu(_cpuinfo(), platform.processor() or platform.machine())


def cpu_line() -> str:
    cpu = this_cpu()
    return f"{cpu['name']} (int8 dot product: {', '.join(cpu['int8']) or 'no VNNI/AMX'})"
