# Shared by the SIPp bench scripts (sourced): HERE, ROOT, and BIN, the hip-agent binary
# (HIP_AGENT_BIN, else target/release/hip-agent, else target/debug/hip-agent).
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BIN=${HIP_AGENT_BIN:-}
if [ -z "$BIN" ]; then
    if [ -x "$ROOT/target/release/hip-agent" ]; then BIN=$ROOT/target/release/hip-agent; else BIN=$ROOT/target/debug/hip-agent; fi
fi
[ -x "$BIN" ] || { echo "hip-agent binary not found (build it or set HIP_AGENT_BIN)" >&2; exit 2; }
