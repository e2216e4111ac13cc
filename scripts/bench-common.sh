# Sourced by overhead-ab.sh, fixed-rate-ab.sh, ab-pairs.sh, instructions.sh and
# shared-bench-series.sh (not run on its own): oha, the shared bench's mock nodes, the request
# they send, a scratch directory, and the closed loop that measures a target. Needs `port` set
# first (and `seconds` for `measure`).
shared=../shared/bench
oha=$(command -v oha || echo "$HOME/.cargo/bin/oha")
[ -x "$oha" ] || { echo "needs oha: run $shared/setup.sh" >&2; exit 1; }
body='{"model":"mock","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
url=http://127.0.0.1:$port/v1/chat/completions
nodes=http://127.0.0.1:18001,http://127.0.0.1:18002

# The mock nodes are started unless they answer already, and stop_mocks stops them only then.
started_mocks=no
if ! curl -s -o /dev/null http://127.0.0.1:18001/; then
  "$shared/mock-nodes.sh" start >/dev/null
  started_mocks=yes
fi
stop_mocks() {
  if [ "$started_mocks" = yes ]; then "$shared/mock-nodes.sh" stop >/dev/null 2>&1 || true; fi
}
work=$(mktemp -d)
# The target being measured, for the caller's cleanup.
pid=

# The files the router's binaries are built from (router/build-sources.txt, which
# router/build.rs reads too).
mapfile -t router_sources < <(grep -v -e '^#' -e '^$' "$(dirname "${BASH_SOURCE[0]}")/../router/build-sources.txt")
((${#router_sources[@]})) || { echo "no sources listed in router/build-sources.txt" >&2; exit 1; }

# built_from_checkout BINARY [pgo|plain]: the commit a router binary names in `--version`
# (router/build.rs), when it was built from the sources of this checkout: of HEAD with the tree
# as it is now (uncommitted changes to the sources included, if the binary says it had some),
# or of an earlier commit no commit since has changed the sources of, with none uncommitted
# now; and, when asked, as a PGO build (`, PGO` in its version) or a plain one, never as the
# instrumented build that records the profile (`, PGO training`). Otherwise says
# why not and fails, so that a report named after this checkout does not measure another
# build. (It cannot tell two different uncommitted changes apart.)
built_from_checkout() {
  local version head built changes top binary=clean tree=clean kind=plain
  case "${2:-}" in '' | pgo | plain) ;; *) echo "built_from_checkout: pgo or plain, not $2" >&2; return 1 ;; esac
  [ -x "$1" ] || { echo "not an executable: $1" >&2; return 1; }
  version=$("$1" --version 2>/dev/null || true)
  # The list's paths are the top level's: git runs there, wherever the caller is.
  top=$(git rev-parse --show-toplevel) || return 1
  head=$(git -C "$top" rev-parse --short=12 HEAD) || return 1
  case "$version" in
    *"(commit "*) ;;
    *) echo "$1 does not say its commit (${version:-no --version}): built before router/build.rs" >&2; return 1 ;;
  esac
  built=${version##*"(commit "}
  built=${built%%[,)]*}
  changes=$(git -C "$top" status --porcelain --untracked-files=all -- "${router_sources[@]}") ||
    { echo "git status failed" >&2; return 1; }
  if [ -n "$changes" ]; then tree=modified; fi
  case "$version" in *", modified)" | *", modified, "*) binary=modified ;; esac
  case "$version" in *", PGO)") kind=pgo ;; *", PGO training)") kind=training ;; esac
  if [ -n "${2:-}" ] && [ "$kind" != "$2" ]; then
    echo "$1 is $version, not a $2 build" >&2
    return 1
  elif [ "$kind" = training ]; then
    echo "$1 is $version: instrumented to record a profile, not one to measure" >&2
    return 1
  fi
  # Uncommitted changes on both sides or on neither; an earlier commit only without any.
  if [ "$binary" = "$tree" ] && [ "$built" = "$head" ]; then
    echo "${version#* }"
  elif [ "$binary,$tree" = clean,clean ] && git -C "$top" cat-file -e "$built^{commit}" 2>/dev/null &&
    git -C "$top" diff --quiet "$built" HEAD -- "${router_sources[@]}"; then
    echo "${version#* }, the sources of $head"
  else
    echo "$1 is $version, not built from this checkout's sources ($head, $tree)" >&2
    return 1
  fi
}

