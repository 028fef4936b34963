"""Honest speed: the bf16-on-CPU guard.

    .venv/bin/python -m pytest -q tests/test_speed.py
"""

import torch

from common import speed

X86_OLD = "processor\t: 0\nmodel name\t: Some AVX2 Xeon\nflags\t\t: fpu sse2 avx avx2 fma\nbugs\t\t: spectre_v1\n"
X86_BF16 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd asimdhp bf16 i8mm\nCPU part\t: 0xd40\n"


def cpuinfo(tmp_path, text):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return str(path)


# -----------------------------------------------------------------------------------------------------------------
# bf16 on a CPU


def test_native_dtype_is_read_from_the_cpuinfo_flags(tmp_path):
    old, new, arm = (speed.cpu_flags(cpuinfo(tmp_path, t)) for t in (X86_OLD, X86_BF16, ARM_BF16))
    assert "avx2" in old and "spectre_v1" not in old  # the flags line, not the bugs line
    assert not speed.native_dtype("bf16", old) and speed.native_dtype("fp32", old)
    assert speed.native_dtype("bf16", new) and speed.native_dtype("bf16", {"amx_bf16"})
    assert speed.native_dtype("bf16", arm) and speed.native_dtype("fp16", arm) and not speed.native_dtype("fp16", new)
    assert speed.cpu_model(cpuinfo(tmp_path, X86_BF16)) == "AMD EPYC"
    assert speed.auto_dtype(old) == "fp32" and speed.auto_dtype(new) == "bf16"


def test_guard_warns_on_a_cpu_without_native_bf16_and_only_there(capsys, monkeypatch):
    cpu = torch.device("cpu")
    assert speed.check_dtype("bf16", cpu, {"avx2", "fma"}) is True
    assert "--dtype fp32" in capsys.readouterr().out
    for dtype, flags, device in [("bf16", {"avx2", "avx512_bf16"}, cpu), ("fp32", {"avx2"}, cpu),
                                 ("bf16", {"avx2"}, torch.device("cuda"))]:
        assert speed.check_dtype(dtype, device, flags) is False
        assert capsys.readouterr().out == ""
    # the default flag source is the one the scripts use: swap it and the decision follows, both ways
    monkeypatch.setattr(speed, "cpu_flags", lambda: {"sse2", "avx2"})
    assert speed.check_dtype("bf16", cpu) is True and "WARNING" in capsys.readouterr().out
    monkeypatch.setattr(speed, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert speed.check_dtype("bf16", cpu) is False and capsys.readouterr().out == ""
