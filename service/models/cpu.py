"""What this CPU's instruction set offers the reduced precisions, read from /proc/cpuinfo (x86 flag names; any other
CPU, or no such file, offers neither and runs fp32)."""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# bfloat16 dot products: bf16 GEMMs run ~3x faster than fp32 (measured: (4096, 256) × (256, 256) 1.3 vs 3.9 ms on
# 2 Zen 4 cores).
BF16_DOT_PRODUCTS = ("avx512_bf16", "amx_bf16")
# int8 dot products (VNNI, AMX). Without them x86 multiplies u8 × s8 pairs into saturating int16 sums (vpmaddubsw):
# measured on 2 AVX2-only AMD EPYC cores, SAM 2.1-T's int8 image encoder (our recipe) ran no faster than fp32
# (2.80 vs 2.78 s/image at 1024², 0.216 vs 0.164 at 256²) and missed the 0.99 gate (min mask IoU 0.9686 at 1024²,
# 0.9607 at 256²), where VNNI CPUs measured 0.995 and 1.8x faster (service.models.openvino_ir).
INT8_DOT_PRODUCTS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The first processor's flags in ``cpuinfo``; empty where unreadable or absent."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    flags = next((line.split(":", 1)[1] for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(flags.split())


def cpu_has_native_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (x86 AVX512_BF16 or AMX-BF16)."""
    return not cpu_flags(cpuinfo).isdisjoint(BF16_DOT_PRODUCTS)


def cpu_has_int8_dot_products(cpuinfo: Path = CPUINFO) -> bool:
    """Whether this CPU has int8 dot-product instructions (x86 AVX512_VNNI, AVX_VNNI or AMX-INT8)."""
    return not cpu_flags(cpuinfo).isdisjoint(INT8_DOT_PRODUCTS)
