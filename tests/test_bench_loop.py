"""``tools/bench_loop.py``: the loop part runs ``segtrain train`` and reads its phases back; the summary is per
sequence; the table compares both runs per token. The whole tool (the bench part needs CUDA) runs under ``-m gpu``."""

import json
from pathlib import Path

import pytest
from tool_scripts import load_tool
from train_runs import ENV, write_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_loop_part_runs_the_real_command_and_every_step_is_logged_with_its_phases(tmp_path, corpus, monkeypatch):
    bench = load_tool("bench_loop")
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    config = write_config(tmp_path, corpus, steps=1000, save_every=1)  # the tool's --set overrides both
    args = bench.parse_args(["--config", str(config), "--steps", "3", "--warmup", "1", "--out", str(tmp_path / "out")])
    args.out.mkdir()
    rows = bench.run_loop(args, tmp_path / "work")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert not list((tmp_path / "work/checkpoints").glob("step_0000000[1-3]"))  # only the last step saves
    summary = bench.loop_summary(rows, warmup=1, sequences_per_step=2)
    assert summary["steps"] == 3 and summary["tokens_per_s"] > 0 and summary["step_s_per_sequence"] > 0


def test_the_summary_is_per_sequence_after_the_warmup_and_the_table_per_token():
    bench = load_tool("bench_loop")
    phases = {"time_data_s": 0.2, "time_step_s": 4.0, "time_host_s": 0.02, "time_save_s": 0.0}
    rows = [{"step": 1, "tokens_per_s": 10.0, **phases, "time_step_s": 60.0}]  # the compiling step
    rows += [{"step": s, "tokens_per_s": 3900.0 + s, **phases, "peak_memory_gib": 9.5} for s in (2, 3, 4)]
    loop = bench.loop_summary(rows, warmup=1, sequences_per_step=4)
    assert loop["tokens_per_s"] == 3903.0 and loop["step_s_per_sequence"] == 1.0 and loop["data_s_per_sequence"] == 0.05
    assert loop["peak_memory_gib"] == 9.5 and loop["steps"] == 3
    result = {"gpu": "NVIDIA H100 80GB HBM3", "seq_length": 4096, "sequences_per_step": 4, "loop": loop,
              "bench": {"tokens_per_s": 4096.0, "step_s_per_sequence": 1.0, "peak_memory_gib": 8.0}}  # fmt: skip
    lines = bench.table(result)
    assert lines[0].startswith("NVIDIA H100 80GB HBM3; T=4096, 4 sequences")
    assert "| loop: segtrain train | 3,903 | 0.953 |" in lines[5]
    assert lines[-3] == "| loop: step | | | 1.0000 (100.0% of the bench's) | |"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "bench_loop: --steps must be at least 1, got 0"),
        (["--warmup", "-1"], "bench_loop: --warmup must be at least 0, got -1"),
        (["--set", "optim.lr=fast"], "bench_loop: error: optim.lr"),
        (["--set", "model.no_such_field=1"], "bench_loop: error: model.no_such_field"),
    ],
)
def test_a_bad_flag_or_field_stops_in_one_line_naming_it(tmp_path, corpus, flags, message):
    bench = load_tool("bench_loop")
    config = write_config(tmp_path, corpus)
    with pytest.raises(SystemExit) as stop:
        bench.main(["--config", str(config), "--out", str(tmp_path / "out"), *flags])
    assert str(stop.value).startswith(message) and "\n" not in str(stop.value), stop.value
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_the_whole_tool_on_a_tiny_config(tmp_path, corpus, capsys):
    bench = load_tool("bench_loop")
    config = write_config(tmp_path, corpus, parallel={"precision": "bf16"})
    out = tmp_path / "out"
    assert bench.main(["--config", str(config), "--steps", "3", "--warmup", "1", "--bench-steps", "2", "--out", str(out)]) == 0
    result = json.loads((out / "bench_loop.json").read_text())
    assert result["loop"]["tokens_per_s"] > 0 and result["bench"]["tokens_per_s"] > 0
    assert capsys.readouterr().out.splitlines()[0].startswith(result["gpu"])
