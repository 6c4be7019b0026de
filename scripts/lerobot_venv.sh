#!/usr/bin/env bash
# Builds (once) and prints the path of the cached virtualenv for the LeRobot test tier:
# rdv's dependencies plus its `lerobot` and `dev` extras (LeRobot with the feetech extra, which
# pulls torch: ~8 GB, ~3 min on a 2-core machine from a close package mirror).
#
#   scripts/lerobot_venv.sh            -> prints .../bin/python of a ready venv (builds if needed)
#
# The venv lives under ${RDV_LEROBOT_CACHE:-~/.cache/rdv/lerobot}/<key>, keyed by the Python
# version and a hash of pyproject.toml's dependency lists, and is reused between runs on a
# machine; other keys' venvs there are removed (each is GBs). A build is complete only once its
# `.complete` file exists; a half-built venv (interrupted run) is removed and built again. The
# venv is built in place (a venv cannot be moved), under a lock so two runs never build at once.
# rdv itself is not installed into it: tests run the checkout (`python -m services...`).
# Progress goes to stderr; only the python path goes to stdout. It must never touch .venv/.
set -euo pipefail
cd "$(dirname "$0")/.."

rdv_python=${RDV_VENV:-.venv}/bin/python
base_python=${RDV_LEROBOT_PYTHON:-$("$rdv_python" -c 'import sys; print(sys._base_executable)')}
cache=${RDV_LEROBOT_CACHE:-$HOME/.cache/rdv/lerobot}

# Requirements: [project] dependencies + the lerobot and dev extras, one per line.
requirements=$("$rdv_python" - <<'EOF'
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
extras = project["optional-dependencies"]
for line in [*project["dependencies"], *extras["lerobot"], *extras["dev"]]:
    print(line)
EOF
)
pyver=$("$base_python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
key="py${pyver}-$(printf '%s\n' "$requirements" | sha256sum | cut -c1-12)"
venv="$cache/$key"

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
    for old in "$cache"/py*; do  # other keys' venvs: GBs each, never used again
        [ -e "$old" ] && [ "$old" != "$venv" ] && { echo "lerobot venv: removing $old" >&2; rm -rf "$old"; }
    done
    rm -rf "$venv"
    echo "lerobot venv: building $venv (Python $pyver; LeRobot + torch, ~8 GB, a few minutes)" >&2
    start=$(date +%s)
    "$base_python" -m venv "$venv"
    # An old bundled pip (Python 3.12.1 ships 23.2) skips LeRobot 0.5+ and settles for 0.4.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip 2>&1 \
        | grep -v "is ignored: it is neither" >&2 || true
    mapfile -t reqs <<<"$requirements"
    log="$venv.log"
    set +e
    "$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off "${reqs[@]}" 2>&1 \
        | tee "$log" | grep --line-buffered -E "^(Collecting|Successfully installed)" \
        | sed -u 's/^/lerobot venv: /' >&2
    status=${PIPESTATUS[0]}
    set -e
    if [ "$status" != 0 ]; then
        grep -v "is ignored: it is neither" "$log" | tail -20 >&2
        echo "lerobot venv: pip install failed (log: $log); nothing cached" >&2
        rm -rf "$venv"
        exit 1
    fi
    # draccus (a LeRobot dependency) ships its own test suite as a top-level `tests` package;
    # a regular package shadows rdv's tests/ namespace package, so `tests.support` would not
    # import. The venv is for rdv's tests only: remove it.
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    if [ -f "$site/tests/__init__.py" ]; then
        rm -rf "$site/tests"
    fi
    versions=$("$venv/bin/python" -c 'import importlib.metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in ("lerobot", "torch", "feetech-servo-sdk")))')
    echo "lerobot venv: built in $(( $(date +%s) - start )) s, $(du -sh "$venv" | cut -f1): $versions" >&2
    echo "$versions" >"$venv/.complete"
fi
echo "$venv/bin/python"
