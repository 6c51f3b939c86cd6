"""The command line: its version, and one line (no traceback) when a command fails."""

from __future__ import annotations

import json

import pytest

from vlmsens import __version__
from vlmsens.cli import TRACEBACK_ENV, main
from vlmsens.provenance import cpu_name, process_started


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"vlmsens {__version__}"


def test_a_missing_file_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    missing = tmp_path / "quant_manifest.json"
    assert main(["rerender", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("vlmsens: vlmsens rerender failed on file") and str(missing) in err


def test_a_malformed_manifest_is_one_line_with_the_way_to_the_traceback(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "quant_manifest.json"
    bad.write_text(json.dumps({"cell": {}}))
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    assert main(["rerender", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "KeyError" in err and str(bad) in err and TRACEBACK_ENV in err
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    assert main(["rerender", str(bad)]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_cpu_device_name_is_the_model_name_and_process_start_is_past():
    import platform
    import time
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
              if line.lower().startswith("model name")]
    assert cpu_name() == (models[0] if models else platform.processor() or platform.machine())
    assert 0 < time.time() - process_started() < 24 * 3600
