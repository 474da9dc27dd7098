"""A real headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: no port, no
websocket library): open a page, run JavaScript in it, click, choose a file for an <input type=file>.

    with Page(chromium_path, profile_dir, url) as page: page.click("#ctl-pause"); page.eval("document.title")
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time


class Page:
    def __init__(self, browser: str, profile, url: str):
        # Chromium reads commands on fd 3 and writes answers on fd 4; high numbers first, so dup2 cannot clobber.
        to_chrome_r, to_chrome_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in os.pipe())
        from_chrome_r, from_chrome_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in os.pipe())

        def wire():
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-extensions",
             f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            preexec_fn=wire, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in (to_chrome_r, from_chrome_w):
            os.close(fd)
        self.out, self.inp = os.fdopen(to_chrome_w, "wb"), os.fdopen(from_chrome_r, "rb")
        self.next_id, self.buffer = 0, b""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def call(self, method: str, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if method.split(".")[0] not in ("Target", "Browser"):
            msg["sessionId"] = self.session
        self.out.write(json.dumps(msg).encode() + b"\0")
        self.out.flush()
        while True:
            reply = self._read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self) -> dict:
        while b"\0" not in self.buffer:
            chunk = os.read(self.inp.fileno(), 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self.buffer += chunk
        msg, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(msg)

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 30.0, what: str | None = None):
        """Until the expression is truthy in the page (each try is a round trip to the browser)."""
        end = time.monotonic() + timeout
        while True:
            try:
                value = self.eval(expression)
            except RuntimeError:
                value = None  # the page is still loading
            if value:
                return value
            assert time.monotonic() < end, f"timed out waiting for {what or expression}"
            time.sleep(0.05)

    def click(self, selector: str) -> None:
        self.wait(f"!!document.querySelector({json.dumps(selector)})", what=selector)
        self.eval(f"document.querySelector({json.dumps(selector)}).click()")

    def choose_file(self, selector: str, path) -> None:
        doc = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=doc, selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", nodeId=node, files=[str(path)])

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.out.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.inp.close()
