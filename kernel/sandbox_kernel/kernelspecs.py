"""Which inner kernel a session's language runs, and what it must be able to read.

A language is a kernelspec name, so that other kernels can follow Python.
``"python"`` runs ipykernel with the configured interpreter; any other name
is looked up with jupyter_client's KernelSpecManager, and the prefix of its
executable is bound read-only into the sandbox.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from .errors import InvalidArgument
from .sandbox.launcher import KernelCommand

#: ipykernel as the sandbox runs it, inline because the sandbox cannot import
#: sandbox_kernel. Two things a client of ours never needs are left out:
#: - the shell-channel thread, which serves only subshells (the proxy offers none)
#:   and costs two thread hops, about 0.4 ms, per request. It is replaced by a
#:   stand-in that is false, so ipykernel takes its no-thread paths (and a kernel
#:   that says it has no subshells), and that still answers the one question
#:   ipykernel 7 asks it outside them: which thread is the main one
#:   (``do_execute``'s path for a cell with top-level ``await``; with ``None``
#:   there, such a cell raised inside ipykernel and never replied);
#: - the 0.5 ms sleep before every execute_reply, ipykernel's guard against stream
#:   output arriving after the reply (our clients wait for the kernel's idle
#:   status, which follows every output on the same socket).
#: `make bench` measures both. Package layers (SANDBOX_KERNEL_LAYERS, oldest first)
#: go on sys.path before anything is imported.
INNER_IPYKERNEL = (
    "import os, site, sys\n"
    "for _p in filter(None, os.environ.get('SANDBOX_KERNEL_LAYERS', '').split(os.pathsep)):\n"
    "    site.addsitedir(_p)\n"  # .pth files of packages count too
    "    sys.path.remove(_p)\n"
    "    sys.path.insert(0, _p)\n"  # the newest layer first, all before the base
    # No debugpy for ipykernel's debugger: it is not offered across the sandbox (see
    # kernel.py), and importing it took 0.1 s of every start. User code may import it.
    "sys.modules['debugpy'] = None\n"
    "import ipykernel.debugger\n"
    "del sys.modules['debugpy']\n"
    "import threading\n"
    "from ipykernel.ipkernel import IPythonKernel\n"
    "from ipykernel.kernelapp import IPKernelApp\n"
    "from traitlets.config import Config\n"
    "class NoShellChannelThread:\n"
    "    parent_thread = threading.main_thread()\n"
    "    def __bool__(self):\n"
    "        return False\n"
    "class SandboxedKernel(IPythonKernel):\n"
    "    _supports_kernel_subshells = False\n"
    "class SandboxedKernelApp(IPKernelApp):\n"
    "    kernel_class = SandboxedKernel\n"
    "    def init_sockets(self):\n"
    "        super().init_sockets()\n"
    "        self.shell_channel_thread = NoShellChannelThread()\n"
    "config = Config()\n"
    "config.Kernel._execute_sleep = 0.0\n"
    "SandboxedKernelApp.launch_instance(config=config)\n"
)


#: Languages run by Deno's Jupyter kernel (TypeScript is its native tongue; JavaScript too).
DENO_LANGUAGES = ("javascript", "typescript")


def deno_executable() -> str | None:
    """Deno from PATH, else the one the PyPI package ``deno`` put beside this interpreter."""
    found = shutil.which("deno")
    if found:
        return found
    beside = os.path.join(os.path.dirname(sys.executable), "deno")
    return beside if os.access(beside, os.X_OK) else None


def kernel_command(language: str, python: str) -> KernelCommand:
    if language in DENO_LANGUAGES:
        deno = deno_executable()
        if deno is None:
            raise InvalidArgument(f"language {language!r} runs on Deno, which is not installed; "
                                  "`pip install deno` (PyPI) provides it")
        from .sandbox import tcp_relay

        with open(tcp_relay.__file__) as f:
            relay = f.read()
        real = os.path.realpath(deno)
        return KernelCommand(
            argv=[python, "-I", "-S", "-c", relay, "{connection_file}", real, "jupyter",
                  "--kernel", "--conn", "{tcp_connection_file}"],
            read_only=[*interpreter_prefixes(python), os.path.dirname(real)],
            env={"DENO_NO_UPDATE_CHECK": "1", "DENO_NO_PROMPT": "1"},
            address_space_limit=False,
        )
    if language == "python":
        return KernelCommand(
            argv=[python, "-c", INNER_IPYKERNEL, "-f", "{connection_file}"],
            read_only=list(interpreter_prefixes(python)),
        )
    if language.startswith("sandbox-"):
        raise InvalidArgument(f"language {language!r} is a sandbox kernel itself; use 'python'")
    ksm = KernelSpecManager()
    try:
        spec = ksm.get_kernel_spec(language)
    except NoSuchKernel:
        known = sorted({"python", *ksm.find_kernel_specs()} - {"python3"})
        raise InvalidArgument(
            f"unknown language {language!r}; available: {', '.join(known)}"
        ) from None
    argv = [a.replace("{resource_dir}", spec.resource_dir) for a in spec.argv]
    exe = shutil.which(argv[0])
    if exe is None:
        raise InvalidArgument(f"kernel {language!r} needs {argv[0]!r}, which is not installed")
    real = os.path.realpath(exe)
    read_only = [spec.resource_dir, os.path.dirname(os.path.dirname(real))]
    if os.path.basename(real).startswith("python"):
        read_only += interpreter_prefixes(exe)
    return KernelCommand(argv=[exe, *argv[1:]], read_only=read_only, env=dict(spec.env))


@functools.cache
def interpreter_prefixes(python: str) -> tuple[str, ...]:
    """The directories an interpreter (and its venv) loads from."""
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        found = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    else:
        code = "import sys,json;print(json.dumps([sys.prefix,sys.base_prefix,sys.exec_prefix]))"
        try:
            out = subprocess.run(
                [python, "-c", code], capture_output=True, text=True, timeout=10, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            raise InvalidArgument(f"cannot run the interpreter {python!r}: {exc}") from None
        found = set(json.loads(out))
    found.add(os.path.dirname(os.path.dirname(os.path.realpath(python))))
    return tuple(sorted(found))
