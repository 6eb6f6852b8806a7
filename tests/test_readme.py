"""The front page keeps its promises: every command in the code blocks of README.md (and of
benchmarks/RESULTS.md, which holds the commands behind each figure) exists and accepts the
arguments shown; the results table is what benchmarks/report.py writes from the committed JSON;
the README stays a front page (at most 12,000 bytes).

The commands are checked in this process, not in subprocesses: a `python -m ...` subprocess
would import torch again (2-7 s each on the 2-core CI machine), while here a command costs
only its own module. Each project command runs as `__main__` twice: with `--help` appended
(the command exists, its module imports, its parser builds: exit status 0), then, when it parses
with argparse, with the arguments the page shows, stopped right after argparse accepts them
(an unknown option or a bad value fails). A `make` target is checked with `make -n` (it exists
and its recipe expands), and the project's Python commands in its recipe as above. Other
programs (`torchrun`, `python -m pytest`) must be installed.
"""
import argparse
import importlib.util
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import warnings

import pytest

from helpers import REPO, load_script

PAGES = ("README.md", "benchmarks/RESULTS.md")
PYTHON = re.compile(r"python(\d(\.\d+)?)?$")
ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
report = load_script("benchmarks/report.py", "benchmarks_report")


def page_commands(text):
    """Each command line of the page's bash code blocks, comments and environment settings kept,
    and each inline code span of the prose that starts with python, torchrun or make."""
    commands = []
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, re.M | re.S):
        commands += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        first = (words(span.replace("\n", " ")) or [""])[0]
        if PYTHON.match(first) or first in ("torchrun", "make"):
            commands.append(span.replace("\n", " "))
    return commands


def words(command):
    """The command's words without its comment and leading VAR=value settings."""
    tokens = shlex.split(command, comments=True)
    while tokens and ENV.match(tokens[0]):
        tokens.pop(0)
    return tokens


class Parsed(Exception):
    """argparse accepted the command line: stop before the program does any work."""


def run_main(kind, target, argv, parse_only):
    """Run a project command's __main__ here with argv. Returns (exit status, whether it parsed
    its arguments with argparse). Environment, sys.path and sys.argv are restored after."""
    used = []
    parse_args = argparse.ArgumentParser.parse_args

    def checked(self, args=None, namespace=None):
        used.append(True)
        parsed = parse_args(self, args, namespace)  # argparse exits 2 on a bad option, 0 on --help
        if parse_only:
            raise Parsed
        return parsed

    saved = dict(os.environ), list(sys.path), sys.argv, os.getcwd()
    argparse.ArgumentParser.parse_args = checked
    sys.argv = [target, *argv]
    try:
        os.chdir(REPO)  # setup.py reads README.md relative to the working directory
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "'bilstm_fast.*' found in sys.modules", RuntimeWarning)
            if kind == "module":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(REPO / target), run_name="__main__")
        status = 0
    except Parsed:
        status = 0
    except SystemExit as exc:
        status = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    finally:
        argparse.ArgumentParser.parse_args = parse_args
        os.environ.clear()
        os.environ.update(saved[0])
        sys.path[:], sys.argv = saved[1], saved[2]
        os.chdir(saved[3])
    return status, bool(used)


def python_problems(tokens):
    """tokens: what follows `python` (or torchrun's options). Problems found, [] if none."""
    if tokens[0] == "-m":
        kind, target, argv = "module", tokens[1], tokens[2:]
        if not installed(target):
            return [f"no module {target}"]
        if not target.startswith(("bilstm_fast", "benchmarks")):  # another project's tool: installed is enough
            return []
    else:
        kind, target, argv = "path", tokens[0], tokens[1:]
        if not (REPO / target).is_file():
            return [f"no file {target}"]
    status, argparse_used = run_main(kind, target, [*argv, "--help"], parse_only=False)
    if status != 0:
        return [f"{target} --help exits with status {status}"]
    if argparse_used and run_main(kind, target, argv, parse_only=True)[0] != 0:
        return [f"{target} does not accept {' '.join(argv)}"]
    return []


