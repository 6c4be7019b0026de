#!/usr/bin/env bash
# Installs what rdv needs on a Debian machine: Debian packages (when root), then a virtualenv
# with rdv and its Python dependencies. Safe to re-run; it only does what is missing.
#   RDV_VENV   where the virtualenv goes (default: .venv in the checkout)
#   RDV_EXTRAS pip extras to install (default: dev)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${RDV_VENV:-.venv}
extras=${RDV_EXTRAS:-dev}

# Debian packages the project runs or tests against. python3-venv: a fresh Debian python3
# cannot create a virtualenv without it. mosquitto: the MQTT broker tests and the demo start
# (their own instances; the system service is never relied on). openssl: test TLS certificates.
# prometheus: /usr/bin/prometheus and promtool for monitoring/ and its tests (the tests start
# their own Prometheus; the system service the package installs is never relied on).
# iproute2, iptables: the network tests (tests/netns) build namespaces, veths, NAT and loss.
# coturn: the TURN server those tests start (their own turnserver and config; the system
# service the package installs is never relied on).
# chromium: the browser tests (tests/browser) drive the viewer page in headless Chromium.
apt_packages=(python3 python3-venv python3-pip mosquitto mosquitto-clients openssl prometheus
    iproute2 iptables coturn chromium)

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for package in "${apt_packages[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$package")
    done
fi
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
        echo "setup: not root, so not installing Debian packages: ${missing[*]}" >&2
        echo "setup: if a step below fails, run: sudo apt-get install ${missing[*]}" >&2
    fi
fi

python=${RDV_PYTHON_BOOTSTRAP:-$(command -v python3)}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "setup: rdv needs Python >= 3.10, $python is $("$python" --version)" >&2
    exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating virtualenv $venv with $("$python" --version)"
    "$python" -m venv "$venv"
fi
echo "setup: installing rdv[$extras] into $venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$extras]" 2>&1 \
    | grep -v "^WARNING: Location" || true
"$venv/bin/python" -c 'import services, zmq, msgpack, supervisor' \
    || { echo "setup: the install did not complete" >&2; exit 1; }
echo "setup: done ($venv/bin/rdv)"
