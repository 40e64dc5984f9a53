"""ddp_train.errors: exit_now, a command's normal end without the interpreter's module teardown, losing nothing;
remedy, what a person does about a failed write."""
import subprocess
import sys

from conftest import ROOT

SCRIPT = """
import atexit, threading, time
from ddp_train.errors import exit_now
atexit.register(lambda: print("atexit ran", flush=False))
threading.Thread(target=lambda: (time.sleep(0.5), print("thread done", end="; ", flush=False))).start()
from concurrent.futures import ThreadPoolExecutor
pool = ThreadPoolExecutor(2)  # an idle pool left running, as libraries leave them
pool.submit(time.sleep, 0).result()
print("buffered", end="; ")  # still in the buffer: stdout is a pipe
print("to stderr", file=__import__("sys").stderr, end="")
exit_now(3)
"""


def test_exit_now_keeps_the_code_output_threads_and_atexit_handlers():
    p = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert p.returncode == 3
    assert p.stdout == "buffered; thread done; atexit ran\n" and p.stderr == "to stderr"


def test_a_failed_write_is_answered_by_what_a_person_does_about_it():
    import errno
    import os

    from ddp_train.errors import remedy
    said = {code: remedy(OSError(code, os.strerror(code))) for code in (errno.ENOSPC, errno.EROFS, errno.EISDIR)}
    assert said == {errno.ENOSPC: "free space", errno.EROFS: "make it writable", errno.EISDIR: "fix that"}
