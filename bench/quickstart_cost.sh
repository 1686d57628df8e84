#!/usr/bin/env bash
# What the README's main command costs a new user: a fresh clone, a fresh virtual environment,
# empty pip and cargo caches, then `make quickstart`. Prints the wall time, the bytes downloaded
# (what landed in the empty pip and cargo caches: wheels, sdists, crates and the crates.io index)
# and the peak RSS of the largest process. Uses the machine's Rust toolchain and Python as they
# are (a new user has those too).
#
#   bash bench/quickstart_cost.sh [REPO]      # REPO defaults to this checkout
set -euo pipefail
repo=$(cd "${1:-$(dirname "$0")/..}" && pwd)
work=$(mktemp -d /tmp/quickstart-cost.XXXXXX)
trap 'rm -rf "$work"' EXIT

git clone --quiet "$repo" "$work/clone"
python3 -m venv "$work/venv"
export PIP_CACHE_DIR="$work/pip-cache" CARGO_HOME="$work/cargo-home"
# The toolchain's binaries live in the real CARGO_HOME; only its download caches start empty.
export PATH="$work/venv/bin:$HOME/.cargo/bin:$PATH"
received() { awk 'NR > 2 && $1 != "lo:" { sum += $2 } END { printf "%.0f", sum }' /proc/net/dev; }

cd "$work/clone"
rx_before=$(received)
SECONDS=0
started=$(date +%s)
/usr/bin/time -v -o "$work/time.txt" make quickstart PYTHON="$work/venv/bin/python" \
    >"$work/quickstart.log" 2>&1 || { tail -30 "$work/quickstart.log"; exit 1; }
wall=$SECONDS
rx=$(($(received) - rx_before))

mib() { du -sb "$@" 2>/dev/null | awk '{ s += $1 } END { printf "%.1f", s / 1048576 }'; }
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores," \
    "AVX-512: $(grep -q avx512f /proc/cpuinfo && echo yes || echo no)"
# `pip install .` (almost all of it the Rust build) ends when the package's metadata lands.
installed=$(stat -c %Y "$work"/venv/lib/python3*/site-packages/hooked_encoder-*.dist-info)
echo "wall: $wall s, of which pip install . (the Rust build, mostly): $((installed - started)) s"
# Downloads only: what pip says it downloaded (its build-isolation install of maturin is not
# listed, ~10 MB; the network counter below includes it), cargo's .crate archives and registry
# index (not the sources cargo unpacks from those archives).
pip_mib=$(grep -oE "^ +Downloading .* \(([0-9.]+) ([kM]B)\)" "$work/quickstart.log" |
    sed -E 's/.*\(([0-9.]+) ([kM]B)\)/\1 \2/' |
    awk '{ s += $1 * ($2 == "kB" ? 1e3 : 1e6) } END { printf "%.1f", s / 1048576 }')
echo "downloaded: pip $pip_mib MiB + cargo" \
    "$(mib "$CARGO_HOME"/registry/cache "$CARGO_HOME"/registry/index) MiB" \
    "(network interfaces received $(echo "$rx" | awk '{ printf "%.1f", $1 / 1048576 }') MiB" \
    "in all, other processes included)"
echo "peak RSS of the largest process: $(awk -F': ' '/Maximum resident/ { printf "%.0f", $2 / 1024 }' "$work/time.txt") MiB"
echo "user+sys CPU: $(awk -F': ' '/User time/ { u = $2 } /System time/ { s = $2 } END { printf "%.0f", u + s }' "$work/time.txt") s"
grep -E "cached activations|ablating" "$work/quickstart.log" || true
for heavy in torch transformers sentence_transformers; do
    if "$work/venv/bin/python" -c "import $heavy" 2>/dev/null; then
        echo "WARNING: $heavy is installed in the fresh environment"
    fi
done
