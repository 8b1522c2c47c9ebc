"""DeepSpeed workarounds: no shm op build on CPU; build locks of killed builds do not hang a start."""

import os
import subprocess
import sys

from train_runs import ENV, ROOT

from segtrain.compat.deepspeed import clear_stale_build_locks


def test_a_lock_nobody_holds_is_removed_and_a_held_one_is_kept(tmp_path, capsys):
    for op in ("cpu_adam", "fused_adam"):
        (tmp_path / op).mkdir()
        (tmp_path / op / "lock").touch()
    held = os.open(tmp_path / "fused_adam/lock", os.O_RDONLY)  # a build in progress keeps its lock open
    try:
        assert clear_stale_build_locks([tmp_path]) == [tmp_path / "cpu_adam/lock"]
    finally:
        os.close(held)
    assert (tmp_path / "fused_adam/lock").exists() and not (tmp_path / "cpu_adam/lock").exists()
    assert "cpu_adam op was killed half way" in capsys.readouterr().err


def test_cpu_training_builds_no_shm_comm_op(tmp_path):
    code = (
        "from segtrain.parallel.groups import setup\nsetup('cpu')\n"
        "from deepspeed.comm import comm\nassert comm.cdb.shm_comm_op is None, comm.cdb.shm_comm_op\n"
    )
    env = {**ENV, "TORCH_EXTENSIONS_DIR": os.fspath(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "shm_comm" not in result.stdout and not any(tmp_path.iterdir())  # nothing built
