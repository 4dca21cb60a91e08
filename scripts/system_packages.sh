#!/usr/bin/env bash
# Debian packages some tests need, installed when missing (idempotent; nothing is fetched when all are there):
#   postgresql                 tests/test_sweep_postgres.py starts a throwaway server (initdb, pg_ctl) in a temp folder
#   chromium, chromium-driver  tests/test_report_browser.py loads a report in headless chromium through Selenium
# Needs root (CI runs as root); elsewhere it says what to install and the tests that need them skip, except under CI.
set -euo pipefail
PACKAGES=(postgresql chromium chromium-driver)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "system_packages: no apt-get here; install ${missing[*]} by hand for the PostgreSQL and browser tests" >&2
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "system_packages: run as root to install ${missing[*]} (sudo bash scripts/system_packages.sh)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
