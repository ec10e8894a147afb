"""benchmarks/ncu_summary.py on a small made-up profile: metrics, stall shares, phases and the cold share."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "ncu_summary.py"

DETAILS = """  spqr_octet_split (132, 1, 1)x(512, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    ----------------------- ----------- ------------
    Metric Name             Metric Unit Metric Value
    ----------------------- ----------- ------------
    Duration                         us        35.46
    Compute (SM) Throughput           %        43.78
    Section: Launch Statistics
    Block Size                                                   64
    Grid Size                                                     2
    Registers Per Thread             register/thread             120
    Duration                         us        99.99
"""

HEADER = (
    '"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed","stall_wait","stall_long_sb",'
    '"stall_wait (Not Issued)"'
)
# 4 warps launched (2 blocks of 64 threads): an instruction run 16 times or less is cold
SASS = [
    ("0x0", "LDC R1, c[0x0][0x28]", 10, 4, 2, 8),
    ("0x10", "BAR.SYNC.DEFER_BLOCKING 0x0", 0, 4, 0, 0),
    ("0x20", "@P0 LDS R2, [R3]", 30, 400, 30, 0),
    ("0x30", "HMMA.16816.F32 R4, R8, R12, R4", 60, 400, 20, 40),
]


def _load():
    spec = importlib.util.spec_from_file_location("ncu_summary", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def profile(tmp_path):
    (tmp_path / "k_details.txt").write_text(DETAILS)
    rows = [f'"{a}","{s}","{p}","{i}","{w}","{lsb}","0"' for a, s, p, i, w, lsb in SASS]
    (tmp_path / "k_sass.csv").write_text('"Kernel Name","spqr_octet_split",\n' + "\n".join([HEADER, *rows]) + "\n")
    return tmp_path


def test_details_takes_the_first_value_of_each_metric(profile):
    det = _load().details(profile / "k_details.txt")
    assert det["Duration"] == "35.46 us"  # not the later 99.99
    assert det["Grid Size"] == "2" and det["Block Size"] == "64"
    assert det["Registers Per Thread"] == "120 register/thread"


def test_summary_shares(profile):
    text = _load().summary(profile, "k")
    assert "| Duration | 35.46 us |" in text
    # 100 samples: wait 52, long_sb 48 (the "Not Issued" column is left out)
    assert "wait 52.0%, long_sb 48.0%" in text
    # opcodes by instructions: LDS and HMMA 400 of 808 each; the predicate does not hide the opcode
    assert "LDS 49.5/30.0" in text and "HMMA 49.5/60.0" in text
    # the barrier at line 1 splits the samples 10 | 90
    assert "0-1: 10.0%, 1-4: 90.0%" in text
    assert "4 warps): 10.0% of the stall samples" in text
