"""Package layers: installed once with uv (from wheels built here), shared, stacked, activated."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox_kernel.errors import InvalidArgument
from sandbox_kernel.packages import InstallFailed, parse_requirements, wait_for_compilers

from .conftest import make_manager


@pytest.fixture
def pkg_manager(home, wheelhouse):
    with make_manager(home, isolation="bwrap") as m:
        inst = m.installer
        inst.find_links = [str(wheelhouse)]
        inst.no_index = True
        inst.offline = True
        inst.cache_dir = str(home / "uv-cache")
        yield m


def test_two_sessions_with_the_same_set_share_one_layer(pkg_manager):
    first = pkg_manager.create(name="first", packages=["skdemo-beta"])
    one = first.last_install
    assert one.new_packages == {"skdemo-alpha": "2.0", "skdemo-beta": "1.0"}
    assert one.cache_hit is False and "install" in one.timing
    assert first.run("import skdemo_beta, skdemo_alpha; skdemo_alpha.answer()").result == \
        "'skdemo-alpha 2.0'"
    layer_dir = Path(pkg_manager.installer.layers_dir, one.layers[0])
    mtime = layer_dir.stat().st_mtime_ns
    second = pkg_manager.create(name="second", packages=["skdemo-beta"])
    two = second.last_install
    assert two.layers == one.layers            # the same layer ...
    assert two.cache_hit is True               # ... and nothing was installed:
    assert "install" not in two.timing or two.timing["install"] < one.timing["install"]
    assert layer_dir.stat().st_mtime_ns == mtime
    assert second.run("import skdemo_beta; skdemo_beta.VERSION").result == "'1.0'"
    assert second.info()["layers"] == one.layers
    assert second.info()["packages"] == ["skdemo-beta"]


def test_an_extended_set_installs_only_the_difference(pkg_manager):
    s = pkg_manager.create(name="grows", packages=["skdemo-beta"])
    base_layers = s.last_install.layers
    r = s.install(["skdemo-gamma"])
    assert r.new_packages == {"skdemo-gamma": "1.0"}   # alpha and beta are not installed again
    assert r.layers[:len(base_layers)] == base_layers and len(r.layers) == len(base_layers) + 1
    new_layer = Path(pkg_manager.installer.layers_dir, r.layers[-1], "site-packages")
    assert sorted(p.name for p in new_layer.iterdir() if not p.name.endswith(".dist-info")) == [
        "skdemo_gamma"]
    # The running kernel imports it without a restart.
    assert s.run("import skdemo_gamma; skdemo_gamma.answer()").result == "'skdemo-gamma 1.0'"
    assert r.restart_needed == []
    assert "activate" in r.timing
    assert s.info()["packages"] == ["skdemo-beta", "skdemo-gamma"]
    again = s.install(["skdemo-gamma"])
    assert again.new_packages == {} and again.layers == r.layers


def test_an_upgrade_of_an_imported_package_says_restart(pkg_manager):
    s = pkg_manager.create(name="upgrade", packages=["skdemo-alpha==1.0"])
    assert s.run("import skdemo_alpha; skdemo_alpha.VERSION").result == "'1.0'"
    r = s.install(["skdemo-alpha==2.0"])
    assert r.new_packages == {"skdemo-alpha": "2.0"}
    assert r.restart_needed == ["skdemo-alpha 1.0 -> 2.0"]
    assert "restart needed" in r.summary()
    assert any("restart" in i for i in r.insights)
    assert s.run("skdemo_alpha.VERSION").result == "'1.0'"  # the module already loaded stays
    assert s.info()["packages"] == ["skdemo-alpha==2.0"]
    # A session that had not imported it yet picks the new version up with no restart.
    quiet = pkg_manager.create(name="upgrade-quiet", packages=["skdemo-alpha==1.0"])
    r = quiet.install(["skdemo-alpha==2.0"])
    assert r.restart_needed == []
    assert quiet.run("import skdemo_alpha; skdemo_alpha.VERSION").result == "'2.0'"


def test_packages_are_read_only_in_the_sandbox(pkg_manager):
    s = pkg_manager.create(name="ro", packages=["skdemo-gamma"])
    out = s.run("import skdemo_gamma, os\ntry:\n    open(skdemo_gamma.__file__, 'a').write('x')\n"
                "    print('written')\nexcept OSError as e:\n    print(type(e).__name__)")
    assert out.stdout.strip() in ("OSError", "PermissionError")
    assert "site-packages" in s.run("skdemo_gamma.__file__").result
    # ... so its bytecode is compiled outside, in the background, after the layer is built.
    layer = Path(pkg_manager.installer.layers_dir, s.info()["layers"][0])
    deadline = time.monotonic() + 120
    while not (layer / ".compiled").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s.run("os.path.isfile(skdemo_gamma.__cached__)").result == "True"


def test_a_failed_install_leaves_the_session_as_it_was(pkg_manager):
    s = pkg_manager.create(name="keeps", packages=["skdemo-gamma"])
    s.run("kept = 41")
    before = s.info()
    with pytest.raises(InstallFailed, match="no-such-package-anywhere"):
        s.install(["no-such-package-anywhere"])
    with pytest.raises(InstallFailed, match="skdemo-alpha"):
        s.install(["skdemo-alpha>=5"])  # unsatisfiable
    after = s.info()
    assert after["layers"] == before["layers"] and after["packages"] == before["packages"]
    assert s.run("import skdemo_gamma; kept + 1").result == "42"


@pytest.mark.parametrize("spec, message", [
    ("--index-url=http://evil.example/simple", "command-line option"),
    ("-r /etc/passwd", "command-line option"),
    ("-e .", "command-line option"),
    ("./local/path", "path or URL"),
    ("/etc/passwd", "path or URL"),
    ("https://evil.example/x.whl", "path or URL"),
    ("pkg @ https://evil.example/x.whl", "URL"),
    ("pandas --index-url http://evil.example", "not a single package requirement"),
    ("pandas\n--extra-index-url x", "not a single package requirement"),
    ("not a valid ==", "not a valid requirement"),
    ("", "not a package requirement"),
])
def test_option_injection_and_bad_requirements_are_refused(pkg_manager, spec, message):
    with pytest.raises(InvalidArgument, match=message):
        parse_requirements([spec])
    with pytest.raises(InvalidArgument, match=message):
        pkg_manager.create(name="never", packages=[spec])
    assert pkg_manager.list() == []


def test_gc_removes_only_unused_layers(pkg_manager):
    keep = pkg_manager.create(name="keep", packages=["skdemo-gamma"])
    drop = pkg_manager.create(name="drop", packages=["skdemo-beta"])
    kept_layer, dropped_layer = keep.last_install.layers[0], drop.last_install.layers[0]
    assert pkg_manager.gc() == []
    pkg_manager.close("drop")
    # A layer whose bytecode is being compiled stays (the compiler would write into it).
    layers = Path(pkg_manager.installer.layers_dir)
    wait_for_compilers(layers)
    with open(layers / dropped_layer / ".compiling", "w") as compiler:
        fcntl.flock(compiler, fcntl.LOCK_EX)
        assert pkg_manager.gc() == []
        assert (layers / dropped_layer / ".complete").exists()
    assert pkg_manager.gc() == [dropped_layer]
    assert not Path(pkg_manager.installer.layers_dir, dropped_layer).exists()
    assert Path(pkg_manager.installer.layers_dir, kept_layer).exists()
    assert keep.run("import skdemo_gamma; 'ok'").result == "'ok'"


def test_cli_install_and_gc(home, wheelhouse):
    env = {**os.environ, "SANDBOX_KERNEL_HOME": str(home)}
    cli = [str(Path(sys.executable).with_name("sandbox-kernel"))]
    opts = [f"--PackageInstaller.find_links={wheelhouse}",
            "--PackageInstaller.no_index=True", "--PackageInstaller.offline=True"]
    assert subprocess.run([*cli, "create", "c"], env=env, capture_output=True).returncode == 0
    out = subprocess.run([*cli, "install", "c", "skdemo-gamma", *opts], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "installed skdemo-gamma 1.0" in out.stdout
    ran = subprocess.run([*cli, "run", "c", "import skdemo_gamma; skdemo_gamma.VERSION"],
                         env=env, capture_output=True, text=True)
    assert ran.stdout.strip() == "'1.0'"
    bad = subprocess.run([*cli, "install", *opts, "c", "--", "-r", "/etc/passwd"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "sandbox-kernel: error:" in bad.stderr
    subprocess.run([*cli, "close", "c"], env=env, capture_output=True)
    gc = subprocess.run([*cli, "gc"], env=env, capture_output=True, text=True)
    assert gc.returncode == 0 and "removed 1 layer" in gc.stdout


def test_session_install_in_the_kernel(kernel_home, wheelhouse, tmp_path):
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="sandbox-python")
    km.start_kernel(env={**os.environ, "JPY_SESSION_NAME": "work/packages.ipynb",
                         "SANDBOX_KERNEL_FIND_LINKS": str(wheelhouse),
                         "SANDBOX_KERNEL_NO_INDEX": "1", "SANDBOX_KERNEL_OFFLINE": "1",
                         "SANDBOX_KERNEL_UV_CACHE_DIR": str(tmp_path / "uv-cache")})
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        shown = []
        reply = kc.execute_interactive("%session install skdemo-beta", timeout=120,
                                       output_hook=shown.append)
        assert reply["content"]["status"] == "ok"
        text = [m["content"]["data"]["text/plain"] for m in shown
                if m["msg_type"] == "display_data"][0]
        assert "installed skdemo-alpha 2.0, skdemo-beta 1.0" in text
        results = []
        kc.execute_interactive("import skdemo_beta; skdemo_beta.answer()", timeout=60,
                               output_hook=results.append)
        values = [m["content"]["data"]["text/plain"] for m in results
                  if m["msg_type"] == "execute_result"]
        assert values == ["'skdemo-beta 1.0'"]
        bad = kc.execute_interactive("%session install -r /etc/passwd", timeout=60,
                                     output_hook=lambda m: None)
        assert bad["content"]["status"] == "error"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
