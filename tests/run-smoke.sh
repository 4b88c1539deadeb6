#!/usr/bin/env bash
# scripts/run's job, as a newcomer meets it: `sip-cc-bridge run` with no
# configuration answers a SIPp call to sip:echo@127.0.0.1:5060, serves the
# sandbox's demo page on :8080, signs in alice and bob, and stops cleanly on
# Ctrl-C. Run inside the test network namespace (the default ports are free).
set -uo pipefail
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT
cd "$work"
sip-cc-bridge run > out.log 2> err.log &
pid=$!
fail() { echo "FAIL: $*"; echo "--- stdout"; cat out.log; echo "--- stderr"; cat err.log; exit 1; }
for _ in $(seq 100); do grep -q "SIP listening on tcp" err.log && break; sleep 0.1; done
grep -q "SIP listening on tcp 127.0.0.1:5060" err.log || fail "the bridge did not start"
grep -q "sip:alice@127.0.0.1:5060 ↔ ConnectyCube user" out.log || fail "alice is not signed in"
sipp -sn uac -s echo 127.0.0.1:5060 -i 127.0.0.1 -m 1 -d 2000 -nostdin -timeout 20s -timeout_error \
  > sipp.log 2>&1 || { cat sipp.log; fail "the echo call failed"; }
grep -q "call .*: answered by echo (PCMU)" err.log || fail "no echo call in the log"
# Fetched whole before the check: with pipefail, grep -q closing the pipe
# early would fail curl's write and the pipeline with it.
curl -sf -o page.html http://127.0.0.1:8080/ || fail "no demo page on :8080"
grep -q "connectycube.min.js" page.html || fail "the page on :8080 is not the demo page"
kill -INT "$pid"
wait "$pid" || fail "the bridge did not exit cleanly on Ctrl-C"
grep -q '"called":"echo"' out.log || fail "no CDR line for the echo call"
echo "ok: echo call answered, demo page served, CDR written, clean stop"
