package main

// Regression tests for the bridge tried as an attacker would: bad flags,
// secrets in errors, forged message ids, floods and bursts, a broker that
// stops reading, and hosts that are not ours. Each names what it guards.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	amqp "github.com/rabbitmq/amqp091-go"
)

// Every limit is checked at start: a bad value stops the program with a
// message naming the flag, and exit status 2.
func TestFlagsAreValidated(t *testing.T) {
	t.Setenv("AMQP_URL", "")
	for _, tc := range []struct {
		args []string
		flag string
	}{
		{[]string{"-max-backoff", "0"}, "-max-backoff"},
		{[]string{"-pong-wait", "0"}, "-pong-wait"},
		{[]string{"-pong-wait", "15s", "-write-wait", "10s"}, "-pong-wait"},
		{[]string{"-outbox", "-1"}, "-outbox"},
		{[]string{"-send-queue", "-1"}, "-send-queue"},
		{[]string{"-send-queue-bytes", "1000", "-max-message", "2000"}, "-send-queue-bytes"},
		{[]string{"-burst", "0"}, "-burst"},
		{[]string{"-prefetch", "0"}, "-prefetch"},
		{[]string{"-prefetch", "65536"}, "-prefetch"},
		{[]string{"-queue-expires", "600h"}, "-queue-expires"},
		{[]string{"-rate", "-1"}, "-rate"},
		{[]string{"-rate", "NaN"}, "-rate"},
		{[]string{"-max-conns", "0"}, "-max-conns"},
		{[]string{"-broker-max-memory", "10"}, "-broker-max-memory"},
		{[]string{"-amqp", "amqp://localhost/", "-broker-listen", "127.0.0.1:0"}, "-broker-listen"},
		{[]string{"-broker-listen", "0.0.0.0:5673"}, "-broker-listen"},
		{[]string{"-addr", ":8888"}, "-hosts"},
		{[]string{"-addr", "nonsense"}, "-addr"},
		{[]string{"-origin", "chat.example.com"}, "-origin"},
		{[]string{"-exchange", ""}, "-exchange"},
		{[]string{"-amqp", "http://localhost/"}, "-amqp"},
		{[]string{"-no-such-flag"}, "-no-such-flag"},
	} {
		_, err := parseFlags(tc.args, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.flag) || exitStatus(err) != 2 {
			t.Errorf("%q: %v (exit status %d), want an error naming %s, exit status 2", tc.args, err, exitStatus(err), tc.flag)
		}
	}
	for _, ok := range [][]string{
		nil,
		{"-rate", "0"},
		{"-addr", ":8888", "-hosts", "chat.example.com"},
		{"-addr", "[::1]:0"},
		{"-broker-listen", "0.0.0.0:5673", "-broker-user", "alice", "-broker-password", "s3cret"},
	} {
		if _, err := parseFlags(ok, io.Discard); err != nil {
			t.Errorf("%q: %v, want no error", ok, err)
		}
	}
}

// A password with "#", "/", "?", "%" or "[" makes the URL unparsable;
// the URL is then never printed, in the error or in the log.
func TestUnparsableURLNeverShowsItsPassword(t *testing.T) {
	for _, password := range []string{"pa#ss", "pa/ss", "pa?ss", "pa%zzss", "pa[ss"} {
		u := "amqp://user:" + password + "@127.0.0.1:1/"
		for _, fromEnv := range []bool{false, true} {
			args := []string{"-addr", "127.0.0.1:0", "-amqp", u}
			if fromEnv {
				t.Setenv("AMQP_URL", u)
				args = args[:2]
			}
			out := &syncBuffer{}
			err := run(context.Background(), args, out)
			if err == nil {
				t.Fatalf("%q: run succeeded", password)
			}
			for _, text := range []string{err.Error(), out.String(), RedactURL(u)} {
				if strings.Contains(text, password) || strings.Contains(text, "ss@") {
					t.Errorf("password %q shown: %q", password, text)
				}
			}
		}
	}
}

