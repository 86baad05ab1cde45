#!/usr/bin/env bash
# tools/build/smoke.sh (also `make smoke`): the README's quick start, end to end.
# Runs `make run` on a free loopback port (so it builds whatever is missing, from an empty
# module or build cache too), waits until the server is ready, sends the README's image
# request ("What color is the circle?" on models/demo/example.png) under policy full and under
# the server's default policy, checks the HTTP status (200) and the answer (exactly " red"
# both times), then stops the server with SIGTERM and
# checks that it exits 0. Prints how long each step took.
#   SMOKE_PORT        port to use (default: a free one in 20000-32767)
#   SMOKE_TIMEOUT     seconds to wait for `make run` to serve, build included (default 1800)
#   SMOKE_MAKEFLAGS   extra arguments for `make run` (e.g. MODEL=... MMPROJ=...)
set -euo pipefail
cd "$(dirname "$0")/../.."

MAKE=${MAKE:-make}
TIMEOUT=${SMOKE_TIMEOUT:-1800}
IMAGE=models/demo/example.png
WANT=" red"

say() { echo "smoke: $*"; }
fail() { echo "smoke: FAIL: $*" >&2; exit 1; }
for tool in curl base64; do command -v "$tool" >/dev/null || fail "$tool is not installed"; done

# A port nothing listens on, below Linux's ephemeral range (32768-60999).
free_port() {
	local p i
	for i in $(seq 1 100); do
		p=$((20000 + RANDOM % 12768))
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
	done
	return 1
}
port=${SMOKE_PORT:-$(free_port)} || fail "no free port found"
addr=127.0.0.1:$port
url=http://$addr

tmp=$(mktemp -d "${TMPDIR:-/tmp}/smoke.XXXXXX")
make_pid="" server_pid=""
cleanup() {
	local p
	for p in $server_pid $make_pid; do
		kill -0 "$p" 2>/dev/null || continue
		kill -TERM "$p" 2>/dev/null || true
		for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
		kill -KILL "$p" 2>/dev/null || true
	done
	rm -rf "$tmp"
}
trap cleanup EXIT

# The elasticserve process started by `make run`: a descendant of make whose executable is
# bin/elasticserve (normally make's own child, since bash execs a recipe's single command).
children_of() {
	local stat line fields
	for stat in /proc/[0-9]*/stat; do
		read -r line < "$stat" 2>/dev/null || continue
		fields=${line##*) } # after "pid (comm) ": state ppid ...
		fields=${fields#* }
		[ "${fields%% *}" = "$1" ] && { stat=${stat#/proc/}; echo "${stat%/stat}"; }
	done
	return 0
}
find_server() {
	local want todo p c
	want=$(readlink -f bin/elasticserve 2>/dev/null) || return 1
	todo=$1
	while [ -n "$todo" ]; do
		p=${todo%% *}; [ "$p" = "$todo" ] && todo="" || todo=${todo#* }
		for c in $(children_of "$p"); do
			if [ "$(readlink "/proc/$c/exe" 2>/dev/null)" = "$want" ]; then echo "$c"; return 0; fi
			todo="$todo $c"; todo=${todo# }
		done
	done
	return 1
}

# 1. make run, as a newcomer types it (its output streams here and into a log).
t0=$SECONDS
say "make run ADDR=$addr  (builds what is missing; a cold build takes minutes)"
# shellcheck disable=SC2086
$MAKE --no-print-directory run ADDR="$addr" ${SMOKE_MAKEFLAGS:-} > >(tee "$tmp/run.log") 2>&1 &
make_pid=$!
while :; do
	if ! kill -0 "$make_pid" 2>/dev/null; then
		wait "$make_pid" && rc=0 || rc=$?
		fail "make run exited ($rc) before the server was ready"
	fi
	if curl -fsS -o /dev/null "$url/ready" 2>/dev/null; then break; fi
	[ $((SECONDS - t0)) -lt "$TIMEOUT" ] || fail "no ready server on $url after ${TIMEOUT}s"
	sleep 1
done
ready_s=$((SECONDS - t0))
server_pid=$(find_server "$make_pid") || fail "server ready on $url, but it is not the one make run started"
say "server ready after ${ready_s}s (pid $server_pid)"

# 2. The README's request, under full and under the server's default policy.
for policy in full default; do
	if ! answer=$(tools/build/ask-readme.sh "$url" "$IMAGE" "$WANT" "$policy" 2>&1); then
		say "$answer"
		fail "the README request (policy $policy) did not answer \"$WANT\""
	fi
	say "$answer"
done

# 3. SIGTERM: the server shuts down cleanly, so make run (its parent) exits 0 too.
t2=$SECONDS
kill -TERM "$server_pid"
for _ in $(seq 1 300); do kill -0 "$make_pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$make_pid" 2>/dev/null && fail "server still running 30s after SIGTERM"
wait "$make_pid" && rc=0 || rc=$?
server_pid="" make_pid=""
[ "$rc" = 0 ] || fail "after SIGTERM, make run exited $rc (the server did not exit 0)"
say "SIGTERM: server exited 0 in $((SECONDS - t2))s"
say "OK in $((SECONDS - t0))s (make run until ready ${ready_s}s)"
