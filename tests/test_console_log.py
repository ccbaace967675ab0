"""The training console line: a smoothed speed and time left that one slow window does not swing."""
import re

import pytest

from musiclm_jax.metrics_writer import ConsoleLog, format_duration


def _etas(capsys, rates, total=10_000, log_period=1):
    console = ConsoleLog(total)
    for i, rate in enumerate(rates, 1):
        console(i * log_period, {"loss": 1.0, "steps_per_sec": rate})
    lines = capsys.readouterr().out.splitlines()
    etas = []
    for line in lines:
        match = re.search(r"eta (?:(\d+)d )?(\d+):(\d\d):(\d\d)", line)
        days, h, m, s = (int(g or 0) for g in match.groups())
        etas.append(((days * 24 + h) * 60 + m) * 60 + s)
    return etas, lines


def test_one_slow_window_barely_moves_the_time_left(capsys):
    # The first window holds the compilation (0.05 steps/s); then 10 steps/s with a checkpoint stall at step 30.
    rates = [0.05] + [10.0] * 28 + [0.2] + [10.0] * 10
    etas, lines = _etas(capsys, rates)
    steady = (10_000 - 29) / 10.0
    assert etas[1] == pytest.approx((10_000 - 2) / 10.0, abs=1)  # the compile window is dropped at once
    assert etas[28] == pytest.approx(steady, abs=2)
    # The raw rate would say (10000 - 30) / 0.2 s, about 14 hours; the smoothed one moves by half.
    assert etas[29] < 1.6 * steady and etas[-1] < 1.5 * steady
    assert "10.00 steps/s" in lines[28]


def test_the_average_follows_a_lasting_change_of_speed(capsys):
    etas, _ = _etas(capsys, [1.0] + [4.0] * 5 + [2.0] * 40, total=100_000, log_period=20)
    # After 800 steps at 2 steps/s (8 time constants of 100 steps) the estimate is that speed's.
    assert etas[-1] == pytest.approx((100_000 - 920) / 2.0, rel=0.01)


def test_format_duration_counts_days():
    assert format_duration(59) == "0:00:59" and format_duration(3 * 3600 + 61) == "3:01:01"
    assert format_duration(2 * 86400 + 7200) == "2d 2:00:00"
