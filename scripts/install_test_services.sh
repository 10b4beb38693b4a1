#!/usr/bin/env bash
# Install the Debian packages that the tests and the docs tooling need but pip cannot provide:
#   postgresql  for tests/test_tracking_server.py, which starts its own throwaway cluster (as the
#               postgres user when run as root) on a free port, so nothing is started here;
#   chromium    only with --chromium, for scripts/mlflow_compare_screenshot.py.
# Already-installed packages are left alone, so this costs nothing on a machine that has them.
set -euo pipefail

packages=()
if ! command -v initdb >/dev/null 2>&1 && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    packages+=(postgresql)
fi
if [[ "${1:-}" == "--chromium" ]] && ! command -v chromium >/dev/null 2>&1; then
    packages+=(chromium)
fi
if (( ${#packages[@]} == 0 )); then
    echo "install_test_services: nothing to install"
    exit 0
fi

sudo=()
if (( EUID != 0 )); then
    sudo=(sudo)
fi
echo "install_test_services: installing ${packages[*]}"
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}"
