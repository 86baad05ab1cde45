#!/usr/bin/env bash
# tools/image/check.sh (also `make image-check`): builds the CPU image from the real
# Dockerfile with buildah, runs it serving the bundled demo model on loopback, sends the
# README's image request (answer " red"), then stops the server with SIGTERM and checks
# that it exits 0. No registry is needed: the Dockerfile's FROM images are made locally
# (debootstrap for debian:*, the same plus this machine's Go installation for golang:*)
# and tagged with the exact FROM names, and the build runs with --pull=never.
# Needs root, buildah and debootstrap (apt-get install -y podman buildah debootstrap).
#   IMAGE_CHECK_SKIP=1          exit 0 with a SKIP line when buildah is not installed
#                               (for CI machines without it); otherwise a missing
#                               buildah is a failure
#   IMAGE_CHECK_REBUILD_BASE=1  make the base images again (kept in buildah's storage)
#   IMAGE_CHECK_NO_BUILD=1      run the image already tagged IMAGE_CHECK_TAG (no build)
#   IMAGE_CHECK_PORT            port to serve on (default: a free one in 20000-32767)
#   IMAGE_CHECK_TIMEOUT         seconds to wait for the server to be ready (default 120)
#   IMAGE_CHECK_TAG             name of the built image (default localhost/elasticserve:check)
#   DEBIAN_MIRROR               mirror for debootstrap (default: the machine's apt source)
#   EXTRA_CA_DIR                CA certificates (*.crt) trusted in the builder base image
#                               (default /usr/local/share/ca-certificates: this machine's)
set -euo pipefail
cd "$(dirname "$0")/../.."

TAG=${IMAGE_CHECK_TAG:-localhost/elasticserve:check}
TIMEOUT=${IMAGE_CHECK_TIMEOUT:-120}
EXTRA_CA_DIR=${EXTRA_CA_DIR:-/usr/local/share/ca-certificates}
WANT=" red"
IMAGE=models/demo/example.png

say() { echo "image-check: $*" >&2; }
fail() { echo "image-check: FAIL: $*" >&2; exit 1; }

if ! command -v buildah >/dev/null; then
	if [ "${IMAGE_CHECK_SKIP:-}" = 1 ]; then
		say "SKIP: buildah is not installed (IMAGE_CHECK_SKIP=1)"
		exit 0
	fi
	fail "buildah is not installed: apt-get install -y podman buildah debootstrap (or IMAGE_CHECK_SKIP=1 to skip)"
fi
[ "$(id -u)" = 0 ] || fail "run as root (buildah's chroot isolation and debootstrap need it)"
for tool in podman debootstrap curl base64 go; do command -v "$tool" >/dev/null || fail "$tool is not installed"; done

t_start=$SECONDS
tmp=$(mktemp -d "${TMPDIR:-/tmp}/image-check.XXXXXX")
ctr="" run_pid=""
cleanup() {
	if [ -n "$run_pid" ] && kill -0 "$run_pid" 2>/dev/null; then
		kill -TERM "$run_pid" 2>/dev/null || true
		sleep 2
		kill -KILL "$run_pid" 2>/dev/null || true
	fi
	[ -z "$ctr" ] || buildah rm "$ctr" >/dev/null 2>&1 || true
	rm -rf "$tmp"
}
trap cleanup EXIT

image_exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }

