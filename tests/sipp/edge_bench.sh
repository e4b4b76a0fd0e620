#!/usr/bin/env bash
# The SIP edge under load (issue 16 item 6): calls/s through hip's edge proxy against
# Kamailio relaying the same SIPp flow as a transaction-stateful proxy (record_route +
# t_relay), on the same machine, in the same run. A phone (SIPp UAC, 10.99.0.1:5070)
# calls through the proxy under test (10.99.0.1:5080) to SIPp's UAS (10.99.0.2:5060, in a
# second namespace behind a veth pair). Three targets:
#   kamailio   Kamailio 5.6 with @CHILDREN@ UDP workers (the baseline)
#   edge-plain hip's edge with HIP off ([hip] enabled = false: SDP untouched)
#   edge-hip   hip's edge with HIP on: the phone's SDP moved onto the edge's HIT and its
#              HIT inserted; the far end (SIPp) has no HIT, so each call goes on in the
#              clear as `outbound_without_hit = "clear"` allows (no base exchange is
#              measured here: that is the set-up bench's part)
#
# Usage (root): tests/sipp/edge_bench.sh [CALLS] [RATE] [CONCURRENCY] [CHILDREN]
#   CALLS 6000, RATE 1500 calls/s offered, CONCURRENCY 300, CHILDREN (Kamailio's UDP
#   workers) 2. Offer less than every target sustains: a call lost in an overload waits
#   for SIPp's timeout and the rate then says nothing (here, 3000/s overloads Kamailio
#   with one worker; the edge held ~1,400/s with 0 failed).
# Env: HIP_AGENT_BIN (default target/release/hip-agent, else target/debug/hip-agent).
# Exit status: 0, or 1 if any call failed on any target. Goal: edge >= 0.8x Kamailio.
set -euo pipefail

CALLS=${1:-6000}
RATE=${2:-1500}
LIMIT=${3:-300}
CHILDREN=${4:-2}
# shellcheck source=tests/sipp/lib.sh
. "$(cd "$(dirname "$0")" && pwd)/lib.sh"

TAG=hipedge-$$
NA=$TAG-a
NB=$TAG-b
WORK=$(mktemp -d /tmp/$TAG.XXXX)
cleanup() {
    for n in "$NA" "$NB"; do
        for p in $(ip netns pids "$n" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
    done
    sleep 0.2
    for n in "$NA" "$NB"; do
        for p in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
        ip netns del "$n" 2>/dev/null || true
    done
    [ -n "${KEEP:-}" ] && echo "kept $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "$NA"
ip netns add "$NB"
ip link add va netns "$NA" type veth peer name vb netns "$NB"
ip -n "$NA" addr add 10.99.0.1/24 dev va
ip -n "$NA" addr add fd00::1/64 dev va nodad
ip -n "$NB" addr add 10.99.0.2/24 dev vb
for n in "$NA" "$NB"; do ip -n "$n" link set lo up; done
ip -n "$NA" link set va up
ip -n "$NB" link set vb up

wait_port() {  # wait until something listens on UDP port $2 in namespace $1 (bounded)
    for _ in $(seq 1 1000); do
        if ip netns exec "$1" ss -Hlun "sport = :$2" | grep -q ":$2"; then return 0; fi
        sleep 0.01
    done
    echo "nothing listens on $2 in $1" >&2; return 1
}
stop_port() {  # stop whatever listens on UDP 5080 in $NA
    for p in $(ip netns exec "$NA" ss -Hlunp 'sport = :5080' | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
        kill "$p" 2>/dev/null || true
    done
    for _ in $(seq 1 500); do
        ip netns exec "$NA" ss -Hlun 'sport = :5080' | grep -q 5080 || return 0
        sleep 0.01
    done
}

# Runs the phone against the proxy; prints "successful failed seconds".
run_uac() {
    local name=$1
    local start end
    start=$(date +%s.%N)
    ip netns exec "$NA" sipp -sf "$HERE/edge_bench_uac.xml" \
        -s bench -i 10.99.0.1 -p 5070 10.99.0.1:5080 -m "$CALLS" -r "$RATE" -l "$LIMIT" \
        -nostdin -trace_stat -stf "$WORK/$name.csv" -fd 1 -timeout 120 -timeout_error \
        -trace_err -error_file "$WORK/$name.err" ${SIPP_TRACE:-} \
        >"$WORK/$name.out" 2>&1 || true
    end=$(date +%s.%N)
    python3 - "$WORK/$name.csv" "$start" "$end" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1]), delimiter=';'))
