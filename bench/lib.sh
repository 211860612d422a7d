# Shared helpers for the bench/ scripts (sourced, not run).
# Every script: set -euo pipefail, a temp dir, processes tracked by PID and
# ended on exit, progress on stderr, its markdown section on stdout.

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$BENCH_DIR/.." && pwd)"
REL="$ROOT/target/release"
SCRIPT_NAME="$(basename "$0")"
RUNS="${BENCH_RUNS:-3}"          # repetitions; every figure is their median
DURATION="${BENCH_DURATION:-5s}" # one wrk run

# /usr/bin/python3 when there is one (a pyenv shim costs ~0.15 s per call).
PY="$(command -v /usr/bin/python3 || command -v python3 || true)"

log() { echo "[$SCRIPT_NAME $(date +%T)] $*" >&2; }
die() { log "error: $*"; exit 1; }

BENCH_PIDS=()
BENCH_TMP="$(mktemp -d /tmp/hatch-bench.XXXXXX)"

bench_cleanup() {
    local p
    for p in "${BENCH_PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in "${BENCH_PIDS[@]}"; do
        # Give each a few seconds, then insist.
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    BENCH_PIDS=()
    rm -rf "$BENCH_TMP"
}
trap bench_cleanup EXIT
trap 'exit 130' INT TERM

# Ends one process we started (by PID) and forgets it.
stop_pid() {
    local p="$1" q keep=()
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
    for q in "${BENCH_PIDS[@]}"; do [ "$q" = "$p" ] || keep+=("$q"); done
    BENCH_PIDS=("${keep[@]+"${keep[@]}"}")
}

# wrk and nginx from Debian packages.
ensure_tools() {
    local need=()
    command -v wrk >/dev/null || need+=(wrk)
    command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
    command -v curl >/dev/null || need+=(curl)
    [ -n "$PY" ] || need+=(python3)
    command -v jq >/dev/null || need+=(jq)
    if [ ${#need[@]} -gt 0 ]; then
        log "installing ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q "${need[@]}" >&2 || { apt-get update -q >&2 && apt-get install -y -q "${need[@]}" >&2; }
        PY="$(command -v /usr/bin/python3 || command -v python3)"
    fi
    export PATH="$PATH:/usr/sbin"
}

build_release() {
    if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
        log "cargo build --release --examples --bins"
        (cd "$ROOT" && cargo build --release --examples --bins >&2)
    fi
    [ -x "$REL/hatchd" ] && [ -x "$REL/examples/bench_proxy" ] || die "release build missing"
}

free_port() {
    "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() { # port [timeout_s]
    local deadline=$((SECONDS + ${2:-20}))
    until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || die "nothing listens on 127.0.0.1:$1"
        sleep 0.05
    done
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# nginx in the foreground (tracked by PID) in prefix dir $1 with $3 worker
# processes and $4 inside its http {} block, until 127.0.0.1:$2 listens. Sets
# NGINX_PID.
run_nginx() {
    local dir="$1" port="$2" workers="$3" http="$4"
    mkdir -p "$dir/logs"
    cat >"$dir/nginx.conf" <<EOF
user root;
worker_processes $workers;
worker_rlimit_nofile 65536;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 32768; }
http {
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
$http
}
EOF
    nginx -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;' >&2 &
    NGINX_PID=$!
    BENCH_PIDS+=("$NGINX_PID")
    wait_port "$port"
}

# nginx serving a small static file on 127.0.0.1:$2 (prefix dir $1), one
# worker (the same backend for every proxy). Sets NGINX_PID.
start_nginx_backend() {
    local dir="$1" port="$2"
    mkdir -p "$dir/www"
    printf 'hello from the benchmark backend: a small static file of 64 bytes\n' | head -c 64 >"$dir/www/index.html"
    run_nginx "$dir" "$port" 1 "    default_type text/html;
    server {
        listen 127.0.0.1:$port backlog=4096;
        location / { root $dir/www; }
    }"
}

# nginx as a plain reverse proxy on 127.0.0.1:$2 to 127.0.0.1:$3: upstream
# keepalive, HTTP/1.1, Connection "", the same forwarding headers hatch sets.
# One worker per core, as hatch's proxy has. Sets NGINX_PID.
start_nginx_proxy() {
    local dir="$1" port="$2" backend="$3"
    run_nginx "$dir" "$port" auto "    upstream backend {
        server 127.0.0.1:$backend;
        keepalive 256;
        keepalive_requests 100000000;
    }
    server {
        listen 127.0.0.1:$port backlog=4096;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Host \$host;
            proxy_set_header X-Forwarded-Proto \$scheme;
        }
    }"
}

# Starts examples/bench_proxy with N routes in front of backend port $2.
# Sets BP_PID, BP_PROXY, BP_API, BP_DATA, BP_CREATE_SECS.
start_bench_proxy() {
    local routes="$1" backend="$2" out="$BENCH_TMP/bench_proxy.$1.out"
    "$REL/examples/bench_proxy" --backend "127.0.0.1:$backend" --routes "$routes" \
        --create-concurrency "${BENCH_CREATE_CONCURRENCY:-8}" >"$out" 2>"$BENCH_TMP/bench_proxy.$1.err" &
    BP_PID=$!
    BENCH_PIDS+=("$BP_PID")
    local deadline=$((SECONDS + 600))
    until [ -s "$out" ]; do
        kill -0 "$BP_PID" 2>/dev/null || { cat "$BENCH_TMP/bench_proxy.$1.err" >&2; die "bench_proxy exited"; }
        [ $SECONDS -lt $deadline ] || die "bench_proxy did not get ready"
        sleep 0.2
    done
    local line kv
    line="$(head -1 "$out")"
    for kv in $line; do
        case "$kv" in
            proxy=*) BP_PROXY="${kv#proxy=}" ;;
            api=*) BP_API="${kv#api=}" ;;
            data=*) BP_DATA="${kv#data=}" ;;
            vm=*) BP_VM="${kv#vm=}" ;;
            create_secs=*) BP_CREATE_SECS="${kv#create_secs=}" ;;
        esac
    done
}

# wrk_run URL CONNS [extra wrk args...] → "rps p50_ms p99_ms errors"
# (errors: socket errors + non-2xx/3xx responses).
wrk_run() {
    local url="$1" conns="$2"; shift 2
    local threads=2
    [ "$conns" -lt 2 ] && threads=1
    wrk -t"$threads" -c"$conns" -d"$DURATION" --latency "$@" "$url" | "$PY" -c '
import re, sys
t = sys.stdin.read()
def ms(v):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", v)
    n, u = float(m.group(1)), m.group(2)
    return n / 1000 if u == "us" else n if u == "ms" else n * 1000 if u == "s" else n * 60000
p = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", t, re.M))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
err = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", t))
m = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
err += int(m.group(1)) if m else 0
p50, p99 = ms(p["50"]), ms(p["99"])
print("%.0f %.3f %.3f %d" % (rps, p50, p99, err))
'
}

# summary KEY VALUE: one figure for bench/run-all's summary table
summary() { echo "$1 $2" >>"${BENCH_SUMMARY:-/dev/null}"; }

# median of the arguments
median() { "$PY" -c 'import sys, statistics; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
# fmt NUMBER DECIMALS
fmt() { "$PY" -c 'import sys; print(f"{float(sys.argv[1]):,.{int(sys.argv[2])}f}")' "$1" "$2"; }
