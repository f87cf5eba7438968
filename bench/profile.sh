#!/usr/bin/env bash
# Profile a meshd node under the fan-out load with py-spy; prints the top functions.
#   bash bench/profile.sh [SUBSCRIBERS] [extra loadgen flags...]
# Needs py-spy (pip install py-spy) and permission to trace (root, or ptrace allowed).
set -euo pipefail
cd "$(dirname "$0")/.."
S=${1:-100}; shift || true
PY=${PYTHON:-python3}
BIN=$(dirname "$(command -v "$PY")")
PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
OUT=${OUT:-bench/results/profile-S$S}
mkdir -p "$(dirname "$OUT")"
PYTHONPATH=. "$BIN/twistd" -n --pidfile= --logfile=/dev/null meshd --listen "tcp:$PORT:interface=127.0.0.1" &
NODE=$!
trap 'kill $NODE 2>/dev/null || true' EXIT
sleep 2
PYTHONPATH=. $PY bench/loadgen.py --target meshd --port "$PORT" --subscribers "$S" --duration 8 "$@" > "$OUT.loadgen" &
GEN=$!
until grep -q MEASURING "$OUT.loadgen" 2>/dev/null; do sleep 0.2; done
py-spy record --pid $NODE --duration 5 --rate 500 --format raw --output "$OUT.txt" --nonblocking > /dev/null 2>&1
wait $GEN
$PY - "$OUT.txt" <<'PYEOF'
import collections, re, sys
own, total = collections.Counter(), collections.Counter()
n = 0
for line in open(sys.argv[1]):
    stack, _, count = line.rstrip().rpartition(" ")
    count = int(count); n += count
    frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
    own[frames[-1]] += count
    for f in set(frames):
        total[f] += count
print(f"{n} samples; top by own time:")
for f, c in own.most_common(18):
    print(f"{c / n:6.1%}  {f}")
print("top by inclusive time (meshd and autobahn):")
for f, c in total.most_common(40):
    if "meshd" in f or "autobahn" in f:
        print(f"{c / n:6.1%}  {f}")
PYEOF