# --- 1. Base images under the Dockerfile's FROM names --------------------------------
mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
	mirror=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*debian\/\{0,1\}\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
	[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
	mirror=${mirror:-http://deb.debian.org/debian}
fi

# localhost/es-base/debian:SUITE: a minimal Debian made with debootstrap.
debian_base() {
	local suite=$1 ref=localhost/es-base/debian:$1
	if [ "${IMAGE_CHECK_REBUILD_BASE:-}" = 1 ] || ! image_exists "$ref"; then
		say "debootstrap $suite from $mirror"
		local t=$SECONDS
		debootstrap --variant=minbase "$suite" "$tmp/rootfs-$suite" "$mirror" >"$tmp/debootstrap-$suite.log" 2>&1 ||
			{ tail -n 20 "$tmp/debootstrap-$suite.log" >&2; fail "debootstrap $suite"; }
		tar -C "$tmp/rootfs-$suite" -c . | podman import --quiet - "$ref" >/dev/null
		rm -rf "$tmp/rootfs-$suite"
		say "base $ref made in $((SECONDS - t))s"
	fi
	echo "$ref"
}

# localhost/es-base/golang:VERSION-SUITE: the Debian base with what the official golang
# image holds (gcc, g++, make, git, pkg-config, curl) and this machine's Go at /usr/local/go.
golang_base() {
	local version=$1 suite=$2 ref=localhost/es-base/golang:$1-$2 goroot have
	goroot=$(go env GOROOT)
	have=$(go env GOVERSION)
	case "$have" in
	go"$version" | go"$version".*) ;;
	*) fail "the Dockerfile wants golang:$version, this machine has $have" ;;
	esac
	if [ "${IMAGE_CHECK_REBUILD_BASE:-}" = 1 ] || ! image_exists "$ref"; then
		local deb c t=$SECONDS
		deb=$(debian_base "$suite")
		say "making $ref (Go $have from $goroot)"
		c=$(buildah from --pull=never "$deb")
		# This machine's own CAs (e.g. of a TLS-intercepting egress proxy), so that the
		# Dockerfile's `go mod download` can reach the module proxy. The runtime base gets
		# none: its apt sources are plain http and the server fetches nothing at run time.
		if compgen -G "$EXTRA_CA_DIR/*.crt" >/dev/null; then
			buildah copy --quiet "$c" "$EXTRA_CA_DIR" /usr/local/share/ca-certificates >/dev/null
		fi
		buildah run --isolation chroot "$c" -- sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ca-certificates curl git gcc g++ libc6-dev make pkg-config >/dev/null && rm -rf /var/lib/apt/lists/*' ||
			{ buildah rm "$c" >/dev/null; fail "installing the build tools into $ref"; }
		buildah copy --quiet "$c" "$goroot" /usr/local/go >/dev/null
		buildah config --env GOPATH=/go --env GOTOOLCHAIN=local \
			--env PATH=/go/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
			--workingdir /go "$c"
		buildah commit --quiet --rm "$c" "$ref" >/dev/null
		say "base $ref made in $((SECONDS - t))s"
	fi
	echo "$ref"
}

t_base=$SECONDS
while read -r from; do
	case "$from" in
	debian:*-slim | debian:*) suite=${from#debian:}; suite=${suite%-slim}; base=$(debian_base "$suite") ;;
	golang:*-*) v=${from#golang:}; base=$(golang_base "${v%%-*}" "${v#*-}") ;;
	*) fail "no local recipe for the base image $from" ;;
	esac
	buildah tag "$base" "$from"
	say "FROM $from = $base"
done < <(awk 'toupper($1) == "FROM" {print $2}' Dockerfile | sort -u)
base_s=$((SECONDS - t_base))

# --- 2. Build the real Dockerfile -----------------------------------------------------
t_build=$SECONDS
if [ "${IMAGE_CHECK_NO_BUILD:-}" = 1 ] && image_exists "$TAG"; then
	say "IMAGE_CHECK_NO_BUILD=1: running the existing $TAG"
else
	say "buildah bud -f Dockerfile -t $TAG (a cold build compiles llama.cpp: minutes)"
	buildah bud --isolation chroot --pull=never --format docker --layers=false -f Dockerfile -t "$TAG" . \
		>"$tmp/build.log" 2>&1 || { tail -n 40 "$tmp/build.log" >&2; fail "buildah bud"; }
fi
build_s=$((SECONDS - t_build))
size=$(buildah images --format '{{.Size}}' "$TAG" | head -n1)
say "built $TAG in ${build_s}s, size $size"

# The image's own configuration: numeric non-root user (for runAsNonRoot), entrypoint.
user=$(buildah inspect --type image --format '{{.Docker.Config.User}}' "$TAG")
entry=$(buildah inspect --type image --format '{{.Docker.Config.Entrypoint}}' "$TAG")
[[ "$user" =~ ^[1-9][0-9]*(:[0-9]+)?$ ]] || fail "USER is \"$user\", want a numeric non-root uid"
[ "$entry" = '[/app/bin/elasticserve]' ] || fail "ENTRYPOINT is $entry"
say "USER $user, ENTRYPOINT $entry"

# --- 3. Run it, serving the bundled model on loopback -----------------------------------
free_port() {
	local p i
	for i in $(seq 1 100); do
		p=$((20000 + RANDOM % 12768))
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
	done
	return 1
}
port=${IMAGE_CHECK_PORT:-$(free_port)} || fail "no free port found"
url=http://127.0.0.1:$port

ctr=$(buildah from --pull=never "$TAG")
t_run=$SECONDS
# buildah run shares the machine's network; the image's user, environment and working
# directory apply, only the listen address is moved to a free loopback port.
buildah run --isolation chroot --env ELASTICSERVE_ADDR="127.0.0.1:$port" "$ctr" -- /app/bin/elasticserve \
	>"$tmp/server.log" 2>&1 &
run_pid=$!
while :; do
	if ! kill -0 "$run_pid" 2>/dev/null; then
		tail -n 30 "$tmp/server.log" >&2
		fail "the server exited before it was ready"
	fi
	if curl -fsS -o /dev/null "$url/ready" 2>/dev/null; then break; fi
	[ $((SECONDS - t_run)) -lt "$TIMEOUT" ] || { tail -n 30 "$tmp/server.log" >&2; fail "not ready on $url after ${TIMEOUT}s"; }
	sleep 0.5
done
say "ready on $url after $((SECONDS - t_run))s"
server_pid=""
todo=$run_pid
while [ -n "$todo" ] && [ -z "$server_pid" ]; do
	next=""
	for p in $todo; do
		for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do
			if [ "$(cat /proc/"$c"/comm 2>/dev/null)" = elasticserve ]; then server_pid=$c; break 2; fi
			next="$next $c"
		done
	done
	todo=$next
done
[ -n "$server_pid" ] || fail "cannot find the server process under buildah run (pid $run_pid)"
# The server process (a descendant of buildah run) runs as the image's user.
uid=$(awk '/^Uid:/ {print $2}' /proc/"$server_pid"/status)
[ "$uid" = "${user%%:*}" ] || fail "the server runs as uid $uid, the image's USER is $user"
say "server pid $server_pid runs as uid $uid"

# The image's HEALTHCHECK command, run inside the container.
buildah run --isolation chroot "$ctr" -- curl -fsS "$url/health" >/dev/null || fail "the HEALTHCHECK command (curl /health) failed in the image"

if ! answer=$(tools/build/ask-readme.sh "$url" "$IMAGE" "$WANT" 2>&1); then
	say "$answer"
	fail "the README request did not answer \"$WANT\""
fi
say "$answer"

# --- 4. SIGTERM to the server, which must exit 0 -----------------------------------------
t_stop=$SECONDS
kill -TERM "$server_pid"
for _ in $(seq 1 400); do kill -0 "$run_pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$run_pid" 2>/dev/null && fail "server still running 40s after SIGTERM"
wait "$run_pid" && rc=0 || rc=$?
run_pid=""
[ "$rc" = 0 ] || { tail -n 20 "$tmp/server.log" >&2; fail "after SIGTERM the container exited $rc"; }
grep -q '"message":"bye"' "$tmp/server.log" || fail "no clean shutdown in the server log"
say "SIGTERM: exited 0 in $((SECONDS - t_stop))s"
say "OK in $((SECONDS - t_start))s: base images ${base_s}s, build ${build_s}s, image size $size"
