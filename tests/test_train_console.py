"""What ``segtrain train --no-progress`` prints: its own lines only (DeepSpeed's and megatron's messages go to OUT/logs),
among them where the run starts: a new run, or the step and checkpoint it resumes."""

import importlib.util
import re

import pytest
from train_runs import train, write_config

OWN_LINE = re.compile(r"^(segtrain train: |trained to step \d+: loss )")


def console_lines(run) -> list[str]:
    return [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]


@pytest.mark.slow
def test_the_console_shows_segtrains_lines_and_the_log_file_the_libraries(tmp_path, corpus):
    config = write_config(tmp_path, corpus, steps=3, save_every=2)
    out = tmp_path / "run"

    first = train(config, "--resume", "auto", "--stop-at", "2")
    lines = console_lines(first)
    assert all(OWN_LINE.match(line) for line in lines), lines
    assert first.stderr.splitlines()[0] == (
        f"segtrain train: --resume auto: no checkpoint in {out / 'checkpoints'}, so a new run in {out} "
        f"(library logs: {out / 'logs'})"
    )
    log = (out / "logs/rank0.log").read_text()
    assert "DeepSpeed: Attempting to get learning rate from scheduler before it has started" in log
    if importlib.util.find_spec("transformer_engine") is None:
        assert "megatron: " in log and "Transformer Engine and Apex are not installed" in log

    second = train(config, "--resume", "auto")
    lines = console_lines(second)
    assert all(OWN_LINE.match(line) for line in lines), lines
    assert second.stderr.splitlines()[0] == (
        f"segtrain train: resuming from step 2: {out / 'checkpoints/step_00000002'} (library logs: {out / 'logs'})"
    )
    assert second.stdout.splitlines()[-1].startswith("trained to step 3: ")
    resumed_log = (out / "logs/rank0.log").read_text()
    assert resumed_log.startswith(log) and resumed_log.count("Attempting to get learning rate") == 2  # appended
