#!/usr/bin/env bash
# Runs N instances of examples/http_session.rs on loopback with nginx in front, routing
# each session to one instance (deploy/nginx/). Prints `cluster listening on ADDR` once
# nginx and every instance answer, then runs until interrupted; on exit it stops every
# process it started, by process id, and removes its temporary directory.
#
#   deploy/cluster.sh --instances 3 --addr 127.0.0.1:8080
#   curl -si -X POST -H 'x-session-id: alice' 'http://127.0.0.1:8080/work?ms=300&tag=a1'
#
# Options:
#   --instances N     instances to start (default 3), each on a free loopback port
#   --addr HOST:PORT  nginx's listener, a loopback address (default 127.0.0.1:8080)
#   --routing R       header (default), cookie, address or round-robin: which
#                     deploy/nginx/by-*.conf (or round-robin.conf) routes the requests
#   --bin PATH        the http_session binary; by default the script builds it with
#                     `cargo build --example http_session`
#
# Needs nginx 1.17.1 or later and curl. nginx runs from a temporary prefix directory with
# its logs, pid file and temporary files inside it, so no root is needed.
set -euo pipefail

usage() {
    echo "usage: $0 [--instances N] [--addr 127.0.0.1:PORT] [--routing header|cookie|address|round-robin] [--bin PATH]" >&2
    exit 2
}

instances=3
addr=127.0.0.1:8080
routing=header
bin=""
while [[ $# -gt 0 ]]; do
    [[ $# -ge 2 ]] || usage
    case "$1" in
        --instances) instances="$2" ;;
        --addr) addr="$2" ;;
        --routing) routing="$2" ;;
        --bin) bin="$2" ;;
        *) usage ;;
    esac
    shift 2
done

[[ "$instances" =~ ^[1-9][0-9]*$ ]] || { echo "--instances must be a positive number" >&2; exit 2; }
# Loopback only: this is a local demonstration, nothing here is meant to be reachable.
[[ "$addr" =~ ^127\.[0-9]+\.[0-9]+\.[0-9]+:[0-9]+$ ]] || { echo "--addr must be 127.x.x.x:PORT" >&2; exit 2; }
case "$routing" in
    header | cookie | address) routing_conf="by-${routing}.conf" ;;
    round-robin) routing_conf="round-robin.conf" ;;
    *) usage ;;
esac

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Debian and Ubuntu install nginx in /usr/sbin, which is not on every user's PATH.
nginx="$(command -v nginx || true)"
if [[ -z "$nginx" && -x /usr/sbin/nginx ]]; then
    nginx=/usr/sbin/nginx
fi
[[ -n "$nginx" ]] || { echo "nginx not found (Debian/Ubuntu: apt-get install nginx)" >&2; exit 1; }
command -v curl >/dev/null || { echo "curl not found" >&2; exit 1; }

if [[ -z "$bin" ]]; then
    (cd "$repo" && cargo build --quiet --example http_session)
    # Where cargo puts it, honouring CARGO_TARGET_DIR and build.target-dir.
    target_dir="$(cd "$repo" && cargo metadata --format-version 1 --no-deps |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
    bin="$target_dir/debug/examples/http_session"
fi
[[ -x "$bin" ]] || { echo "not an executable: $bin" >&2; exit 1; }

run="$(mktemp -d "${TMPDIR:-/tmp}/tower-sync-engine-cluster.XXXXXX")"
# Started as root, nginx's worker runs as another user and must still reach its
# temporary directories here.
chmod 755 "$run"

pids=()
# shellcheck disable=SC2317 # run by the trap below
cleanup() {
    trap - EXIT INT TERM
    # Only what this script started, by the ids it recorded, and only those still
    # running (`jobs -pr`): an id that has already exited may belong to another process.
    local running
    running=" $(jobs -pr | tr '\n' ' ') "
    for pid in "${pids[@]}"; do
        if [[ "$running" == *" $pid "* ]]; then
            kill "$pid" 2>/dev/null || true
        fi
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$run"
}
trap cleanup EXIT
# Ctrl-C and `kill`: exit, and so run the cleanup.
trap 'exit 130' INT
trap 'exit 143' TERM

# The instances choose their own free ports (port 0) and print them, so two runs never
# race for a port.
addrs=()
for i in $(seq 1 "$instances"); do
    RUST_LOG="${RUST_LOG:-warn}" "$bin" --addr 127.0.0.1:0 >"$run/instance-$i.log" 2>&1 &
    pids+=("$!")
done
for i in $(seq 1 "$instances"); do
    pid="${pids[$((i - 1))]}"
    instance_addr=""
    deadline=$((SECONDS + 10))
    while [[ $SECONDS -lt $deadline ]]; do
        instance_addr="$(sed -n 's/^listening on //p' "$run/instance-$i.log")"
        [[ -z "$instance_addr" ]] || break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if [[ -z "$instance_addr" ]]; then
        echo "instance $i did not start:" >&2
        cat "$run/instance-$i.log" >&2
        exit 1
    fi
    addrs+=("$instance_addr")
done

for instance_addr in "${addrs[@]}"; do
    echo "server $instance_addr;"
done >"$run/servers.conf"
echo "listen $addr;" >"$run/listen.conf"
cp "$repo/deploy/nginx/nginx.conf" "$run/nginx.conf"
cp "$repo/deploy/nginx/$routing_conf" "$run/routing.conf"

# `daemon off`: nginx stays this script's child, so its id is known and it stops with us.
nginx_args=(-p "$run" -c "$run/nginx.conf" -g "daemon off;")
"$nginx" -t -q "${nginx_args[@]}"
"$nginx" "${nginx_args[@]}" &
nginx_pid="$!"
pids+=("$nginx_pid")

# A request answered with 200 and an x-served-by header.
answers() {
    local response
    response="$(curl --silent --fail --max-time 2 --include --request POST \
        "http://$1/work?ms=0&tag=ready")" || return 1
    grep -qi '^x-served-by:' <<<"$response"
}

for instance_addr in "${addrs[@]}"; do
    answers "$instance_addr" || { echo "instance $instance_addr does not answer" >&2; exit 1; }
done
ready=""
deadline=$((SECONDS + 10))
while [[ $SECONDS -lt $deadline ]] && kill -0 "$nginx_pid" 2>/dev/null; do
    if answers "$addr"; then
        ready=yes
        break
    fi
    sleep 0.1
done
if [[ -z "$ready" ]]; then
    echo "nginx did not start:" >&2
    cat "$run/error.log" >&2 || true
    exit 1
fi

for i in "${!addrs[@]}"; do
    echo "instance ${addrs[$i]} pid ${pids[$i]}"
done
echo "nginx pid $nginx_pid, routing $routing_conf, logs in $run (removed on exit)"
echo "cluster listening on $addr"

# Run until interrupted or until nginx stops. An instance may be stopped on purpose
# (`kill PID` from the list above) to watch its sessions move to the others.
status=0
wait "$nginx_pid" || status=$?
echo "nginx exited with status $status" >&2
exit 1