// A page on another site whose name resolves to 127.0.0.1 (DNS
// rebinding) reaches the server with its own name in Host: refused.
func TestOnlyOurHostNamesAreServed(t *testing.T) {
	base, _, stop := startRun(t)
	defer stop()
	for host, want := range map[string]int{
		"":                   http.StatusOK,
		"localhost":          http.StatusOK,
		"127.0.0.1":          http.StatusOK,
		"evil.example":       http.StatusMisdirectedRequest,
		"evil.example:8888":  http.StatusMisdirectedRequest,
		"127.0.0.1.nip.io":   http.StatusMisdirectedRequest,
		"localhost.evil.com": http.StatusMisdirectedRequest,
	} {
		req, _ := http.NewRequest("GET", base+"/", nil)
		if host != "" {
			req.Host = host
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("Host %q: %d, want %d", host, resp.StatusCode, want)
		}
	}
}

// Request headers are bounded: half-sent megabyte headers cost nothing.
func TestLargeHeadersAreRefused(t *testing.T) {
	base, _, stop := startRun(t)
	defer stop()
	req, _ := http.NewRequest("GET", base+"/", nil)
	req.Header.Set("X-Big", strings.Repeat("x", 64<<10))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Fatalf("64 KiB header: %d, want 431", resp.StatusCode)
	}
}

// One address cannot hold every connection.
func TestConnectionsPerAddressAreCapped(t *testing.T) {
	broker := testBrokers(t)[0]
	cfg := testWSConfig()
	cfg.MaxConnsPerIP = 2
	tb := startBridge(t, testAMQPConfig(broker.url, testExchange(t, broker)), cfg)
	tb.dial(t)
	tb.dial(t)
	_, resp, err := websocket.DefaultDialer.Dial(tb.wsURL, nil)
	if err == nil || resp == nil || resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("third connection from one address: %v %v, want 429", resp, err)
	}
}

// Pings cost a pong each: they count against the rate limit.
func TestPingFloodIsCutOff(t *testing.T) {
	broker := testBrokers(t)[0]
	cfg := testWSConfig()
	cfg.Rate, cfg.Burst = 10, 20
	tb := startBridge(t, testAMQPConfig(broker.url, testExchange(t, broker)), cfg)
	conn := tb.dial(t)
	go func() {
		for {
			if conn.WriteControl(websocket.PingMessage, nil, time.Now().Add(time.Second)) != nil {
				return
			}
		}
	}()
	expectClose(t, conn, websocket.ClosePolicyViolation, "too many messages")
}

// Lines that repeat are let through logBurst at a time, then one a
// second with the count of those dropped.
func TestRepeatedLogLinesAreLimited(t *testing.T) {
	var out bytes.Buffer
	h := newLimitedHandler(slog.NewTextHandler(&out, nil))
	start := time.Now()
	for i := range 50_000 {
		r := slog.NewRecord(start.Add(time.Duration(i)*time.Microsecond), slog.LevelError, "bad message from the broker", 0)
		must(t, h.Handle(context.Background(), r))
	}
	if n := strings.Count(out.String(), "\n"); n != logBurst {
		t.Fatalf("50,000 identical lines in 50 ms wrote %d, want %d", n, logBurst)
	}
	out.Reset()
	r := slog.NewRecord(start.Add(2*time.Second), slog.LevelError, "bad message from the broker", 0)
	must(t, h.Handle(context.Background(), r))
	if !strings.Contains(out.String(), fmt.Sprintf("suppressed=%d", 50_000-logBurst)) {
		t.Fatalf("the next line let through: %q, want the count of those suppressed", out.String())
	}
	// Another message has its own allowance.
	out.Reset()
	must(t, h.Handle(context.Background(), slog.NewRecord(start, slog.LevelInfo, "something else", 0)))
	if out.Len() == 0 {
		t.Fatal("a different message was suppressed")
	}
}