# Sum of utime and stime (clock ticks) over the given processes and all their threads.
cpu_ticks() { for p in "$@"; do awk '{print $14, $15}' "/proc/$p/stat"; done | awk '{u+=$1; s+=$2} END {print u+0, s+0}'; }

# Until nothing listens on the port any more (a stopped target may take a moment to let go).
wait_port_free() {
  for _ in $(seq 100); do
    # Refused (exit 7) means free; a listener that answers, or hangs, still holds it.
    local code=0
    curl -s --max-time 2 -o /dev/null "http://127.0.0.1:$port/" || code=$?
    [ "$code" -eq 7 ] && return 0
    sleep 0.05
  done
  echo "port $port is still taken" >&2
  return 1
}

wait_ready() {
  for _ in $(seq 100); do
    curl -s --max-time 2 -o /dev/null -X POST -H 'content-type: application/json' -d "$body" "$url" && return 0
    sleep 0.05
  done
  echo "target did not come up on port $port" >&2
  return 1
}

# measure NAME PID...: one closed loop; appends "name rps user_us sys_us" to $work/rows.
measure() {
  local name=$1; shift
  [ "$#" -gt 0 ] || { echo "$name: no process to measure" >&2; return 1; }
  "$oha" --no-tui -z 2s -c 64 -m POST -T application/json -d "$body" "$url" >/dev/null
  local before after json
  before=$(cpu_ticks "$@")
  json=$("$oha" --no-tui --output-format json -z "${seconds}s" -c 64 -m POST -T application/json -d "$body" "$url")
  after=$(cpu_ticks "$@")
  python3 - "$name" "$before" "$after" "$json" "$(getconf CLK_TCK)" >> "$work/rows" <<'PY'
import json, sys
name, before, after, out, tck = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5])
u0, s0 = map(int, before.split()); u1, s1 = map(int, after.split())
codes = out["statusCodeDistribution"]
# Requests still in flight when the duration ends are cut off by oha, not failed.
errors = {k: v for k, v in out.get("errorDistribution", {}).items() if k != "aborted due to deadline"}
if set(codes) != {"200"} or errors:
    sys.exit(f"{name}: not every request answered 200: {codes} {errors}")
n = sum(codes.values())
us = 1e6 / tck / max(n, 1)
print(name, round(out["summary"]["requestsPerSec"]), round((u1 - u0) * us, 2), round((s1 - s0) * us, 2))
PY
  tail -1 "$work/rows"
}

# Stops what a script started: the target, nginx if it runs from the scratch directory, the mock
# nodes if this script started them; removes the scratch directory. For `trap stop_all EXIT`.
stop_all() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  stop_mocks
  rm -rf "$work"
}

# nginx as the shared bench configures it (no access log, kept-alive upstream connections),
# listening on the port, with its files in the scratch directory: $work/nginx.conf.
write_nginx_conf() {
  mkdir -p "$work"/{client_body,proxy,fastcgi,uwsgi,scgi}
  cat > "$work/nginx.conf" <<EOF
worker_processes auto;
worker_rlimit_nofile 65536;
pid $work/nginx.pid;
error_log $work/nginx.error.log warn;
events { worker_connections 16384; multi_accept on; }
http {
    access_log off; server_tokens off;
    keepalive_requests 1000000; keepalive_timeout 120s;
    client_body_temp_path $work/client_body; proxy_temp_path $work/proxy;
    fastcgi_temp_path $work/fastcgi; uwsgi_temp_path $work/uwsgi; scgi_temp_path $work/scgi;
    upstream mock_nodes {
        server 127.0.0.1:18001 max_fails=0; server 127.0.0.1:18002 max_fails=0;
        keepalive 256; keepalive_requests 1000000; keepalive_timeout 120s;
    }
    server {
        listen 127.0.0.1:$port reuseport backlog=4096;
        location / {
            proxy_pass http://mock_nodes; proxy_http_version 1.1; proxy_set_header Connection "";
            proxy_buffering off; proxy_request_buffering off; proxy_read_timeout 3600s;
        }
    }
}
EOF
}
