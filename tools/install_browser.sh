#!/usr/bin/env bash
# Headless Chromium and its WebDriver from Debian, for tests/test_site.py.
# Does nothing when /usr/bin/chromium and /usr/bin/chromedriver are already there. Installs them
# with apt-get where we are root on a system with apt; elsewhere it says what to install and
# leaves the failure to the test. (Playwright's own browser download is not used: it needs a
# host that only a browser vendor serves.)
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing chromium and chromium-driver with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || {
    apt-get update -qq >/dev/null
    apt-get install -y -qq chromium chromium-driver >/dev/null
  }
else
  echo "tools/install_browser.sh: no chromium/chromedriver and not root with apt-get;" \
       "install Debian's chromium and chromium-driver (or your system's equivalent) for tests/test_site.py" >&2
fi