func TestDedupe(t *testing.T) {
	d := newDedupe()
	see := func(id, body string) bool { return d.duplicate(id, []byte(body)) }
	for i := 1; i <= 5; i++ {
		if see(fmt.Sprintf("p-%x", i), fmt.Sprint("line ", i)) {
			t.Fatalf("first copy of %d taken for a duplicate", i)
		}
	}
	if !see("p-3", "line 3") || !see("p-5", "line 5") {
		t.Error("republished copies are not duplicates")
	}
	// Forged future ids with other bodies do not censor the real lines.
	for i := 6; i <= 8; i++ {
		if see(fmt.Sprintf("p-%x", i), "forged") {
			t.Errorf("forged %d taken for a duplicate", i)
		}
	}
	for i := 6; i <= 8; i++ {
		if see(fmt.Sprintf("p-%x", i), fmt.Sprint("line ", i)) {
			t.Errorf("real line %d after a forgery dropped", i)
		}
		if !see(fmt.Sprintf("p-%x", i), fmt.Sprint("line ", i)) {
			t.Errorf("second copy of real line %d delivered", i)
		}
	}
	// A lost message leaves a gap; once enough arrive past it, it is
	// skipped, and duplicates are still dropped.
	for i := 10; i < 10+dedupeAhead+2; i++ {
		if see(fmt.Sprintf("p-%x", i), fmt.Sprint("line ", i)) {
			t.Fatalf("line %d after a gap dropped", i)
		}
	}
	if !see("p-a", "line 10") {
		t.Error("a copy after the gap was skipped is not a duplicate")
	}
	// Ids that are not wsamqp's are never duplicates.
	for _, id := range []string{"", "x", "p-", "p-zz!", "-1"} {
		first, again := see(id, "x"), see(id, "x")
		if first || again {
			t.Errorf("id %q taken for a duplicate", id)
		}
	}
}

// Anyone who may publish to the exchange can pre-publish the bridge's
// next message ids; the real lines must still reach every browser, and a
// real republished copy must still be dropped.
func TestForgedIDsCannotCensor(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		exchange := testExchange(t, broker)
		tb := startBridge(t, testAMQPConfig(broker.url, exchange), testWSConfig())
		browser := tb.dial(t)
		witness := consume(t, broker.url, exchange)

		send(t, browser, "first")
		receive(t, browser, 1)
		first := <-witness
		producer := first.MessageId[:strings.LastIndexByte(first.MessageId, '-')]

		conn := dialURL(t, broker.url)
		ch := openChannel(t, conn)
		for i := 2; i <= 6; i++ {
			must(t, ch.Publish(exchange, "", false, false, amqp.Publishing{
				AppId: "wsamqp", MessageId: fmt.Sprintf("%s-%x", producer, i), Body: []byte("forged"),
			}))
		}
		if got := receive(t, browser, 5); got[0] != "forged" {
			t.Fatalf("forged lines: %q", got)
		}
		for i := range 5 {
			send(t, browser, fmt.Sprint("real:", i))
		}
		checkStreams(t, "browser", receive(t, browser, 5), map[string]int{"real": 5})

		// The real first line, published again as a lost confirm would
		// make the bridge do, is dropped; a line after it arrives alone.
		must(t, ch.Publish(exchange, "", false, false, amqp.Publishing{AppId: "wsamqp", MessageId: first.MessageId, Body: first.Body}))
		send(t, browser, "last")
		if got := receive(t, browser, 1)[0]; got != "last" {
			t.Fatalf("after a republished copy: %q, want last", got)
		}
	})
}

// A burst from many browsers fills the outbox while the broker is up:
// senders wait, and nobody, the quiet browser least of all, is closed.
func TestBurstsDoNotCloseInnocentBrowsers(t *testing.T) {
	broker := testBrokers(t)[0]
	amqpCfg := testAMQPConfig(broker.url, testExchange(t, broker))
	amqpCfg.Outbox = 8
	wsCfg := testWSConfig()
	wsCfg.Rate, wsCfg.Burst = 1, 50
	tb := startBridge(t, amqpCfg, wsCfg)
	const senders, burst = 40, 50
	conns := make([]*websocket.Conn, senders)
	for i := range conns {
		conns[i] = tb.dial(t)
	}
	quiet, listener := tb.dial(t), tb.dial(t)

	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Go(func() {
			for j := range burst {
				if err := c.WriteMessage(websocket.TextMessage, fmt.Appendf(nil, "s%d:%d", i, j)); err != nil {
					t.Errorf("sender %d: %v", i, err)
					return
				}
			}
		})
	}
	send(t, quiet, "quiet:0")
	wg.Wait()
	want := map[string]int{"quiet": 1}
	for i := range senders {
		want[fmt.Sprint("s", i)] = burst
	}
	checkStreams(t, "listener", receive(t, listener, senders*burst+1), want)
	if n := tb.hub.Clients(); n != senders+2 {
		t.Fatalf("%d browsers connected after the bursts, want %d", n, senders+2)
	}
}

