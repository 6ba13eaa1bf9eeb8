"""Native bfloat16 on the CPU: read from the CPU's flags (AMX-BF16 / AVX512-BF16), torch's
probes where the flags cannot be read."""

import torch

from ddpmseg.core import device
from ddpmseg.core.device import cpu_bf16_native, cpu_flags

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse sse2 avx fma avx2 f16c\n"


def test_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(AVX2_ONLY + "\nprocessor\t: 1\nflags\t\t: fpu sse avx2\n")
    assert cpu_flags(str(info)) == frozenset({"fpu", "sse", "sse2", "avx", "fma", "avx2", "f16c"})


def test_unreadable_cpuinfo_gives_none(tmp_path):
    assert cpu_flags(str(tmp_path / "absent")) is None
    (tmp_path / "noflags").write_text("processor\t: 0\n")
    assert cpu_flags(str(tmp_path / "noflags")) is None


def test_avx2_alone_is_not_native():
    assert cpu_bf16_native(frozenset({"avx", "avx2", "fma", "avx512f"})) is False


def test_amx_or_avx512_bf16_is_native():
    assert cpu_bf16_native(frozenset({"avx2", "amx_tile", "amx_bf16"})) is True
    assert cpu_bf16_native(frozenset({"avx2", "avx512f", "avx512_bf16"})) is True


def test_the_default_reads_this_machines_flags(monkeypatch):
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert cpu_bf16_native() is True
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2"}))
    assert cpu_bf16_native() is False


def test_without_flags_torch_probes_answer(monkeypatch):
    monkeypatch.setattr(device, "cpu_flags", lambda: None)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert cpu_bf16_native() is False
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert cpu_bf16_native() is True


def test_bf16_on_a_cpu_without_native_bf16_is_said_once(monkeypatch, caplog):
    from ddpmseg.backbone.base import note_emulated_bf16, precision_context

    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2"}))
    note_emulated_bf16.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="ddpmseg.backbone.base"):
            for _ in range(2):
                with precision_context(cpu, "bf16"):
                    pass
            with precision_context(cpu, "fp32"):
                pass
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "emulated" in lines[0] and 'precision="fp32"' in lines[0]
        note_emulated_bf16.cache_clear()
        caplog.clear()
        monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"amx_bf16"}))
        with caplog.at_level("WARNING", logger="ddpmseg.backbone.base"):
            with precision_context(cpu, "bf16"):
                pass
        assert not caplog.records
    finally:
        note_emulated_bf16.cache_clear()
