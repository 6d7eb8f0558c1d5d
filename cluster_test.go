package main

// A RabbitMQ cluster losing a node mid-chat, run when WSAMQP_CLUSTER_URLS
// names the nodes of scripts/rabbitmq-cluster.sh (CI starts one):
//
//	WSAMQP_CLUSTER_URLS=$(scripts/rabbitmq-cluster.sh start) go test -run Cluster -v
//	scripts/rabbitmq-cluster.sh stop

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// clusterNode returns which of the script's nodes (1, 2 or 3) a bridge is
// on, from the AMQP port of its node.
func clusterNode(t *testing.T, tb *testBridge) string {
	t.Helper()
	node := tb.amqp.Node()
	for n := 1; n <= 3; n++ {
		if strings.HasSuffix(node, fmt.Sprint(":", 5680+n)) {
			return fmt.Sprint(n)
		}
	}
	t.Fatalf("bridge on %s, not a node of the cluster script", node)
	return ""
}

// cluster runs scripts/rabbitmq-cluster.sh with args.
func cluster(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("scripts/rabbitmq-cluster.sh", args...).CombinedOutput(); err != nil {
		t.Fatalf("rabbitmq-cluster.sh %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// TestClusterLosesANodeMidChat: two bridges, each given the three nodes and
// on different ones, browsers on both chatting in two rooms at a steady
// rate. The node under one bridge is killed (SIGKILL of its Erlang VM) and
// started again later; then the other bridge's node is stopped politely
// (stop_app) and started again; then the whole cluster restarts. Every
// line reaches every browser of its
// room exactly once and in order per sender, no browser is disconnected,
// /healthz goes 503 and back to 200, and the failover times are printed.
func TestClusterLosesANodeMidChat(t *testing.T) {
	urls := os.Getenv("WSAMQP_CLUSTER_URLS")
	if urls == "" {
		t.Skip("WSAMQP_CLUSTER_URLS is not set: start a cluster with scripts/rabbitmq-cluster.sh start")
	}
	broker := testBroker{name: "cluster", url: splitList(urls)[0]}
	exchange := testExchange(t, broker)
	cfg := testAMQPConfig(urls, exchange)
	one := startBridge(t, cfg, testWSConfig())
	var two *testBridge
	for range 20 { // nodes are shuffled per process: start until they differ
		two = startBridge(t, cfg, testWSConfig())
		if clusterNode(t, two) != clusterNode(t, one) {
			break
		}
		two.bus.Exit()
	}
	if clusterNode(t, two) == clusterNode(t, one) {
		t.Fatal("the two bridges never landed on different nodes")
	}

	// Four browsers, one per bridge and room, each sending a line every
	// 25 ms and reading everything of its room.
	type browser struct {
		name string
		room string
		conn *v1Conn
		mu   sync.Mutex // guards got, sent and err
		got  []string
		sent int
		err  error
	}
	var browsers []*browser
	for _, b := range []struct {
		name string
		tb   *testBridge
	}{{"one", one}, {"two", two}} {
		for _, r := range []string{"north", "south"} {
			c := b.tb.dialV1(t, room(r, "history", "0"))
			c.untilReady(t)
			browsers = append(browsers, &browser{name: b.name + "-" + r, room: r, conn: c})
		}
	}
	stop := make(chan struct{})
	var senders, readers sync.WaitGroup
	for _, b := range browsers {
		senders.Go(func() {
			tick := time.NewTicker(25 * time.Millisecond)
			defer tick.Stop()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				if err := b.conn.WriteMessage(websocket.TextMessage, fmt.Appendf(nil, "%s:%d", b.name, i)); err != nil {
					b.mu.Lock()
					b.err = err
					b.mu.Unlock()
					return
				}
				b.mu.Lock()
				b.sent++
				b.mu.Unlock()
			}
		})
		readers.Go(func() {
			for {
				b.conn.SetReadDeadline(time.Now().Add(2 * time.Minute))
				_, frame, err := b.conn.ReadMessage()
				if err != nil {
					b.mu.Lock()
					b.err = err
					b.mu.Unlock()
					return
				}
				b.mu.Lock()
				for l := range strings.SplitSeq(string(frame), "\n") {
					var line v1Line
					if json.Unmarshal([]byte(l), &line) == nil && line.Offset != nil {
						b.got = append(b.got, line.payload())
					}
				}
				b.mu.Unlock()
			}
		})
	}
	waitLines := func(n int) {
		poll(t, fmt.Sprintf("every browser has %d lines", n), func() bool {
			for _, b := range browsers {
				b.mu.Lock()
				short := len(b.got) < n
				b.mu.Unlock()
				if short {
					return false
				}
			}
			return true
		})
	}
	// lost counts, per bridge, the times its link went down (/healthz 503
	// from then until it is back): read from its bus's log, so that no
	// drop is missed between two polls.
	var lostMu sync.Mutex // guards lost
	lost := map[*testBridge]int{}
	for _, tb := range []*testBridge{one, two} {
		tb.bus.Subscribe(ChannelLog, "cluster-test", DefaultPriority, func(args ...any) (any, error) {
			if msg, _, _ := logArgs(args); msg == "amqp connection lost; reconnecting" {
				lostMu.Lock()
				lost[tb]++
				lostMu.Unlock()
			}
			return nil, nil
		})
	}
	drops := func(tb *testBridge) int {
		lostMu.Lock()
		defer lostMu.Unlock()
		return lost[tb]
	}
	// settled waits until tb has been up on one node for a second: after a
	// node comes back, the stream's leader may move, and a bridge with it.
	settled := func(tb *testBridge) string {
		node, since := "", time.Now()
		poll(t, "the bridge stays on one node for a second", func() bool {
			if healthStatus(t, tb) != http.StatusOK || clusterNode(t, tb) != node {
				node, since = clusterNode(t, tb), time.Now()
			}
			return healthStatus(t, tb) == http.StatusOK && time.Since(since) > time.Second
		})
		return node
	}
	failover := func(tb *testBridge, what string, act func()) {
		before, start := drops(tb), time.Now()
		act()
		for deadline := time.Now().Add(2 * time.Minute); drops(tb) == before || healthStatus(t, tb) != http.StatusOK; {
			if time.Now().After(deadline) {
				t.Fatalf("%s: the bridge did not lose its link and come back (%d drops)", what, drops(tb)-before)
			}
			time.Sleep(20 * time.Millisecond) // polling interval
		}
		t.Logf("%s: /healthz 503, then 200 on node %s after %v", what, tb.amqp.Node(), time.Since(start).Round(time.Millisecond))
	}

	waitLines(20)
	killed := settled(one)
	failover(one, "node "+killed+" killed (SIGKILL)", func() { cluster(t, "kill", killed) })
	waitLines(60)
	cluster(t, "boot", killed)
	stopped := settled(two)
	failover(two, "node "+stopped+" stopped (stop_app)", func() { cluster(t, "stop_app", stopped) })
	waitLines(100)
	cluster(t, "start_app", stopped)

	// The whole cluster restarts: both bridges wait (503) with what their
	// browsers send in the outbox, and carry on from their offsets.
	start := time.Now()
	for _, n := range []string{"1", "2", "3"} {
		cluster(t, "stop_app", n)
	}
	waitHealth(t, one, http.StatusServiceUnavailable)
	waitHealth(t, two, http.StatusServiceUnavailable)
	// The node that stopped last starts first: the others wait for it.
	for _, n := range []string{"3", "2", "1"} {
		cluster(t, "start_app", n)
	}
	for _, tb := range []*testBridge{one, two} {
		for deadline := time.Now().Add(2 * time.Minute); healthStatus(t, tb) != http.StatusOK; {
			if time.Now().After(deadline) {
				t.Fatal("a bridge never came back after the cluster restarted")
			}
			time.Sleep(20 * time.Millisecond) // polling interval
		}
	}
	t.Logf("whole cluster restarted: both bridges publishing again after %v", time.Since(start).Round(time.Millisecond))
	waitLines(140)

	close(stop)
	senders.Wait()
	sent := map[string]map[string]int{} // room -> sender -> lines
	for _, b := range browsers {
		if b.err != nil {
			t.Fatalf("%s's connection broke while sending: %v", b.name, b.err)
		}
		if sent[b.room] == nil {
			sent[b.room] = map[string]int{}
		}
		sent[b.room][b.name] = b.sent
	}
	poll(t, "every line reached every browser of its room", func() bool {
		for _, b := range browsers {
			want := 0
			for _, n := range sent[b.room] {
				want += n
			}
			b.mu.Lock()
			short := len(b.got) < want
			b.mu.Unlock()
			if short {
				return false
			}
		}
		return true
	})
	for _, b := range browsers {
		b.mu.Lock()
		if b.err != nil {
			t.Errorf("%s was disconnected: %v", b.name, b.err)
		}
		checkStreams(t, b.name, b.got, sent[b.room])
		b.mu.Unlock()
		b.conn.Close()
	}
	readers.Wait()
}
