"""The demo's console: its own lines on stdout, everything else the process and its children write in the log."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import logging, os, subprocess, sys, time
    from pathlib import Path
    from pipeline.demo.console import Console

    logging.basicConfig(level=logging.INFO)
    with Console(Path(sys.argv[1])) as console:
        console.line("console line")
        print("a print")
        os.write(2, b"written to fd 2\\n")
        logging.getLogger("ray").warning("a library's warning")
        subprocess.run(["sh", "-c", "echo child out; echo child err >&2"], check=True)
        with console.progress("[1/2] quick", total=10) as bar:
            bar.update(5, "half way")
            bar.done("[1/2] quick: done")
        with console.progress("[2/2] slow", total=4, every_s=0.2,
                              poll=lambda: (int(time.monotonic() * 4) % 4, "polled")) as bar:
            time.sleep(1.6)
            bar.done("[2/2] slow: done")
    print("after close")
""")


def test_console_keeps_its_lines_and_logs_the_rest(tmp_path):
    log = tmp_path / "run.log"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["console line", "[1/2] quick: done"]  # no bar lines for a quick step off a terminal
    slow = [s for s in lines if s.startswith("[2/2] slow  [")]
    assert 1 <= len(slow) <= 8 and all("polled" in s and "/4" in s for s in slow), lines  # periodic, bounded
    assert lines[-2:] == ["[2/2] slow: done", "after close"]  # fds are given back on close
    assert proc.stderr == ""
    logged = log.read_text()
    for text in ("a print", "written to fd 2", "a library's warning", "child out", "child err"):
        assert text in logged and text not in proc.stdout
