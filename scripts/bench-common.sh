# Sourced by overhead-ab.sh and instructions.sh (not run on its own): oha, the shared bench's
# mock nodes, the request both send, and a scratch directory. Needs `port` set first.
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
