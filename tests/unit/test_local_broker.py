"""The demo's local broker writes its Mosquitto config only when it changed, and atomically."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.local_broker.__main__ import mosquitto_config, write_if_changed


def test_config_is_written_once_then_left_alone(tmp_path: Path) -> None:
    conf = tmp_path / "local-mosquitto.conf"
    text = mosquitto_config(18830)
    write_if_changed(conf, text)
    assert conf.read_text() == text and "listener 18830 127.0.0.1" in text
    first = conf.stat()
    write_if_changed(conf, text)  # a restart: the same file, not rewritten (a full disk is fine)
    assert conf.stat().st_ino == first.st_ino and conf.stat().st_mtime_ns == first.st_mtime_ns
    write_if_changed(conf, mosquitto_config(18831))
    assert "listener 18831 127.0.0.1" in conf.read_text()
    assert [p.name for p in tmp_path.iterdir()] == [conf.name], "a temp file was left behind"


def test_a_failed_write_leaves_the_old_config_whole(tmp_path: Path) -> None:
    conf = tmp_path / "local-mosquitto.conf"
    write_if_changed(conf, mosquitto_config(18830))
    (tmp_path / f".{conf.name}.tmp").mkdir()  # the temp file cannot be created: write fails
    with pytest.raises(OSError):
        write_if_changed(conf, mosquitto_config(18831))
    assert conf.read_text() == mosquitto_config(18830)
