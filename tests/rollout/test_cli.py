"""``rollout`` CLI: engine flags reach the EngineConfig (and the pool's placement) unchanged; bad values are refused
by EngineConfig's own checks, naming the field."""
import argparse

import pytest

from rollout import cli


def engine_args(argv):
    p = argparse.ArgumentParser()
    cli._add_engine_args(p)
    return p.parse_args(argv)


def test_engine_flags_reach_the_config():
    args = engine_args(["--model", "m", "--device", "cuda", "--dtype", "bfloat16", "--fp32-lm-head",
                        "--gpu-memory-utilization", "0.4", "--max-num-seqs", "8", "--seed", "3"])
    config = cli._engine_config(args, host_kv_cache_bytes=1 << 20)
    assert (config.model, config.device, config.dtype, config.fp32_lm_head, config.gpu_memory_utilization,
            config.max_num_seqs, config.seed, config.host_kv_cache_bytes) == \
        ("m", "cuda", "bfloat16", True, 0.4, 8, 3, 1 << 20)
    assert cli._engine_config(engine_args([])).fp32_lm_head is False


def test_bad_engine_flag_is_refused_by_the_config():
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        cli._engine_config(engine_args(["--gpu-memory-utilization", "1.5"]))


@pytest.mark.parametrize("flags, message", [
    (["--chat-template", "{missing}"], "--chat-template: cannot read"),
    (["--chat-template", "{empty}"], "is empty"),
    (["--http-session-ttl", "0"], "SessionConfig.ttl_s"),
    (["--http-max-sessions", "0"], "SessionConfig.max_conversations"),
])
def test_bad_http_session_flags_are_refused_before_the_model_loads(tmp_path, capsys, flags, message):
    (tmp_path / "empty.jinja").write_text("  \n")
    flags = [f.format(missing=tmp_path / "missing.jinja", empty=tmp_path / "empty.jinja") for f in flags]
    rc = cli.main(["serve", "--model", str(tmp_path / "no-model-here"), "--local", "--http", "127.0.0.1:0", *flags])
    assert rc == 2 and message in capsys.readouterr().err