// A broker that stops reading (RabbitMQ does, to a blocked connection)
// does not hold the shutdown past -drain-timeout, and what it never
// confirmed makes the exit say so.
func TestDrainTimeoutHoldsWhenTheBrokerStopsReading(t *testing.T) {
	broker := testBrokers(t)[0]
	p, url := viaProxy(t, broker.url)
	amqpCfg := testAMQPConfig(url, testExchange(t, broker))
	amqpCfg.DrainTimeout = time.Second
	wsCfg := testWSConfig()
	wsCfg.Rate, wsCfg.CloseTimeout = 0, time.Second
	tb := startBridge(t, amqpCfg, wsCfg)
	sender := tb.dial(t)

	p.stall(t)
	big := strings.Repeat("x", 60<<10)
	for i := range 300 { // 18 MB: more than the sockets on the way hold
		if err := sender.WriteMessage(websocket.TextMessage, []byte(fmt.Sprint(i, big))); err != nil {
			break
		}
	}
	exited := make(chan error, 1)
	go func() {
		tb.bus.Exit()
		exited <- tb.bus.Block(10 * time.Millisecond)
	}()
	// The shutdown is bounded by what the flags say, not by the broker:
	// browsers' leave, the drain, a close handshake, and slack for a busy
	// machine. (Without the bound, AMQP heartbeats end it after 15 s or so.)
	bound := wsCfg.CloseTimeout + amqpCfg.DrainTimeout + closeWait + 3*time.Second
	select {
	case err := <-exited:
		if !errors.Is(err, ErrExit) || !strings.Contains(err.Error(), "not confirmed") {
			t.Fatalf("exit: %v, want ErrExit saying what was not confirmed", err)
		}
		t.Logf("exit: %v", err)
	case <-time.After(bound):
		t.Fatalf("shutdown still waiting on a broker that does not read after %v", bound)
	}
}

// In a quiet room nothing stays unacknowledged (RabbitMQ's
// consumer_timeout would close the channel after 30 minutes).
func TestQuietRoomLeavesNothingUnacknowledged(t *testing.T) {
	b := newTestBroker(t, BrokerConfig{})
	addr, err := b.Listen("127.0.0.1:0")
	must(t, err)
	url := "amqp://guest:guest@" + addr.String() + "/"
	tb := startBridge(t, testAMQPConfig(url, "quiet"), testWSConfig())
	conn := tb.dial(t)
	for i := range 3 {
		send(t, conn, fmt.Sprint("q:", i))
	}
	receive(t, conn, 3)
	poll(t, "every delivery is acknowledged", func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		for c := range b.conns {
			for _, ch := range c.channels {
				if len(ch.unacked) > 0 {
					return false
				}
			}
		}
		return true
	})
}

// A pong written by the reader must not move the writer's deadline in the
// middle of a write: the write still times out at its own deadline.
func TestPongDoesNotMoveTheWritersDeadline(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	defer ln.Close()
	peer, err := net.Dial("tcp", ln.Addr().String())
	must(t, err)
	defer peer.Close() // it never reads
	nc, err := ln.Accept()
	must(t, err)
	c := &lockedConn{Conn: nc}
	defer c.Close()

	wrote := make(chan error, 1)
	go func() { wrote <- c.writeFrames([][]byte{make([]byte, 64<<20)}, 300*time.Millisecond) }()
	// What gorilla does to write a pong meanwhile.
	go func() {
		c.SetWriteDeadline(time.Now().Add(time.Hour))
		c.Write([]byte{0x8A, 0})
	}()
	select {
	case err := <-wrote:
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("write to a peer that does not read: %v, want a timeout", err)
		}
	case <-time.After(waitFor):
		t.Fatal("the writer's deadline was moved by the pong")
	}
}
