#!/usr/bin/env bash
# Runs amqp091-go's own integration suite (integration_test.go, build tag
# "integration") against the embedded broker served with -broker-listen,
# each test in its own process, and prints what passed and failed. The
# suite comes from the module cache, at the version go.mod names; nothing of
# it is copied into this repository.
#
#   scripts/amqp091-conformance.sh            # against the embedded broker
#   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ scripts/amqp091-conformance.sh   # against RabbitMQ
#
# It fails when fewer than MIN_PASS tests pass (default 60). KEEP=1 keeps
# the work folder with each test's log.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(go list -m -f '{{.Version}}' github.com/rabbitmq/amqp091-go)
src=$(go mod download -json "github.com/rabbitmq/amqp091-go@$version" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
work=$(mktemp -d /tmp/amqp091-suite.XXXXXX)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
cp -r "$src"/. "$work"
chmod -R u+w "$work"

if [ -z "${AMQP_URL:-}" ]; then
	port=${BROKER_PORT:-15673}
	go build -o "$work/wsamqp" .
	"$work/wsamqp" -addr 127.0.0.1:0 -broker-listen "127.0.0.1:$port" >"$work/wsamqp.log" 2>&1 &
	pid=$!
	for _ in $(seq 50); do
		grep -q 'embedded broker listening' "$work/wsamqp.log" && break
		sleep 0.2
	done
	export AMQP_URL="amqp://guest:guest@127.0.0.1:$port/"
fi

cd "$work"
go test -tags integration -c -o suite.test . >/dev/null
pass=0 fail=0 failed=()
for t in $(grep -oE '^func (Test[A-Za-z0-9_]+)' integration_test.go | cut -d' ' -f2); do
	[ "$t" = TestMain ] && continue
	if timeout 60 ./suite.test -test.run "^$t\$" -test.count=1 >"$t.log" 2>&1; then
		pass=$((pass + 1))
	else
		fail=$((fail + 1))
		failed+=("$t")
	fi
done
for t in "${failed[@]}"; do
	echo "FAIL $t: $(grep -m1 -E '_test.go:[0-9]+:' "$t.log" | sed 's/^ *//' | cut -c1-200)"
done
echo "amqp091-go $version integration suite: $pass passed, $fail failed"
# CI holds the embedded broker to this; RabbitMQ passes them all.
[ "$pass" -ge "${MIN_PASS:-60}" ]
