#!/usr/bin/env bash
# Install what the tests and the docs tooling need but pip cannot provide:
#   postgresql  for tests/test_tracking_server.py, which starts its own throwaway cluster (as the
#               postgres user when run as root) on a free port, so nothing is started here;
#   chromium    for tests/test_browser.py (and scripts/mlflow_compare_screenshot.py), which drive
#               Debian's Chromium headless;
#   vega        the charting libraries of `dvc plots show`'s page, in the versions its page loads
#               from a CDN (dvc_render's template), as npm package tarballs in $VEGA_PACKAGES
#               (default ~/.cache/mnist-pipeline/vega), so that tests/test_browser.py can serve them
#               to the page offline. Needs npm; skipped, saying so, without it.
# What is already there is left alone, so this costs nothing on a machine that has it all.
set -euo pipefail

packages=()
if ! command -v initdb >/dev/null 2>&1 && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    packages+=(postgresql)
fi
if ! command -v chromium >/dev/null 2>&1; then
    packages+=(chromium)
fi
if (( ${#packages[@]} == 0 )); then
    echo "install_test_services: no Debian package to install"
else
    sudo=()
    if (( EUID != 0 )); then
        sudo=(sudo)
    fi
    echo "install_test_services: installing ${packages[*]}"
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}"
fi

vega_dir="${VEGA_PACKAGES:-$HOME/.cache/mnist-pipeline/vega}"
vega_packages=(vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2)
missing=()
for package in "${vega_packages[@]}"; do
    [[ -f "$vega_dir/${package/@/-}.tgz" ]] || missing+=("$package")
done
if (( ${#missing[@]} == 0 )); then
    echo "install_test_services: vega packages already in $vega_dir"
elif ! command -v npm >/dev/null 2>&1; then
    echo "install_test_services: npm not found, so the vega packages are not fetched (the DVC page test will skip)"
else
    mkdir -p "$vega_dir"
    echo "install_test_services: fetching ${missing[*]} into $vega_dir"
    (cd "$vega_dir" && npm pack --silent "${missing[@]}" >/dev/null)
fi
