"""Notifications: `notify_command` ([daemon] in evertrain.toml) runs with one JSON event on its stdin when a file
is done, fails or is skipped, when a NaN/inf loss is rolled back, when the disk runs low, and when the daemon
stops. Each runs in a thread of its own with a time limit; whatever it does (fail, hang, vanish) is logged and
never touches training.

    [daemon]
    notify_command = "notify-send evertrain \\"$(jq -r .text)\\""
    notify_command = "curl -s -X POST -H 'Content-Type: application/json' --data-binary @- https://example.org/hook"
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time


class Notifier:
    def __init__(self, command: str, timeout: float, say):
        self.command, self.timeout, self.say = command, timeout, say
        self.threads: list[threading.Thread] = []

    def send(self, event: str, text: str, **fields) -> None:
        """`event`: file_done, file_failed, file_skipped, file_rejected, forgetting (a tripped gate that kept the
        file, or a retry that passed), rollback, disk_low, daemon_stopped; `text`: one line."""
        if not self.command:
            return
        payload = json.dumps({"event": event, "text": text, "time": time.time(), **fields})
        self.threads = [t for t in self.threads if t.is_alive()]
        thread = threading.Thread(target=self._run, args=(event, payload), daemon=True, name="evertrain-notify")
        thread.start()
        self.threads.append(thread)

    def _run(self, event: str, payload: str) -> None:
        try:
            # Its own process group: on a timeout the whole command goes (a shell's children too), so no
            # grandchild keeps the pipe, and this thread, waiting.
            proc = subprocess.Popen(self.command, shell=True, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
        except OSError as e:
            self.say(f"evertrain: notify_command ({event}) could not run: {e.strerror or e}")
            return
        try:
            _, err = proc.communicate(payload, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            self.say(f"evertrain: notify_command ({event}) did not finish within {self.timeout:g} s; it was ended")
            return
        except BrokenPipeError:  # it exited without reading its event
            err = ""
        if proc.wait() != 0:
            last = ((err or "").strip().splitlines() or [""])[-1][:200]
            self.say(f"evertrain: notify_command ({event}) exited {proc.returncode}" + (f": {last}" if last else ""))

    def close(self) -> None:
        """Let the last notifications (the daemon's stop) go out, each within its time limit."""
        for t in self.threads:
            t.join(self.timeout + 1)
