package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	amqp "github.com/rabbitmq/amqp091-go"
)

// The tests in this file hold the bridge to what production throws at it:
// hostile browsers, a broker that goes away, and a shutdown under load.

func TestFloodIsCutOff(t *testing.T) {
	broker := testBrokers(t)[0]
	cfg := testWSConfig()
	cfg.Rate, cfg.Burst = 10, 20
	tb := startBridge(t, testAMQPConfig(broker.url, testExchange(t, broker)), cfg)
	bystander, flooder := tb.dial(t), tb.dial(t)

	go func() {
		for i := 0; ; i++ {
			if flooder.WriteMessage(websocket.TextMessage, fmt.Appendf(nil, "flood:%d", i)) != nil {
				return
			}
		}
	}()
	expectClose(t, flooder, websocket.ClosePolicyViolation, "too many messages: limit is 10 a second")

	// The bystander is unaffected: what it sends comes back, after
	// whatever of the flood got through before the cut.
	send(t, bystander, "bystander:0")
	bystander.SetReadDeadline(time.Now().Add(waitFor))
	for {
		_, msg, err := bystander.ReadMessage()
		if err != nil {
			t.Fatalf("bystander: %v", err)
		}
		if string(msg) == "bystander:0" {
			break
		}
	}
}

func TestConnectionCap(t *testing.T) {
	broker := testBrokers(t)[0]
	cfg := testWSConfig()
	cfg.MaxConns = 2
	tb := startBridge(t, testAMQPConfig(broker.url, testExchange(t, broker)), cfg)
	tb.dial(t)
	tb.dial(t)
	_, resp, err := websocket.DefaultDialer.Dial(tb.wsURL, nil)
	if resp == nil {
		t.Fatalf("third connection: no response: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "too many connections (limit 2)") {
		t.Errorf("third connection: %d %q, want 503 too many connections", resp.StatusCode, body)
	}
}

func TestVanishedBrowserIsDropped(t *testing.T) {
	broker := testBrokers(t)[0]
	cfg := testWSConfig()
	cfg.PongWait, cfg.WriteWait = 300*time.Millisecond, 100*time.Millisecond
	tb := startBridge(t, testAMQPConfig(broker.url, testExchange(t, broker)), cfg)
	// This client never reads, so it never answers a ping: to the server
	// it is a browser whose network went away without a close frame.
	tb.dial(t)
	poll(t, "the silent browser is dropped", func() bool { return tb.hub.Clients() == 0 })
}

func TestSlowlorisHeaders(t *testing.T) {
	base, _, stop := startRun(t, "-read-header-timeout", "200ms")
	defer stop()
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, "GET / HTTP/1.1\r\nHost: x\r\nX-Slow: "); err != nil {
		t.Fatal(err)
	}
	// The headers never end; the server must hang up on its own.
	conn.SetReadDeadline(time.Now().Add(waitFor))
	if _, err := io.Copy(io.Discard, conn); err != nil {
		t.Fatalf("server kept the half-sent request open: %v", err)
	}
}

func TestCutMidStreamLosesNothing(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		p, url := viaProxy(t, broker.url)
		tb := startBridge(t, testAMQPConfig(url, testExchange(t, broker)), testWSConfig())
		sender, receiver := tb.dial(t), tb.dial(t)

		// A steady flow, paced below the rate limit; the link is cut once
		// the receiver has seen a third of it, and restored at once.
		const n = 300
		go func() {
			tick := time.NewTicker(time.Second / 200)
			defer tick.Stop()
			for i := range n {
				<-tick.C
				if sender.WriteMessage(websocket.TextMessage, fmt.Appendf(nil, "s:%d", i)) != nil {
					return
				}
			}
		}()
		got := receive(t, receiver, n/3)
		p.cut()
		waitHealth(t, tb, http.StatusServiceUnavailable)
		p.restore()
		got = append(got, receive(t, receiver, n-len(got))...)
		checkStreams(t, "receiver", got, map[string]int{"s": n})
	})
}

func TestChannelErrorReconnects(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		exchange := testExchange(t, broker)
		tb := startBridge(t, testAMQPConfig(broker.url, exchange), testWSConfig())
		a := tb.dial(t)
		send(t, a, "a:0")
		receive(t, a, 1)

		// Someone deletes the exchange: the next publish is a 404 channel
		// error, which the plugin answers by reconnecting and declaring its
		// topology again, then publishing what was not confirmed.
		conn, err := amqp.Dial(broker.url)
		must(t, err)
		defer conn.Close()
		ch := openChannel(t, conn)
		must(t, ch.ExchangeDelete(exchange, false, false))

		for i := 1; i <= 20; i++ {
			send(t, a, fmt.Sprintf("a:%d", i))
		}
		got := append([]string{"a:0"}, receive(t, a, 20)...)
		checkStreams(t, "a", got, map[string]int{"a": 21})
	})
}