head, last = rows[0], rows[-1]
ok = int(last[head.index("SuccessfulCall(C)")])
failed = int(last[head.index("FailedCall(C)")])
print(ok, failed, float(sys.argv[3]) - float(sys.argv[2]))
PY
}

# The far end: SIPp's own UAS, for every target.
ip netns exec "$NB" sipp -sf "$HERE/edge_bench_uas.xml" -i 10.99.0.2 -p 5060 -nostdin -bg >/dev/null 2>&1 || true
wait_port "$NB" 5060

# Baseline: Kamailio as a stateful relay.
sed -e "s/@IP@/10.99.0.1/; s/@PORT@/5080/; s/@NEXT@/10.99.0.2:5060/; s/@CHILDREN@/$CHILDREN/" \
    "$ROOT/tests/kamailio/relay.cfg" >"$WORK/relay.cfg"
ip netns exec "$NA" kamailio -f "$WORK/relay.cfg" -P "$WORK/kamailio.pid" -m 256 -M 32 \
    -E >"$WORK/kamailio.log" 2>&1
wait_port "$NA" 5080
read -r K_OK K_FAIL K_SECS < <(run_uac kamailio)
stop_port

# hip's edge: HIP off, then HIP on.
"$BIN" hi new --out "$WORK/hi.pem" >/dev/null
agent() {  # $1: name, $2: extra configuration
    cat >"$WORK/$1.toml" <<TOML
pool = "$WORK/$1-pool.json"
control_socket = "$WORK/$1.sock"
$2
[sip]
user = "phone"
domain = "bench.example"
listen = ["udp:10.99.0.1:5060"]
[edge]
listen = ["udp:10.99.0.1:5080"]
clients = ["10.99.0.1", "fd00::1"]
next_hop = "udp:10.99.0.2:5060"
outbound_without_hit = "clear"
notify_phone = false
[limits]
max_calls = 100000
invites_per_source_per_sec = 1000000
invite_burst_per_source = 1000000
TOML
    HIP_LOG=error "$BIN" --netns "$NA" run --config "$WORK/$1.toml" 2>"$WORK/$1.log" &
    wait_port "$NA" 5080
}
agent edge-plain 'hit = "2001:20::a"
[hip]
enabled = false'
read -r P_OK P_FAIL P_SECS < <(run_uac edge-plain)
stop_port
agent edge-hip "identity = \"$WORK/hi.pem\"
[kernel]
enabled = false"
read -r H_OK H_FAIL H_SECS < <(run_uac edge-hip)
stop_port

python3 - "$CALLS" "$CHILDREN" "$K_OK" "$K_FAIL" "$K_SECS" "$P_OK" "$P_FAIL" "$P_SECS" "$H_OK" "$H_FAIL" "$H_SECS" <<'PY'
import sys
calls, children = sys.argv[1], sys.argv[2]
v = sys.argv[3:]
rows = [("kamailio (baseline)", *v[0:3]), ("hip edge, HIP off", *v[3:6]), ("hip edge, HIP on", *v[6:9])]
base = int(rows[0][1]) / float(rows[0][3])
for name, ok, failed, secs in rows:
    rate = int(ok) / float(secs)
    print(f"edge-load {name:<20} {rate:8.1f} calls/s  ({ok}/{calls} ok, {failed} failed)  ratio {rate / base:5.2f}")
print(f"edge-load: Kamailio with {children} UDP worker(s); goal: the edge >= 0.8x Kamailio, 0 failed")
PY
[ "$K_FAIL" = 0 ] && [ "$P_FAIL" = 0 ] && [ "$H_FAIL" = 0 ] && [ "$P_OK" = "$CALLS" ] && [ "$H_OK" = "$CALLS" ]
