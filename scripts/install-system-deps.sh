#!/usr/bin/env bash
# System packages the project needs, from Debian: bubblewrap confines the sandboxes;
# chromium runs the browser tests (JupyterLab driven by Playwright); libfaketime moves the
# wall clock of one process tree for the clock-jump fault test.
set -euo pipefail
missing=()
command -v bwrap >/dev/null || missing+=(bubblewrap)
command -v chromium >/dev/null || missing+=(chromium)
compgen -G "/usr/lib/*/faketime/libfaketimeMT.so.1" >/dev/null || missing+=(libfaketime)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else
  echo "warning: cannot install ${missing[*]} (not root, no sudo): without bubblewrap sessions" \
       "run unconfined, without chromium the browser tests fail" >&2
  exit 0
fi
echo "installing ${missing[*]} from Debian"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
