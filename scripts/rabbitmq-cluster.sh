#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, on loopback, from
# Debian's rabbitmq-server package, with no Docker: for the cluster tests
# (cluster_test.go) and for trying failover by hand.
#
#   scripts/rabbitmq-cluster.sh start      # starts and joins three nodes; prints their AMQP URLs
#   scripts/rabbitmq-cluster.sh urls       # prints the URLs, comma-separated
#   scripts/rabbitmq-cluster.sh kill N     # SIGKILL node N's Erlang VM (1, 2 or 3)
#   scripts/rabbitmq-cluster.sh boot N     # starts node N again (it rejoins the cluster)
#   scripts/rabbitmq-cluster.sh stop_app N # stops RabbitMQ on node N politely, the VM staying up
#   scripts/rabbitmq-cluster.sh start_app N
#   scripts/rabbitmq-cluster.sh stop       # stops the nodes and removes their files
#
# Each node has its own name (wsamqpN@localhost), AMQP port (5681-5683),
# distribution port, data, log and pid paths, config (listening on
# 127.0.0.1 only), an empty enabled-plugins file (the system one would bind
# Web-STOMP's ports) and the one Erlang cookie, in the HOME they start
# with. /usr/lib/rabbitmq/bin is called directly: the /usr/sbin wrappers
# switch to the system user and its cookie.
set -euo pipefail

base=${WSAMQP_CLUSTER_DIR:-/tmp/wsamqp-cluster}
bin=/usr/lib/rabbitmq/bin
nodes=(1 2 3)

name() { echo "wsamqp$1@localhost"; }
port() { echo $((5680 + $1)); }

# env sets the environment of node $1 for the command that follows.
env_for() {
	local n=$1 dir=$base/node$1
	export HOME=$base/home
	export RABBITMQ_CONF_ENV_FILE=$dir/rabbitmq-env.conf
	export RABBITMQ_NODENAME=$(name "$n")
	export RABBITMQ_NODE_PORT=$(port "$n")
	export RABBITMQ_DIST_PORT=$((25680 + n))
	export RABBITMQ_MNESIA_BASE=$dir/mnesia
	export RABBITMQ_LOG_BASE=$dir/log
	export RABBITMQ_PID_FILE=$dir/pid
	export RABBITMQ_CONFIG_FILE=$dir/rabbitmq.conf
	export RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins
	export ERL_EPMD_ADDRESS=127.0.0.1
}

ctl() { (env_for "$1" && shift && "$bin/rabbitmqctl" -n "$RABBITMQ_NODENAME" "$@"); }

boot() {
	local n=$1 dir=$base/node$1
	mkdir -p "$dir/mnesia" "$dir/log"
	: >"$dir/rabbitmq-env.conf"
	echo "[]." >"$dir/enabled_plugins"
	printf 'listeners.tcp.1 = 127.0.0.1:%s\nloopback_users = none\n' "$(port "$n")" >"$dir/rabbitmq.conf"
	(env_for "$n" && "$bin/rabbitmq-server" -detached >"$dir/log/start.out" 2>&1)
	for _ in $(seq 120); do
		ctl "$n" await_startup >/dev/null 2>&1 && return 0
		sleep 1
	done
	echo "node $n did not start; see $dir/log" >&2
	return 1
}

urls() {
	local out=()
	for n in "${nodes[@]}"; do out+=("amqp://guest:guest@127.0.0.1:$(port "$n")/"); done
	(IFS=,; echo "${out[*]}")
}

case ${1:-} in
start)
	"$0" stop >/dev/null 2>&1 || true
	mkdir -p "$base/home"
	head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$base/home/.erlang.cookie"
	chmod 400 "$base/home/.erlang.cookie"
	for n in "${nodes[@]}"; do boot "$n" & done
	wait
	for n in 2 3; do
		ctl "$n" stop_app >/dev/null
		ctl "$n" join_cluster "$(name 1)" >/dev/null
		ctl "$n" start_app >/dev/null
	done
	for _ in $(seq 60); do
		running=$(ctl 1 cluster_status --formatter json 2>/dev/null | grep -o '"running_nodes":\[[^]]*\]' | grep -o '@' | wc -l)
		[ "$running" -eq 3 ] && { urls; exit 0; }
		sleep 1
	done
	echo "the cluster did not form" >&2
	exit 1
	;;
urls) urls ;;
kill) kill -9 "$(cat "$base/node$2/pid")" ;;
boot) boot "$2" ;;
stop_app | start_app) ctl "$2" "$1" >/dev/null ;;
stop)
	for n in "${nodes[@]}"; do
		[ -f "$base/node$n/pid" ] && kill -9 "$(cat "$base/node$n/pid")" 2>/dev/null || true
	done
	rm -rf "$base"
	;;
*)
	echo "usage: $0 start|urls|kill N|boot N|stop_app N|start_app N|stop" >&2
	exit 2
	;;
esac
