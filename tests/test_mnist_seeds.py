"""benchmarks/mnist_seeds.py: the statistics that decide MNIST parity over seeds, and the sweep's plumbing."""
import json
import math
import os
import subprocess
import sys

import pytest

from helpers import REPO, load_script

SEEDS_PY = REPO / "benchmarks" / "mnist_seeds.py"
mnist_seeds = load_script("benchmarks/mnist_seeds.py", "benchmarks_mnist_seeds")


def last_epoch(test_accuracy, train_loss):
    return {"train_loss": train_loss, "train_accuracy": 98.0, "test_loss": 0.05, "test_accuracy": test_accuracy}


def runs_with_gaps(gaps, base=98.0, rel=2e-5):
    return [{"seed": i, "torch": base, "fast": base + g, "torch+1ulp": base - g / 2,
             "first_steps_rel_diff": rel, "first_steps_rel_diff_control": rel, "first_steps_rel_tol": 1e-4,
             "last_epoch": {"torch": last_epoch(base, 0.06), "fast": last_epoch(base + g, 0.06 + i / 1000),
                            "torch+1ulp": last_epoch(base - g / 2, 0.06)}}
            for i, g in enumerate(gaps)]


def test_interval_is_the_student_t_90_percent_interval():
    # gaps 0.1, -0.1, 0, 0.2, -0.2: mean 0, sample sd sqrt(0.1/4), t(0.95, 4) = 2.132
    mean, half = mnist_seeds.interval([0.1, -0.1, 0.0, 0.2, -0.2])
    assert mean == pytest.approx(0.0, abs=1e-15)
    assert half == pytest.approx(2.132 * math.sqrt(0.1 / 4) / math.sqrt(5), rel=1e-12)
    assert mnist_seeds.interval([0.4]) == (0.4, None)


def test_scattered_gaps_around_zero_agree():
    summary = mnist_seeds.summarize(runs_with_gaps([0.1, -0.1, 0.0, 0.2, -0.2]), 0.3)
    assert summary["agree"] and summary["accuracy_agrees"] and summary["early_steps_agree"]
    assert summary["gap_fast"]["max_abs"] == pytest.approx(0.2)
    assert summary["gap_torch+1ulp"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert summary["single_run_passes"] == {"fast": 5, "torch+1ulp": 5}


def test_side_gaps_are_paired_per_metric():
    summary = mnist_seeds.summarize(runs_with_gaps([0.1, -0.1, 0.0, 0.2, -0.2]), 0.3)
    train_loss = summary["side_gaps"]["train_loss"]  # fast's train loss gaps 0, 1e-3, ..., 4e-3
    assert train_loss["fast"]["mean"] == pytest.approx(2e-3, rel=1e-9)
    assert train_loss["fast"]["ci90_half_width"] == pytest.approx(2.132 * math.sqrt(2.5e-6) / math.sqrt(5), rel=1e-9)
    assert train_loss["torch+1ulp"] == {"mean": 0.0, "ci90_half_width": 0.0}
    assert summary["side_gaps"]["test_loss"]["fast"]["mean"] == 0.0


def test_first_steps_ratio_is_paired_in_log10():
    runs = runs_with_gaps([0.1, -0.1])
    runs[0]["first_steps_rel_diff"], runs[0]["first_steps_rel_diff_control"] = 1e-3, 1e-5  # +2
    runs[1]["first_steps_rel_diff"], runs[1]["first_steps_rel_diff_control"] = 1e-6, 1e-5  # -1
    ratio = mnist_seeds.summarize(runs, 0.3)["first_steps_log10_ratio"]
    assert ratio["mean"] == pytest.approx(0.5, rel=1e-12)
    assert ratio["ci90_half_width"] == pytest.approx(6.314 * math.sqrt(4.5) / math.sqrt(2), rel=1e-12)
    runs[0]["first_steps_rel_diff"] = runs[0]["first_steps_rel_diff_control"] = 0.0  # twins that never drifted
    runs[1]["first_steps_rel_diff_control"] = 0.0
    ratio = mnist_seeds.summarize(runs, 0.3)["first_steps_log10_ratio"]
    assert ratio["mean"] == pytest.approx((0 + (-6 - math.log10(2.0 ** -24))) / 2, rel=1e-12)


def test_single_run_passes_count_both_conditions():
    runs = runs_with_gaps([0.1, -0.35, 0.0, 0.2])  # control gaps: -0.05, 0.175, 0, -0.1
    runs[2]["first_steps_rel_diff"] = 2e-4  # fast off early at seed 2
    runs[3]["first_steps_rel_diff_control"] = 3e-4  # the control off early at seed 3
    assert mnist_seeds.summarize(runs, 0.3)["single_run_passes"] == {"fast": 2, "torch+1ulp": 3}


@pytest.mark.parametrize("gaps, why", [
    ([-0.41], "one seed has no interval"),
    ([-0.35, -0.32, -0.38, -0.33], "a consistent deficit past the bound"),
    ([-0.25, -0.3, -0.15, -0.28], "mean inside, interval reaching past -0.3"),
    ([0.6, -0.6, 0.5, -0.5], "too noisy to tell"),
])
def test_gaps_not_shown_inside_the_bound_disagree(gaps, why):
    summary = mnist_seeds.summarize(runs_with_gaps(gaps), 0.3)
    assert not summary["agree"], why


@pytest.mark.parametrize("fast, control, agree", [
    (2e-4, 2e-5, False),  # over the tolerance where rounding alone stays under it
    (2e-4, 1e-4, False),
    (5e-4, 1.4e-3, True),  # rounding alone drifts past the tolerance at this seed, and further
    (2e-3, 1.4e-3, False),
])
def test_first_steps_within_tolerance_or_the_controls_drift(fast, control, agree):
    runs = runs_with_gaps([0.1, -0.1, 0.0, 0.2, -0.2])
    runs[3]["first_steps_rel_diff"], runs[3]["first_steps_rel_diff_control"] = fast, control
    summary = mnist_seeds.summarize(runs, 0.3)
    assert summary["accuracy_agrees"] and summary["early_steps_agree"] == agree == summary["agree"]


@pytest.mark.slow
def test_sweep_runs_each_seed_once_and_resumes(tmp_path):
    """Two tiny seeds through train_mnist --compare --control, then a rerun that trains nothing."""
    tiny = ["--", "--device", "cpu", "--hidden-size", "16", "--limit", "256", "--test-limit", "200",
            "--epochs", "1"]
    command = [sys.executable, str(SEEDS_PY), "--seeds", "3", "5", "--jobs", "2", "--out", str(tmp_path), *tiny]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == [3, 5]
    for run, seed in zip(summary["runs"], (3, 5)):
        result = json.loads((tmp_path / f"seed{seed}" / "mnist_compare_cpu.json").read_text())
        assert result["hyperparameters"]["seed"] == seed
        assert run["fast"] == result["final_test_accuracy"]["fast"]
        assert run["first_steps_rel_diff"] <= 1e-4  # 4 steps of fp32 twins stay within rounding
    assert "seed  " in first.stdout and "90% interval" in first.stdout and "train_loss" in first.stdout
    last_epochs = [json.loads((tmp_path / f"seed{seed}" / "mnist_compare_cpu.json").read_text())["epochs"][-1]
                   for seed in (3, 5)]
    for metric in mnist_seeds.SIDE_METRICS:
        gap = summary["side_gaps"][metric]["fast"]["mean"]
        expected = sum(r["fast"][metric] - r["torch"][metric] for r in last_epochs) / 2
        assert gap == pytest.approx(expected, rel=1e-12, abs=1e-15)
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("already done, kept") == 2