func TestEmbeddedBrokerRestart(t *testing.T) {
	first := NewBroker(BrokerConfig{})
	addr, err := first.Listen("127.0.0.1:0")
	must(t, err)
	url := "amqp://guest:guest@" + addr.String() + "/"
	tb := startBridge(t, testAMQPConfig(url, "chat"), testWSConfig())
	a, b := tb.dial(t), tb.dial(t)
	send(t, a, "a:0")
	receive(t, b, 1)

	first.Close()
	waitHealth(t, tb, http.StatusServiceUnavailable)
	const n = 30
	for i := 1; i <= n; i++ {
		send(t, a, fmt.Sprintf("a:%d", i))
	}
	second := NewBroker(BrokerConfig{})
	defer second.Close()
	if _, err := second.Listen(addr.String()); err != nil {
		t.Fatalf("listen again on %s: %v", addr, err)
	}
	got := append([]string{"a:0"}, receive(t, b, n)...)
	checkStreams(t, "b", got, map[string]int{"a": n + 1})
}

func TestSecretsStayOutOfHealthz(t *testing.T) {
	broker := testBrokers(t)[0]
	tb := startBridge(t, testAMQPConfig(broker.url, testExchange(t, broker)), testWSConfig())
	resp, err := http.Get(tb.server.URL + "/healthz")
	must(t, err)
	defer resp.Body.Close()
	var health map[string]any
	must(t, json.NewDecoder(resp.Body).Decode(&health))
	for k, v := range health {
		if s := fmt.Sprint(v); strings.Contains(s, "guest") || strings.Contains(s, "amqp://") {
			t.Errorf("/healthz %s = %q shows the broker URL", k, s)
		}
	}
}

// TestProcessHelper is not a test: TestSIGTERMUnderLoad runs the test
// binary again with WSAMQP_PROCESS_ARGS set, and this function then is the
// wsamqp program, run as main would run it.
func TestProcessHelper(t *testing.T) {
	args := os.Getenv("WSAMQP_PROCESS_ARGS")
	if args == "" {
		t.Skip("helper process for TestSIGTERMUnderLoad")
	}
	if err := run(context.Background(), strings.Fields(args), os.Stdout); err != nil {
		fmt.Println("run:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// startProgram runs the wsamqp program in a child process (the test
// binary, as TestProcessHelper) with args, waits until it serves, and
// returns it, its address, and the rest of its output. The test's cleanup
// kills it if it is still running.
func startProgram(t *testing.T, args string) (*exec.Cmd, string, *bufio.Scanner) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestProcessHelper$")
	cmd.Env = append(os.Environ(), "WSAMQP_PROCESS_ARGS=-addr 127.0.0.1:0 "+args)
	stdout, err := cmd.StdoutPipe()
	must(t, err)
	must(t, cmd.Start())
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	lines := bufio.NewScanner(stdout)
	serving := regexp.MustCompile(`msg="serving chat" url=http://(\S+)`)
	for lines.Scan() {
		if m := serving.FindStringSubmatch(lines.Text()); m != nil {
			return cmd, m[1], lines
		}
	}
	t.Fatal("the process ended before serving")
	return nil, "", nil
}

func TestSIGTERMUnderLoad(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		exchange := testExchange(t, broker)
		witness := consumeBodies(t, broker.url, exchange)

		cmd, addr, lines := startProgram(t, "-rate 0 -amqp "+broker.url+" -exchange "+exchange+" -stream "+exchange)
		var log strings.Builder
		logged := make(chan struct{})
		go func() {
			for lines.Scan() {
				log.WriteString(lines.Text() + "\n")
			}
			close(logged)
		}()

		// Browsers publish at a steady 200 messages a second each until the
		// server says goodbye.
		const browsers = 10
		sent := make([]int, browsers)
		closes := make([]error, browsers)
		var wg sync.WaitGroup
		var started sync.WaitGroup
		started.Add(browsers)
		for i := range browsers {
			conn, _, err := websocket.DefaultDialer.Dial("ws://"+addr+"/ws", nil)
			must(t, err)
			defer conn.Close()
			wg.Go(func() { // the reader: answers the close frame and records it
				for {
					if _, _, err := conn.ReadMessage(); err != nil {
						closes[i] = err
						return
					}
				}
			})
			wg.Go(func() { // the writer: counts what the server took
				warmedUp := sync.OnceFunc(started.Done)
				defer warmedUp()
				tick := time.NewTicker(time.Second / 200)
				defer tick.Stop()
				for ; ; sent[i]++ {
					if sent[i] == 100 {
						warmedUp()
					}
					<-tick.C
					if conn.WriteMessage(websocket.TextMessage, fmt.Appendf(nil, "%d:%d", i, sent[i])) != nil {
						return
					}
				}
			})
		}
		started.Wait()
		must(t, cmd.Process.Signal(syscall.SIGTERM))
		wg.Wait()

		exited := make(chan error, 1)
		go func() { <-logged; exited <- cmd.Wait() }()
		select {
		case err := <-exited:
			if err != nil {
				t.Fatalf("process exited with %v\n%s", err, log.String())
			}
		case <-time.After(waitFor):
			t.Fatalf("process still running %s after SIGTERM", waitFor)
		}

		// Every browser got 1001, and every message a browser wrote before
		// that reached the broker, once, in order.
		want := map[string]int{}
		total := 0
		for i, err := range closes {
			var ce *websocket.CloseError
			if !errors.As(err, &ce) || ce.Code != websocket.CloseGoingAway {
				t.Errorf("browser %d ended with %v, want close 1001", i, err)
			}
			want[fmt.Sprint(i)] = sent[i]
			total += sent[i]
		}
		var got []string
		for len(got) < total {
			select {
			case body := <-witness:
				got = append(got, body)
			case <-time.After(waitFor):
				t.Fatalf("the broker got %d of the %d messages the server took\n%s", len(got), total, log.String())
			}
		}
		checkStreams(t, "broker", got, want)
		t.Logf("%d browsers sent %d messages; all reached the broker; exit status 0", browsers, total)
	})
}

