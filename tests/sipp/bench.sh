#!/usr/bin/env bash
# SIP call-rate benchmark (issue 3): calls/s the agent sustains as UAS against SIPp's UAC,
# next to SIPp's own UAS (the baseline) in the same run, on the same machine, through the
# same veth pair between two network namespaces. Prints one line per target and the ratio.
#
# Usage (root): tests/sipp/bench.sh [CALLS] [RATE] [CONCURRENCY]
#   CALLS        calls per target (default 6000)
#   RATE         offered calls/s (default 3000: what SIPp's UAS still sustains here;
#                at 5000 it overloads, retransmits and fails calls, the agent did not)
#   CONCURRENCY  max simultaneous calls (default 300)
# Env: HIP_AGENT_BIN (default target/release/hip-agent, else target/debug/hip-agent).
# Exit status: 0, or 1 if any call failed on either target. Goal: ratio >= 0.8, 0 failed.
set -euo pipefail

CALLS=${1:-6000}
RATE=${2:-3000}
LIMIT=${3:-300}
# shellcheck source=tests/sipp/lib.sh
. "$(cd "$(dirname "$0")" && pwd)/lib.sh"

TAG=hipbench-$$
NA=$TAG-a
NB=$TAG-b
WORK=$(mktemp -d /tmp/$TAG.XXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    ip netns del "$NA" 2>/dev/null || true
    ip netns del "$NB" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "$NA"
ip netns add "$NB"
ip link add va netns "$NA" type veth peer name vb netns "$NB"
ip -n "$NA" addr add 10.99.0.1/24 dev va
ip -n "$NB" addr add 10.99.0.2/24 dev vb
for n in "$NA" "$NB"; do ip -n "$n" link set lo up; done
ip -n "$NA" link set va up
ip -n "$NB" link set vb up

# Runs the UAC against 10.99.0.2:5060; prints "successful failed seconds".
run_uac() {
    local name=$1
    local start end
    start=$(date +%s.%N)
    ip netns exec "$NA" sipp -sf "$HERE/uac_bench.xml" -key hit 7214148E0433AFE2FA2D48003D31172E \
        -s bench -i 10.99.0.1 -p 5070 10.99.0.2:5060 -m "$CALLS" -r "$RATE" -l "$LIMIT" \
        -nostdin -trace_stat -stf "$WORK/$name.csv" -fd 1 -timeout 300 -timeout_error \
        >"$WORK/$name.out" 2>&1 || true
    end=$(date +%s.%N)
    # Last statistics line: cumulative successful / failed calls.
    python3 - "$WORK/$name.csv" "$start" "$end" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1]), delimiter=';'))
head, last = rows[0], rows[-1]
ok = int(last[head.index("SuccessfulCall(C)")])
failed = int(last[head.index("FailedCall(C)")])
print(ok, failed, float(sys.argv[3]) - float(sys.argv[2]))
PY
}

wait_port() {  # wait until something listens on UDP 5060 in $NB (bounded)
    for _ in $(seq 1 500); do
        if ip netns exec "$NB" ss -Hlun 'sport = :5060' | grep -q 5060; then return 0; fi
        sleep 0.01
    done
    echo "nothing listens on 5060" >&2; return 1
}

# Baseline: SIPp's own UAS.
ip netns exec "$NB" sipp -sn uas -i 10.99.0.2 -p 5060 -nostdin -bg >/dev/null 2>&1 || true
wait_port
read -r B_OK B_FAIL B_SECS < <(run_uac sipp-uas)
# sipp -bg forks: stop it by the pid listening on 5060 in the namespace.
for p in $(ip netns pids "$NB"); do kill "$p" 2>/dev/null || true; done
for _ in $(seq 1 500); do [ -z "$(ip netns pids "$NB")" ] && break; sleep 0.01; done

# The agent.
cat >"$WORK/agent.toml" <<TOML
hit = "2001:20::b"
pool = "$WORK/pool.json"
control_socket = "$WORK/agent.sock"
[sip]
user = "bench"
domain = "bench.example"
listen = ["udp:10.99.0.2:5060"]
# One SIPp address stands for every caller: the per-source INVITE rate that protects a
# real host (10/s, burst 20) would refuse all but the first few dozen calls with 503.
[limits]
invites_per_source_per_sec = 1000000
invite_burst_per_source = 1000000
max_pending_incoming_calls = 100000
max_calls = 100000
TOML
HIP_LOG=warn "$BIN" --netns "$NB" run --config "$WORK/agent.toml" 2>"$WORK/agent.log" &
PIDS+=($!)
wait_port
read -r A_OK A_FAIL A_SECS < <(run_uac agent)

python3 - "$B_OK" "$B_FAIL" "$B_SECS" "$A_OK" "$A_FAIL" "$A_SECS" "$CALLS" <<'PY'
import sys
b_ok, b_fail, b_s, a_ok, a_fail, a_s, calls = sys.argv[1:]
b_rate = int(b_ok) / float(b_s)
a_rate = int(a_ok) / float(a_s)
print(f"sip-uas baseline (sipp -sn uas): {b_rate:8.1f} calls/s  ({b_ok}/{calls} ok, {b_fail} failed)")
print(f"sip-uas hip-agent:               {a_rate:8.1f} calls/s  ({a_ok}/{calls} ok, {a_fail} failed)")
print(f"sip-uas ratio agent/baseline:    {a_rate / b_rate:8.2f}  (goal >= 0.8, 0 failed)")
PY
[ "$B_FAIL" = 0 ] && [ "$A_FAIL" = 0 ] && [ "$A_OK" = "$CALLS" ]
