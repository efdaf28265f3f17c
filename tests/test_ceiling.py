"""The machine's ceiling (rlcourse.ceiling) is measured and reported, and the floors follow from it: no timing is
asserted, only that the numbers are there and consistent with each other."""

import torch

from rlcourse.ceiling import SMOLLM2_PARAMS, Ceiling, measure


def test_measure_reports_each_dtype_and_the_bandwidth():
    ceiling = measure(dtypes=(torch.float32, torch.bfloat16), tokens=16, megabytes=4, repeats=1)
    assert set(ceiling.matmul_gflops) == {"float32", "bfloat16"}
    assert all(g > 0 for g in ceiling.matmul_gflops.values()) and ceiling.bandwidth_gbs > 0
    text = ceiling.describe()
    assert "float32" in text and "bfloat16" in text and ceiling.hardware in text and "GB/s" in text


def test_floors_follow_from_the_rates():
    ceiling = Ceiling(hardware="test", threads=2, matmul_gflops={"float32": 100.0}, bandwidth_gbs=50.0)
    assert ceiling.forward_seconds(1000) == 2 * SMOLLM2_PARAMS * 1000 / 100e9  # 2·P·T FLOPs at 100 GFLOP/s
    assert ceiling.forward_seconds(2000) == 2 * ceiling.forward_seconds(1000)
    assert ceiling.decode_seconds(4) == SMOLLM2_PARAMS * 4 / 50e9  # every fp32 weight read once
    assert ceiling.decode_seconds(0.5) == ceiling.decode_seconds(4) / 8
