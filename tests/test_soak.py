"""The soak benchmark, short: about a minute of files and faults against a real daemon (bench/soak.py).

    pytest -m slow tests/test_soak.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


@pytest.mark.slow
def test_a_minute_of_files_and_faults_loses_nothing_and_doubles_nothing():
    done = subprocess.run([sys.executable, str(SOAK), "--minutes", "1.2", "--seed", "16", "--drain-minutes", "6"],
                          capture_output=True, text=True, timeout=900)
    out = done.stdout
    assert done.returncode == 0 and "soak: PASS" in out, out + done.stderr[-3000:]
    figures = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert figures["lost_lines"] == 0 and figures["doubled_lines"] == 0 and figures["tracebacks"] == 0
    assert figures["good_files"] >= 3 and sum(figures["events"].get(k, 0) for k in
                                              ("kill-9", "sigterm", "disk-full", "corrupt-newest")) >= 2, figures
