"""The `loupe` command line: every sub-command parses and dispatches; flags reach the config."""

from __future__ import annotations

import pytest

from cluster.cli import COMMANDS, _cluster_config, build_parser, main


def test_every_subcommand_has_help_and_a_handler(capsys) -> None:
    parser = build_parser()
    names = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert names == set(COMMANDS)
    for name in sorted(names):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([name, "--help"])
        assert exc.value.code == 0
        assert "usage: loupe" in capsys.readouterr().out


def test_cluster_flags_reach_the_config() -> None:
    args = build_parser().parse_args(
        ["search", "q.jpg", "--shards", "3", "--regions-per-image", "0", "--regional-from", "global", "--global-max-side", "256"]
    )
    cfg = _cluster_config(args)
    assert cfg.shards == 3 and cfg.regions_per_image == 0 and cfg.regional_from == "global" and cfg.global_max_side == 256
    assert cfg.regional_max_side() == 0


def test_bad_values_exit_2_with_the_field_named(capsys, tmp_path) -> None:
    img = tmp_path / "q.jpg"
    img.write_bytes(b"not decoded before the options are checked")
    assert main(["search", str(img), "--rerank", "verify,bogus"]) == 2
    assert "loupe search: rerank: unknown stage 'bogus'" in capsys.readouterr().err
    assert main(["index", str(tmp_path / "missing")]) == 2
    assert "loupe index: images:" in capsys.readouterr().err


def test_broker_limit_flags_reach_the_broker_config(capsys) -> None:
    from cluster.cli import _broker_config

    args = build_parser().parse_args(["up", "--max-inflight", "16", "--shard-budget-s", "0.5", "--shutdown-grace-s", "0"])
    cfg = _broker_config(args)
    assert (cfg.max_inflight, cfg.shard_budget_s, cfg.shutdown_grace_s) == (16, 0.5, 0.0)
    assert cfg.max_extract_queue == 8 and cfg.shard_budget_fraction == 0.5  # unset flags keep the defaults
    assert main(["up", "--shard-budget-fraction", "1.5"]) == 2
    assert "shard_budget_fraction" in capsys.readouterr().err


def test_backup_and_restore_need_a_cluster_or_a_data_dir_and_list_reads_locally(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["backup", "--to", "backups"]) == 2
    assert "backup: give --address of a running cluster, or --data-dir" in capsys.readouterr().err
    assert main(["restore", "--from", "backups"]) == 2
    assert "restore: give --address" in capsys.readouterr().err
    assert main(["backup", "--list", "--to", "backups"]) == 0  # a relative directory, made absolute here
    assert f"no backups at {tmp_path / 'backups'}" in capsys.readouterr().out
    assert main(["backup", "--list", "--to", "gs://bucket/x"]) == 2
    assert "InvalidArgument: url: scheme 'gs'" in capsys.readouterr().err
