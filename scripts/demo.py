"""The main job until the example notebook exists: a session that outlives this process."""

from __future__ import annotations

import subprocess
import sys
import tempfile

from sandbox_kernel import SessionManager

home = tempfile.mkdtemp(prefix="skdemo-", dir="/tmp")
manager = SessionManager(home=home)
session = manager.create(name="demo")
info = session.info()
print(f"session {info['name']} ({info['id']}) isolation={info['isolation']}")
result = session.run("import platform, os\nanswer = 6 * 7\nprint(platform.node(), os.getcwd())\n"
                     "answer")
print("stdout:", result.stdout.strip(), "| result:", result.result, "|", result.timing)
attach = ("from sandbox_kernel import SessionManager; "
          f"print(SessionManager(home={home!r}).get('demo').run('answer + 1').result)")
print("from another process:", subprocess.check_output([sys.executable, "-c", attach],
                                                        text=True).strip())
manager.close("demo")
