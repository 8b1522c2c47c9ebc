"""Library messages go to the run's log file: DeepSpeed's and megatron's loggers and the warnings raised in their files;
segtrain's own warnings and other packages' stay on the console, and errors reach both."""

import logging
import os
import warnings

import pytest

from segtrain.train.library_log import library_log


def _megatron_file() -> str:
    import importlib.util

    spec = importlib.util.find_spec("megatron")
    if spec is None:
        pytest.skip("megatron-core is not installed")
    return os.path.join(next(iter(spec.submodule_search_locations)), "core", "some_module.py")


def test_library_messages_wait_for_the_file_and_the_rest_stays_on_the_console(tmp_path, capsys):
    megatron_file = _megatron_file()
    from segtrain.compat.deepspeed import deepspeed_logger

    handlers = list(deepspeed_logger().handlers)  # its stdout handler
    with warnings.catch_warnings(record=True) as shown:  # what reaches Python's own display (the console)
        warnings.simplefilter("always")
        with library_log() as log:
            warnings.warn_explicit("Apex is not installed", UserWarning, megatron_file, 21)
            logging.getLogger("DeepSpeed").warning("Attempting to get learning rate")
            logging.getLogger("megatron.core.datasets").warning("building the index")
            assert len(log.pending) == 3
            log.open(tmp_path / "logs" / "rank0.log", append=False)
            logging.getLogger("torch.distributed.c10d").error("a peer left")
            warnings.warn_explicit("segtrain's own warning", UserWarning, __file__, 1)  # from a file of no library: the console's
    out, err = capsys.readouterr()
    text = (tmp_path / "logs" / "rank0.log").read_text()
    for line in ("Apex is not installed", "Attempting to get learning rate", "building the index", "a peer left"):
        assert line in text
    assert "megatron: " in text and "DeepSpeed: " in text
    assert [str(w.message) for w in shown] == ["segtrain's own warning"] and "own warning" not in text
    assert "torch.distributed.c10d: error: a peer left" in err  # errors still reach the console
    for line in ("Apex", "learning rate", "building the index"):
        assert line not in out + err
    assert handlers and logging.getLogger("DeepSpeed").handlers == handlers  # restored
    assert logging.getLogger("megatron").propagate


def test_a_resumed_run_appends_and_a_crash_before_the_file_prints_what_waited(tmp_path, capsys):
    path = tmp_path / "rank0.log"
    path.write_text("earlier run\n")
    with library_log() as log:
        log.open(path, append=True)
        logging.getLogger("DeepSpeed").warning("second run")
    assert path.read_text().splitlines()[0] == "earlier run" and "second run" in path.read_text()

    with pytest.raises(RuntimeError), library_log():
        logging.getLogger("DeepSpeed").warning("what the engine said before it failed")
        raise RuntimeError("engine failed")
    assert "what the engine said before it failed" in capsys.readouterr().err


def test_a_config_mistake_drops_what_waited(capsys):
    from segtrain.config import ConfigError

    with pytest.raises(ConfigError), library_log():
        logging.getLogger("DeepSpeed").warning("chatter")
        raise ConfigError("steps: must be positive")
    assert "chatter" not in capsys.readouterr().err