func TestOutboxFullAnswers1013(t *testing.T) {
	broker := testBrokers(t)[0]
	p, url := viaProxy(t, broker.url)
	amqpCfg := testAMQPConfig(url, testExchange(t, broker))
	amqpCfg.Outbox = 4
	tb := startBridge(t, amqpCfg, testWSConfig())
	sender, receiver := tb.dial(t), tb.dial(t)

	p.cut()
	waitHealth(t, tb, http.StatusServiceUnavailable)
	for i := range 5 {
		send(t, sender, fmt.Sprintf("s:%d", i))
	}
	// Four wait in the outbox; the fifth is refused, with a reason.
	expectClose(t, sender, websocket.CloseTryAgainLater, "broker unavailable: try again later")

	p.restore()
	checkStreams(t, "receiver", receive(t, receiver, 4), map[string]int{"s": 4})
}

// Given several broker URLs (here two ways to one broker, as a cluster's
// nodes would be), the bridge connects to one, and when that node is
// lost it fails over to another: /healthz goes 503 and back to 200 on the
// other node, the stream is read on from the last offset, nothing is lost
// or doubled, and no browser is disconnected.
func TestFailoverToAnotherNode(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		pa, urlA := viaProxy(t, broker.url)
		pb, urlB := viaProxy(t, broker.url)
		exchange := testExchange(t, broker)
		amqpCfg := testAMQPConfig(urlA+","+urlB, exchange)
		tb := startBridge(t, amqpCfg, testWSConfig())
		talker := tb.dialV1(t, room("f", "history", "0"))
		talker.untilReady(t)
		listener := tb.dialV1(t, room("f", "history", "0"))
		listener.untilReady(t)

		say := func(from, to int) {
			for i := from; i < to; i++ {
				must(t, talker.WriteMessage(websocket.TextMessage, fmt.Appendf(nil, "f:%d", i)))
			}
		}
		say(0, 10)
		node := tb.amqp.Node()
		lost, other := pa, pb
		if node == pb.ln.Addr().String() {
			lost, other = pb, pa
		}
		start := time.Now()
		lost.cut()
		waitHealth(t, tb, http.StatusServiceUnavailable)
		say(10, 20) // accepted while the bridge fails over: they wait in the outbox
		waitHealth(t, tb, http.StatusOK)
		t.Logf("failed over from %s to %s in %v", node, tb.amqp.Node(), time.Since(start).Round(time.Millisecond))
		if tb.amqp.Node() != other.ln.Addr().String() {
			t.Fatalf("on node %s after losing %s, want %s", tb.amqp.Node(), node, other.ln.Addr())
		}
		say(20, 30)
		for _, c := range []*v1Conn{talker, listener} {
			var got []string
			for range 30 {
				line, _ := c.message(t)
				got = append(got, line)
			}
			checkStreams(t, "browser", got, map[string]int{"f": 30})
		}
	})
}
