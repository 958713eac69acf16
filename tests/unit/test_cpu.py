"""The CPU's reduced-precision instructions, read from /proc/cpuinfo's flags (service.models.cpu)."""

from pathlib import Path

from service.models.cpu import cpu_flags, cpu_has_int8_dot_products, cpu_has_native_bf16


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_has_native_bf16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert not cpu_has_native_bf16(info)
    info.write_text("flags\t\t: fpu amx_bf16 amx_tile\n")
    assert cpu_has_native_bf16(info)
    assert not cpu_has_native_bf16(tmp_path / "missing")


def test_int8_dot_products_are_vnni_or_amx(tmp_path: Path) -> None:
    """Zen 4 and Cascade Lake (AVX512_VNNI), Alder Lake (AVX_VNNI), Sapphire Rapids (AMX-INT8) have them; an
    AVX2-only CPU (Zen 2/3, this project's CI machines at times) and Skylake-SP (AVX-512 without VNNI) do not."""
    info = tmp_path / "cpuinfo"
    for flags, expected in (
        ("fpu sse avx2 avx512f avx512_vnni avx512_bf16", True),
        ("fpu sse avx2 avx_vnni", True),
        ("fpu avx2 amx_int8 amx_tile", True),
        ("fpu sse avx avx2 fma", False),
        ("fpu sse avx2 avx512f avx512bw avx512vl", False),
    ):
        info.write_text(f"processor\t: 0\nvendor_id\t: X\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        assert cpu_has_int8_dot_products(info) is expected, flags
    info.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")  # aarch64 names its flags otherwise: unknown
    assert cpu_flags(info) == frozenset() and not cpu_has_int8_dot_products(info)
    assert not cpu_has_int8_dot_products(tmp_path / "missing")
