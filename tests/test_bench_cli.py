"""`meshweave bench` (issue 14 item 4): argument handling, and `bench scaling --quick` end to end.

The end-to-end test checks that what the study prints comes from its own run: the JSON keeps every raw
step time (per rank) and ledger, and the printed step times, speed-ups, efficiencies and bytes recompute
from them; the bytes per dimension equal the analytic formula exactly.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from meshweave.launch import bench_cli
from meshweave.launch.cli import main

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_scaling_model as model  # noqa: E402


def test_every_subcommand_names_an_existing_script_with_a_quick_setting():
    for name, (script, takes_out) in bench_cli.SCRIPTS.items():
        text = (REPO / "benchmarks" / script).read_text()
        assert '"--quick"' in text, name
        assert ('"--out"' in text) == takes_out or bench_cli.OUT_ENV in text, name


def test_quick_and_out_are_mapped_per_script(tmp_path):
    quick, out, passed = bench_cli.split_bench_args(["--quick", "--out", str(tmp_path), "--reps", "2"])
    assert (quick, out, passed) == (True, str(tmp_path), ["--reps", "2"])
    cmd = bench_cli.bench_command("pipeline", REPO / "benchmarks", True, tmp_path, ["--x"])
    assert cmd[1:] == [str(REPO / "benchmarks" / "bench_pipeline.py"), "--quick", "--out", str(tmp_path), "--x"]
    cmd = bench_cli.bench_command("dsp", REPO / "benchmarks", False, tmp_path, [])
    assert cmd[1:] == [str(REPO / "benchmarks" / "bench_dsp.py")]  # no --out: the results dir goes by environment


@pytest.mark.parametrize("argv,message", [
    (["bench"], "the following arguments are required: name"),
    (["bench", "nosuch"], "invalid choice: 'nosuch'"),
    (["bench", "scaling", "--out"], "--out needs a directory"),
    (["bench", "scaling", "--out", "--quick"], "--out needs a directory"),
])
def test_argument_errors_are_one_line_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        status = main(argv)
        raise SystemExit(status)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["bench", "scaling", "--quick", "--out", str(target)]) == 3
    assert "is not a directory" in capsys.readouterr().err


def test_installed_wheel_without_benchmarks_says_so(monkeypatch, capsys):
    monkeypatch.setattr(bench_cli, "benchmarks_dir", lambda: None)
    assert main(["bench", "scaling", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "benchmarks/ directory of a source checkout" in err


def _printed_rows(stdout: str) -> list[list[str]]:
    """The measured table's rows, as cells."""
    table = stdout.split("| layout | mode | procs |", 1)[1].split("\n\n", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:] if line.startswith("|")]


@pytest.mark.slow
def test_scaling_quick_writes_three_files_and_its_ratios_come_from_the_run(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "meshweave", "bench", "scaling", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name, label in (("scaling.md", "Markdown"), ("scaling.json", "JSON"), ("scaling.png", "PNG")):
        assert (out / name).is_file()
        assert re.search(rf"{label}: .*{re.escape(str(out / name))}", proc.stdout), proc.stdout[-2000:]
    report = json.loads((out / "scaling.json").read_text())
    rows = report["rows"]
    keys = {(r["key"], r["mode"]) for r in rows}
    assert {("dp2", "strong"), ("tp2", "weak"), ("sp2", "strong"), ("pp2", "weak"), ("1", "strong")} <= keys
    base = {r["mode"]: r for r in rows if r["world"] == 1}
    printed = _printed_rows(proc.stdout)
    i = 0
    for r in rows:
        # raw timings: a step is its slowest rank; the reported step time is the best such step
        assert r["step_times"] == [max(ts) for ts in zip(*r["rank_times"])]
        assert r["step_s"] == min(r["step_times"])
        b = base[r["mode"]]
        speedup = (r["tokens"] / r["step_s"]) / (b["tokens"] / b["step_s"])
        assert r["speedup"] == pytest.approx(speedup) and r["efficiency"] == pytest.approx(speedup / r["world"])
        assert r["cpu_step_times"] == [max(ts) for ts in zip(*r["rank_cpu"])] and r["cpu_step_s"] == min(r["cpu_step_times"])
        cpu_speedup = (r["tokens"] / r["cpu_step_s"]) / (b["tokens"] / b["cpu_step_s"])
        assert r["cpu_efficiency"] == pytest.approx(cpu_speedup / r["world"])
        steps = len(r["step_times"])
        for rank, (ledger, info) in enumerate(zip(r["ledgers"], r["infos"])):
            measured = model.bytes_by_dim(ledger, steps)
            assert measured == r["bytes"][rank]
            analytic = model.analytic_bytes(info, r["degrees"])
            assert analytic == r["bytes_analytic"][rank]
            for dim, degree in r["degrees"].items():
                assert measured[dim] > 0 and measured[dim] == analytic[dim], (r["key"], dim, rank)
        # what was printed is these numbers
        dims = [d for d in model.DIMS if r["degrees"].get(d, 1) > 1] or ["-"]
        for d in dims:
            cells = printed[i]
            i += 1
            assert float(cells[3]) == pytest.approx(r["step_s"] * 1e3, abs=0.051)
            assert float(cells[5]) == pytest.approx(r["speedup"], abs=0.0051)
            assert float(cells[6]) == pytest.approx(r["efficiency"], abs=0.0051)
            assert float(cells[7]) == pytest.approx(r["cpu_step_s"] * 1e3, abs=0.051)
            assert float(cells[8]) == pytest.approx(r["cpu_efficiency"], abs=0.0051)
            if d != "-":
                assert float(cells[10]) == pytest.approx(max(x[d] for x in r["bytes"]) / 1e6, abs=0.00051)
                assert cells[12] == "1.000"
    # the projection is labelled and recomputes from the run's ledger and the stated inputs
    assert "projected" in proc.stdout and "Inputs: measured compute time per token" in proc.stdout
    cluster = model.Cluster(**report["cluster"])
    for lay, r in zip(report["projection"]["layouts"], rows):
        comm = max(model.projected_comm_seconds(ledger, len(r["step_times"]), r["degrees"], r["world"], cluster)
                   for ledger in r["ledgers"])
        assert lay["comm_s"] == pytest.approx(comm)
