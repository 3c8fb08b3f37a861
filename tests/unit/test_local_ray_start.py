"""A local Ray start that times out (any of Ray's start-up timeouts) is retried with its cause logged."""

from __future__ import annotations

import logging
import os

import pytest
import ray

from cluster import launcher


def _flaky_init(failures: list[str], seen_env: list[str | None]):
    calls = {"n": 0}

    def init(**kwargs: object) -> None:
        seen_env.append(os.environ.get("RAY_gcs_server_port_wait_time_s"))
        calls["n"] += 1
        if failures:
            raise Exception(failures.pop(0))  # Ray raises bare Exception / RuntimeError on start-up timeouts

    return init, calls


def test_every_startup_timeout_form_is_retried(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("RAY_gcs_server_port_wait_time_s", raising=False)
    seen: list[str | None] = []
    init, calls = _flaky_init(
        ["Timed out waiting for file /tmp/ray/session_x/gcs_server_port_abc", "The current node timed out during startup."], seen
    )
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(launcher.time, "sleep", lambda s: None)
    with caplog.at_level(logging.WARNING, logger="cluster.launcher"):
        launcher.start_local_ray(namespace="t")
    assert calls["n"] == 3
    assert "gcs_server_port" in caplog.text and "timed out during startup" in caplog.text
    assert seen == [str(launcher.GCS_PORT_WAIT_S)] * 3  # the longer GCS wait applies to each try
    assert "RAY_gcs_server_port_wait_time_s" not in os.environ  # and is not left behind


def test_gives_up_after_the_last_try_and_keeps_an_operator_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_gcs_server_port_wait_time_s", "300")
    seen: list[str | None] = []
    init, calls = _flaky_init(["boom"] * launcher.LOCAL_RAY_ATTEMPTS, seen)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(launcher.time, "sleep", lambda s: None)
    with pytest.raises(RuntimeError, match=f"did not start in {launcher.LOCAL_RAY_ATTEMPTS} tries; last error: boom"):
        launcher.start_local_ray()
    assert calls["n"] == launcher.LOCAL_RAY_ATTEMPTS
    assert seen == ["300"] * launcher.LOCAL_RAY_ATTEMPTS and os.environ["RAY_gcs_server_port_wait_time_s"] == "300"
