"""jupyter_kernel_test's conformance suite against "Python 3 (sandbox)", plus stdin."""

from __future__ import annotations

import unittest

import jupyter_kernel_test
import pytest


@pytest.fixture(scope="module", autouse=True)
def _home(kernel_home):
    return kernel_home


class SandboxKernelConformance(jupyter_kernel_test.KernelTests):
    kernel_name = "sandbox-python"
    language_name = "python"
    file_extension = ".py"

    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples = [{"text": "zi", "matches": {"zip"}}]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples = ["import = 7q"]
    code_page_something = "print?"
    code_generate_error = "raise ValueError('from the sandbox')"
    code_execute_result = [{"code": "1+2+3", "result": "6"}, {"code": "[n*n for n in range(3)]",
                                                             "result": "[0, 1, 4]"}]
    code_display_data = [
        {"code": "from IPython.display import HTML, display; display(HTML('<b>test</b>'))",
         "mime": "text/html"},
        {"code": "from IPython.display import Math, display; display(Math('\\\\frac{1}{2}'))",
         "mime": "text/latex"},
    ]
    code_history_pattern = "1?2*"
    # "range" is left out: IPython itself numbers the current session 0 in range replies,
    # and a plain python3 ipykernel fails that subtest the same way.
    supported_history_operations = ("tail", "search")
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"

    def test_stdin(self) -> None:
        self.flush_channels()
        msg_id = self.kc.execute("answer = input('your name? '); print('hello', answer)",
                                 allow_stdin=True)
        request = self.kc.get_stdin_msg(timeout=30)
        self.assertEqual(request["msg_type"], "input_request")
        self.assertEqual(request["content"]["prompt"], "your name? ")
        self.assertFalse(request["content"]["password"])
        self.kc.input("Grace")
        reply = self.kc.get_shell_msg(timeout=30)
        self.assertEqual(reply["parent_header"]["msg_id"], msg_id)
        self.assertEqual(reply["content"]["status"], "ok")
        texts = []
        while True:
            msg = self.kc.get_iopub_msg(timeout=30)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                texts.append(msg["content"]["text"])
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        self.assertIn("hello Grace", "".join(texts))

    def test_getpass(self) -> None:
        self.flush_channels()
        self.kc.execute("import getpass; secret = getpass.getpass('pin: ')", allow_stdin=True)
        request = self.kc.get_stdin_msg(timeout=30)
        self.assertTrue(request["content"]["password"])
        self.kc.input("1234")
        self.assertEqual(self.kc.get_shell_msg(timeout=30)["content"]["status"], "ok")
        reply = self.kc.execute_interactive("len(secret)", timeout=30,
                                            output_hook=lambda m: None)
        self.assertEqual(reply["content"]["status"], "ok")


if __name__ == "__main__":
    unittest.main()