def installed(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def command_problems(command):
    """What is wrong with one command line of a page: [] when it exists and parses."""
    tokens = words(command)
    program = tokens[0]
    if PYTHON.match(os.path.basename(program)):
        return python_problems(tokens[1:])
    if program == "torchrun":  # torch's launcher: the console script of torch.distributed.run
        if not installed("torch.distributed.run"):
            return ["torchrun is not installed"]
        return python_problems(tokens[tokens.index("-m"):])
    if program == "bash":
        checked = subprocess.run(["bash", "-n", str(REPO / tokens[1])], capture_output=True, text=True)
        return [] if checked.returncode == 0 else [f"bash -n {tokens[1]}: {checked.stderr.strip()}"]
    if program == "make":
        dry = subprocess.run(["make", "-n", "-C", str(REPO), *tokens[1:]], capture_output=True, text=True, timeout=60)
        if dry.returncode != 0:
            return [f"make -n {' '.join(tokens[1:])}: {dry.stderr.strip()}"]
        return [problem for line in dry.stdout.splitlines() for problem in recipe_problems(line)]
    return [] if shutil.which(program) else [f"{program} is not installed"]


def recipe_problems(line):
    """A recipe line of `make -n`: the project's own Python commands and scripts are checked."""
    try:
        tokens = words(line)
    except ValueError:  # a shell construct shlex cannot split (the set-up's `if`): not a command of ours
        return []
    project = len(tokens) > 2 and tokens[1] == "-m" and tokens[2].startswith(("bilstm_fast", "benchmarks")) or (
        len(tokens) > 1 and tokens[1].startswith("benchmarks/"))
    if tokens and (PYTHON.match(os.path.basename(tokens[0])) and project or tokens[0] == "bash"):
        return command_problems(shlex.join(tokens))
    return []


COMMANDS = sorted({(page, command) for page in PAGES
                   for command in page_commands((REPO / page).read_text(encoding="utf-8"))})


@pytest.mark.parametrize("page, command", COMMANDS, ids=[f"{p}: {c[:60]}" for p, c in COMMANDS])
def test_page_command_exists_and_parses(page, command, capsys):
    assert command_problems(command) == []


def test_the_command_check_catches_what_it_should():
    """A page naming a missing module, option, file or make target fails the check."""
    assert command_problems("python -m bilstm_fast.apps.no_such_app --epochs 1")
    assert command_problems("python -m bilstm_fast.apps.train_mnist --no-such-option")
    assert command_problems("python -m bilstm_fast.apps.train_mnist --impl no-such-impl")
    assert command_problems("python benchmarks/no_such_script.py")
    assert command_problems("make no-such-target")
    assert command_problems("torchrun --nproc_per_node 2 -m bilstm_fast.apps.textgen --no-such-option")
    assert not command_problems("OMP_NUM_THREADS=1 python -m bilstm_fast.apps.textgen --epochs 2  # comment")
    assert len(COMMANDS) >= 10 and {" ".join(words(c)) for _, c in COMMANDS} >= {"make test", "make mnist"}


def test_readme_is_a_front_page():
    """Issue 28: a README a newcomer reads in five minutes. Detail goes to benchmarks/RESULTS.md."""
    assert (REPO / "README.md").stat().st_size <= 12_000


def test_results_table_is_what_report_writes():
    """The README's table equals `python benchmarks/report.py --readme` on the committed JSON:
    a new run listed in README_SOURCES, or an edited table, fails here until regenerated."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = report.readme_table([report.RESULTS / name for name in report.README_SOURCES])
    assert report.replace_block(readme, table) == readme


def fake_run(path, machine, date, allocator, rows):
    result = {"machine": {"device": "cpu", "cpu": machine, "cpu_cores": 2, "native": "AVX-512", "torch": "2.14",
                          "nn_lstm_engine": "oneDNN", "torch_threads": 2, "date": date, "allocator": allocator},
              "command": "benchmarks/run.py --shapes mnist", "rows": [], "mnist": None}
    for dtype, mode, paired in rows:
        result["rows"].append({"impl": "fast-native", "mode": mode, "shape": "mnist", "variant": "",
                               "shape_label": "mnist (B64)", "dtype": dtype, "correct": True,
                               "speedup_vs_nn_lstm": 9.0, "paired_speedup_vs_nn_lstm": paired})
    path.write_text(json.dumps(result))
    return path


def test_table_groups_runs_by_machine_and_shows_what_differs(tmp_path):
    """Rows of another machine and precision (bf16 next to fp32) get their own table under a line
    naming the machine; two allocators on one machine get a column. Ratios are time over
    nn.LSTM's time: the inverse of the paired speedup, which wins over the plain one."""
    runs = [fake_run(tmp_path / "a.json", "CPU A", "2026-12-02T01", "glibc malloc, defaults",
                     [("fp32", "training", 1.25), ("fp32", "inference", 0.8)]),
            fake_run(tmp_path / "b.json", "CPU A", "2026-12-02T02",
                     "glibc malloc (glibc.malloc.trim_threshold=1)", [("fp32", "training", 2.0)]),
            fake_run(tmp_path / "c.json", "CPU B", "2026-12-10T00", "glibc malloc, defaults",
                     [("bf16", "training", 4.0), ("bf16", "inference", 0.5)])]
    text = report.readme_table(runs, link=lambda p: p.name)
    a, b = text.index("**CPU A,"), text.index("**CPU B,")
    assert a < b and "measured 2026-12-02" in text[a:b] and "measured 2026-12-10" in text[b:]
    assert "| mnist (B64) | fp32 | glibc defaults | 0.80 | 1.25 |" in text[a:b]
    assert "| mnist (B64) | fp32 | glibc no-trim | 0.50 | - |" in text[a:b]
    assert "`GLIBC_TUNABLES=glibc.malloc.trim_threshold=1`" in text[a:b]
    assert "| mnist (B64) | bf16 | 0.25 | 2.00 |" in text[b:]
