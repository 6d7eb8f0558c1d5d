package main

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	neturl "net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/testcontainers/testcontainers-go"
	tcrabbitmq "github.com/testcontainers/testcontainers-go/modules/rabbitmq"
)

// waitFor bounds every wait on the network in these tests. Nothing waits
// this long unless something is broken.
const waitFor = 20 * time.Second

// testBroker is an AMQP broker the integration tests can use.
type testBroker struct {
	name string
	url  string
	why  string // when set, the broker was expected but cannot be used: the subtest fails with this
}

var (
	embeddedOnce sync.Once
	embeddedURL  string // the embedded broker shared by the tests, over TCP

	rabbitOnce sync.Once
	rabbits    []testBroker // RabbitMQ at AMQP_URL and in a container, as far as each can be had

	containerMu sync.Mutex               // guards container
	container   testcontainers.Container // the RabbitMQ container, if one was started
)

// rabbitImageEnv names the image the container path runs; CI points it at
// one built from Debian's packages (scripts/rabbitmq-image.sh).
const (
	rabbitImageEnv     = "WSAMQP_RABBITMQ_IMAGE"
	defaultRabbitImage = "rabbitmq:4-alpine"
)

// testBrokers returns every broker the tests run against: the embedded
// broker always; RabbitMQ at AMQP_URL when it is set; and RabbitMQ in a
// container through testcontainers when a Docker engine answers. The same
// test bodies run against each, so the embedded broker is held to
// RabbitMQ's behaviour, and each path a user may take is exercised.
func testBrokers(t testing.TB) []testBroker {
	t.Helper()
	embeddedOnce.Do(func() {
		addr, err := NewBroker(BrokerConfig{}).Listen("127.0.0.1:0")
		if err != nil {
			panic(err)
		}
		embeddedURL = "amqp://guest:guest@" + addr.String() + "/"
	})
	rabbitOnce.Do(func() { rabbits = findRabbitMQ() })
	brokers := []testBroker{{name: "embedded", url: embeddedURL}}
	for _, r := range rabbits {
		if r.name == "" {
			t.Logf("RabbitMQ subtests not run: %s", r.why)
			continue
		}
		brokers = append(brokers, r)
	}
	return brokers
}

// findRabbitMQ returns RabbitMQ at AMQP_URL (subtest "rabbitmq") and in a
// container (subtest "container") when a Docker engine answers. An entry
// with no name says why a broker is not there; one with a name and a why
// was started and cannot be used, which fails its subtests.
func findRabbitMQ() []testBroker {
	var found []testBroker
	if u := os.Getenv("AMQP_URL"); u != "" {
		found = append(found, testBroker{name: "rabbitmq", url: u})
	}
	if os.Getenv("WSAMQP_NO_CONTAINER") != "" {
		return append(found, testBroker{why: "WSAMQP_NO_CONTAINER is set"})
	}
	if err := dockerAnswers(); err != nil {
		return append(found, testBroker{why: fmt.Sprintf("no Docker engine answers (%v)", err)})
	}
	return append(found, startRabbitContainer())
}

// dockerAnswers checks, within a time bound, that a Docker engine answers:
// a socket that accepts but never answers would hang the provider check.
func dockerAnswers() error {
	healthy := make(chan error, 1)
	go func() {
		defer func() {
			if r := recover(); r != nil {
				healthy <- fmt.Errorf("docker provider panicked: %v", r)
			}
		}()
		p, err := testcontainers.NewDockerProvider()
		if err != nil {
			healthy <- err
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		healthy <- p.Health(ctx)
	}()
	select {
	case err := <-healthy:
		return err
	case <-time.After(10 * time.Second):
		return errors.New("the engine did not answer within 10s")
	}
}

// startRabbitContainer runs RabbitMQ in a container and checks that it
// can be reached. Whatever goes wrong is said in one line naming what to
// change, rather than as a dial error deep in every subtest.
func startRabbitContainer() testBroker {
	image := cmp.Or(os.Getenv(rabbitImageEnv), defaultRabbitImage)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := tcrabbitmq.Run(ctx, image, testcontainers.WithLabels(map[string]string{"wsamqp.test": "1"}))
	if c != nil {
		containerMu.Lock()
		container = c
		containerMu.Unlock()
	}
	if err != nil {
		// No image to be had (no registry, say) is this machine's lot, not
		// a failure: the subtests are not run, and the log says how to
		// get an image. CI checks that the path ran.
		return testBroker{why: fmt.Sprintf("RabbitMQ container (image %s, from %s) did not start: %v; scripts/rabbitmq-image.sh builds an image from Debian's packages", image, rabbitImageEnv, err)}
	}
	u, err := c.AmqpURL(ctx)
	if err != nil {
		return testBroker{name: "container", why: fmt.Sprintf("RabbitMQ container has no AMQP URL: %v", err)}
	}
	// The container may be up while the address testcontainers chose is
	// not reachable from here: inside a container of its own (/.dockerenv),
	// testcontainers dials the default gateway. That case is said without
	// dialing; any other is dialed once (the container logged that it is
	// ready, so there is nothing to wait for).
	unreachable := func(err error) testBroker {
		return testBroker{name: "container", why: fmt.Sprintf("RabbitMQ container started, but %s is not reachable from here (%v); set TESTCONTAINERS_HOST_OVERRIDE=127.0.0.1 (or another address of this machine that reaches the container's published ports)", RedactURL(u), err)}
	}
	host, _ := c.Host(ctx)
	if ip := net.ParseIP(host); ip != nil && !ip.IsLoopback() && os.Getenv("TESTCONTAINERS_HOST_OVERRIDE") == "" {
		if _, err := os.Stat("/.dockerenv"); err == nil {
			return unreachable(fmt.Errorf("this machine has /.dockerenv, so testcontainers took the default gateway %s for the Docker host", host))
		}
	}
	conn, err := amqp.DialConfig(u, amqp.Config{Dial: amqp.DefaultDial(5 * time.Second)})
	if err != nil {
		return unreachable(err)
	}
	conn.Close()
	return testBroker{name: "container", url: u}
}

// stopRabbitContainer removes the container, if one was started: the
// reaper (Ryuk) does this when it runs, but it may be disabled
// (TESTCONTAINERS_RYUK_DISABLED=true) where its image cannot be had.
func stopRabbitContainer() {
	containerMu.Lock()
	defer containerMu.Unlock()
	if container != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		testcontainers.TerminateContainer(container, testcontainers.StopContext(ctx))
		container = nil
	}
}

// TestMain removes the RabbitMQ container, if the tests started one, once
// they have all run.
func TestMain(m *testing.M) {
	code := m.Run()
	stopRabbitContainer()
	os.Exit(code)
}

// forEachBroker runs test once per broker, as a subtest named after it.
func forEachBroker(t *testing.T, test func(t *testing.T, broker testBroker)) {
	for _, broker := range testBrokers(t) {
		t.Run(broker.name, func(t *testing.T) {
			if broker.why != "" {
				t.Fatal(broker.why)
			}
			test(t, broker)
		})
	}
}

// testExchange returns an exchange name no other test run uses, since
// the RabbitMQ on a machine is shared, and deletes it after the test.
func testExchange(t testing.TB, broker testBroker) string {
	t.Helper()
	b := make([]byte, 6)
	rand.Read(b)
	name := "wsamqp-test-" + hex.EncodeToString(b)
	t.Cleanup(func() {
		conn, err := amqp.Dial(broker.url)
		if err != nil {
			return
		}
		defer conn.Close()
		if ch, err := conn.Channel(); err == nil {
			ch.ExchangeDelete(name, false, false)
			ch.QueueDelete(name, false, false, false) // the bridge's stream, named after the exchange
		}
	})
	return name
}

// testWSConfig is the hub configuration of the tests: the defaults of
// the flags, shortened where a test would otherwise wait on them.
func testWSConfig() WSConfig {
	cfg, err := parseFlags(nil, io.Discard)
	if err != nil {
		panic(err)
	}
	ws := cfg.ws
	ws.MaxConns = 100
	ws.WriteWait, ws.PongWait = 5*time.Second, 30*time.Second
	return ws
}

// testAMQPConfig is the AMQP configuration of the tests.
func testAMQPConfig(url, exchange string) AMQPConfig {
	cfg, err := parseFlags(nil, io.Discard)
	if err != nil {
		panic(err)
	}
	a := cfg.amqp
	a.URL, a.Exchange, a.Stream = url, exchange, exchange // queues and exchanges have names of their own
	a.MaxBackoff, a.DrainTimeout = 200*time.Millisecond, 5*time.Second
	a.StreamWait = 200 * time.Millisecond // the tests' streams start empty: no need to wait long to see it
	return a
}

// testBridge is a started bridge behind an httptest server.
type testBridge struct {
	*bridge
	server *httptest.Server
	wsURL  string
}

// startBridge starts a bridge on its own bus and serves it; the test's
// cleanup exits the bus and checks that the bridge left nothing behind.
func startBridge(t *testing.T, amqpCfg AMQPConfig, wsCfg WSConfig) *testBridge {
	t.Helper()
	b := NewBus(slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})))
	br := newBridge(b, amqpCfg, wsCfg)
	server := httptest.NewServer(br.handler)
	if err := b.Start(); err != nil {
		server.Close()
		t.Fatalf("bus start: %v", err)
	}
	t.Cleanup(func() {
		b.Exit()
		server.Close()
	})
	return &testBridge{bridge: br, server: server, wsURL: "ws" + strings.TrimPrefix(server.URL, "http") + "/ws"}
}

// dial connects a WebSocket client to tb. Once Dial returns, the client
// sees every message broadcast from then on.
func (tb *testBridge) dial(t *testing.T) *websocket.Conn {
	t.Helper()
	conn, _, err := websocket.DefaultDialer.Dial(tb.wsURL, nil)
	if err != nil {
		t.Fatalf("dial %s: %v", tb.wsURL, err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// poll checks cond until it holds, or fails the test after waitFor.
func poll(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up after %s waiting until %s", waitFor, what)
		}
		time.Sleep(5 * time.Millisecond) // polling interval, not a wait for an event
	}
}

// send writes one text message.
func send(t *testing.T, conn *websocket.Conn, msg string) {
	t.Helper()
	if err := conn.WriteMessage(websocket.TextMessage, []byte(msg)); err != nil {
		t.Fatalf("send %q: %v", msg, err)
	}
}

// receive reads n text messages, failing the test if they do not come.
func receive(t *testing.T, conn *websocket.Conn, n int) []string {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(waitFor))
	defer conn.SetReadDeadline(time.Time{})
	got := make([]string, 0, n)
	for len(got) < n {
		_, msg, err := conn.ReadMessage()
		if err != nil {
			t.Fatalf("after %d of %d messages: %v", len(got), n, err)
		}
		got = append(got, string(msg))
	}
	return got
}

// checkStreams checks that got holds every message of each sender exactly
// once and in the order it was sent. Senders' lines are "sender:seq".
func checkStreams(t *testing.T, who string, got []string, perSender map[string]int) {
	t.Helper()
	next := map[string]int{}
	for _, m := range got {
		sender, seq, ok := strings.Cut(m, ":")
		if !ok {
			t.Errorf("%s got stray message %q", who, m)
			continue
		}
		if want := fmt.Sprint(next[sender]); seq != want {
			t.Errorf("%s got %s, want %s:%s (lost, duplicated or reordered)", who, m, sender, want)
		}
		next[sender]++
	}
	for sender, n := range perSender {
		if next[sender] != n {
			t.Errorf("%s got %d messages from %s, want %d", who, next[sender], sender, n)
		}
	}
}

// expectClose reads until the server closes conn and checks its code and
// reason.
func expectClose(t *testing.T, conn *websocket.Conn, code int, reason string) {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(waitFor))
	for {
		_, _, err := conn.ReadMessage()
		if err == nil {
			continue
		}
		var ce *websocket.CloseError
		if !errors.As(err, &ce) {
			t.Fatalf("want close %d %q, got %v", code, reason, err)
		}
		if ce.Code != code || !strings.Contains(ce.Text, reason) {
			t.Fatalf("closed with %d %q, want %d %q", ce.Code, ce.Text, code, reason)
		}
		return
	}
}

func TestRoundTrip(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		tb := startBridge(t, testAMQPConfig(broker.url, testExchange(t, broker)), testWSConfig())
		a, b := tb.dial(t), tb.dial(t)

		// Both talk at once; each sees its own lines and the other's,
		// once each, in the order each was sent.
		const n = 200
		var wg sync.WaitGroup
		for name, conn := range map[string]*websocket.Conn{"a": a, "b": b} {
			wg.Go(func() {
				for i := range n {
					if err := conn.WriteMessage(websocket.TextMessage, fmt.Appendf(nil, "%s:%d", name, i)); err != nil {
						t.Errorf("%s send: %v", name, err)
						return
					}
				}
			})
		}
		gotA, gotB := receive(t, a, 2*n), receive(t, b, 2*n)
		wg.Wait()
		checkStreams(t, "a", gotA, map[string]int{"a": n, "b": n})
		checkStreams(t, "b", gotB, map[string]int{"a": n, "b": n})
	})
}

func TestNewBrowserMissesNothingAfterOpen(t *testing.T) {
	broker := testBrokers(t)[0]
	tb := startBridge(t, testAMQPConfig(broker.url, testExchange(t, broker)), testWSConfig())
	talker := tb.dial(t)
	// The hub takes a browser in before it answers the handshake, so a line
	// sent the moment the newcomer's Dial returns reaches it.
	for i := range 30 {
		newcomer := tb.dial(t)
		send(t, talker, fmt.Sprintf("talker:%d", i))
		if got := receive(t, newcomer, 1)[0]; got != fmt.Sprintf("talker:%d", i) {
			t.Fatalf("newcomer %d got %q", i, got)
		}
		receive(t, talker, 1)
		newcomer.Close()
	}
}

func TestTwoBridgesShareTheExchange(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		exchange := testExchange(t, broker)
		one := startBridge(t, testAMQPConfig(broker.url, exchange), testWSConfig())
		two := startBridge(t, testAMQPConfig(broker.url, exchange), testWSConfig())
		a, b := one.dial(t), two.dial(t)

		send(t, a, "a:0")
		send(t, b, "b:0")
		send(t, a, "a:1")
		for name, conn := range map[string]*websocket.Conn{"a": a, "b": b} {
			checkStreams(t, name, receive(t, conn, 3), map[string]int{"a": 2, "b": 1})
		}
	})
}

func TestBadInputClosesOnlyItsSender(t *testing.T) {
	broker := testBrokers(t)[0]
	tests := []struct {
		name   string
		kind   int
		msg    []byte
		code   int
		reason string
	}{
		{"too big", websocket.TextMessage, []byte(strings.Repeat("x", 64<<10+1)), websocket.CloseMessageTooBig, "message too big: limit is 65536 bytes"},
		{"not UTF-8", websocket.TextMessage, []byte("caf\xe9"), websocket.CloseInvalidFramePayloadData, "not valid UTF-8"},
		{"binary", websocket.BinaryMessage, []byte{0, 1, 2}, websocket.CloseUnsupportedData, "binary messages are not supported"},
	}
	tb := startBridge(t, testAMQPConfig(broker.url, testExchange(t, broker)), testWSConfig())
	bystander := tb.dial(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			offender := tb.dial(t)
			if err := offender.WriteMessage(tt.kind, tt.msg); err != nil {
				t.Fatal(err)
			}
			expectClose(t, offender, tt.code, tt.reason)

			// Everyone else carries on.
			send(t, bystander, "bystander:"+tt.name)
			if got := receive(t, bystander, 1)[0]; got != "bystander:"+tt.name {
				t.Errorf("bystander got %q", got)
			}
		})
	}
	// A message of exactly the limit is fine.
	send(t, bystander, strings.Repeat("y", 64<<10))
	if got := receive(t, bystander, 1)[0]; len(got) != 64<<10 {
		t.Errorf("message at the limit came back with %d bytes", len(got))
	}
}

func TestSlowBrowserIsCutOff(t *testing.T) {
	broker := testBrokers(t)[0]
	cfg := testWSConfig()
	cfg.SendQueue = 4
	tb := startBridge(t, testAMQPConfig(broker.url, testExchange(t, broker)), cfg)
	slow, fast := tb.dial(t), tb.dial(t)
	cutOff := make(chan struct{})
	var once sync.Once
	tb.bus.Subscribe(ChannelLog, "test", DefaultPriority, func(args ...any) (any, error) {
		if msg, _, _ := logArgs(args); msg == "browser cut off as too slow" {
			once.Do(func() { close(cutOff) })
		}
		return nil, nil
	})

	// slow does not read, so once the kernel's socket buffers are full its
	// writer blocks and its queue of 4 fills. fast sends in lockstep with
	// its own echo, so its queue never holds more than one message, and it
	// must get every one.
	big := strings.Repeat("x", 60<<10)
sending:
	for i := 0; ; i++ {
		if i == 2000 {
			t.Fatal("slow client still connected after 2000 messages of 60 KiB")
		}
		msg := fmt.Sprintf("fast:%d:%s", i, big)
		send(t, fast, msg)
		if got := receive(t, fast, 1)[0]; got != msg {
			t.Fatalf("fast client's message %d came back as %.20q", i, got)
		}
		select {
		case <-cutOff:
			break sending
		default:
		}
	}
	// Now that it is cut off, slow reads: what was already on its way,
	// then the close frame that says why.
	expectClose(t, slow, websocket.ClosePolicyViolation, "too slow")
}

func TestOriginCheck(t *testing.T) {
	broker := testBrokers(t)[0]
	cfg := testWSConfig()
	cfg.Origins = []string{"https://chat.example.com"}
	tb := startBridge(t, testAMQPConfig(broker.url, testExchange(t, broker)), cfg)
	tests := []struct {
		origin string
		status int
	}{
		{"", http.StatusSwitchingProtocols},
		{tb.server.URL, http.StatusSwitchingProtocols},
		{"https://chat.example.com", http.StatusSwitchingProtocols},
		{"https://evil.example.com", http.StatusForbidden},
		{"null", http.StatusForbidden},
	}
	for _, tt := range tests {
		h := http.Header{}
		if tt.origin != "" {
			h.Set("Origin", tt.origin)
		}
		conn, resp, err := websocket.DefaultDialer.Dial(tb.wsURL, h)
		if conn != nil {
			conn.Close()
		}
		if resp == nil {
			t.Fatalf("origin %q: no response: %v", tt.origin, err)
		}
		if resp.StatusCode != tt.status {
			t.Errorf("origin %q: status %d, want %d", tt.origin, resp.StatusCode, tt.status)
		}
	}
}

func TestPlainGETOnWSIs400(t *testing.T) {
	broker := testBrokers(t)[0]
	tb := startBridge(t, testAMQPConfig(broker.url, testExchange(t, broker)), testWSConfig())
	resp, err := http.Get(tb.server.URL + "/ws")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("GET /ws without upgrade: %d, want 400", resp.StatusCode)
	}
}

func TestShutdownClosesBrowsersAndDrains(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		exchange := testExchange(t, broker)
		tb := startBridge(t, testAMQPConfig(broker.url, exchange), testWSConfig())
		witness := consumeBodies(t, broker.url, exchange)
		a := tb.dial(t)

		const n = 500
		for i := range n {
			send(t, a, fmt.Sprintf("a:%d", i))
		}
		// The hub reads what a sent before it says goodbye, and the AMQP
		// plugin publishes all of it before it closes.
		poll(t, "the hub has read all of a's messages", func() bool { return tb.amqp.seq.Load() >= n })
		// Exit waits for the browsers to leave, so this client answers the
		// goodbye while it runs, as a browser would.
		exited := make(chan struct{})
		go func() {
			tb.bus.Exit()
			close(exited)
		}()
		expectClose(t, a, websocket.CloseGoingAway, "server shutting down")
		<-exited
		var got []string
		for len(got) < n {
			select {
			case body := <-witness:
				got = append(got, body)
			case <-time.After(waitFor):
				t.Fatalf("the broker got %d of %d messages", len(got), n)
			}
		}
		checkStreams(t, "broker", got, map[string]int{"a": n})
	})
}

// consume binds a queue of the test's own to exchange and returns its
// deliveries: a witness of what reached the broker.
func consume(t *testing.T, url, exchange string) <-chan amqp.Delivery {
	t.Helper()
	conn, err := amqp.Dial(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeDeclare(exchange, amqp.ExchangeFanout, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind(q.Name, "", exchange, false, nil); err != nil {
		t.Fatal(err)
	}
	deliveries, err := ch.Consume(q.Name, "", true, true, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	return deliveries
}

// consumeBodies is consume, message by message: the messages of a pack
// come one by one.
func consumeBodies(t *testing.T, url, exchange string) <-chan string {
	t.Helper()
	deliveries := consume(t, url, exchange)
	bodies := make(chan string)
	go func() {
		for d := range deliveries {
			var msgs []string
			if d.ContentType == packContentType {
				packed, err := unpack(d.Body)
				if err != nil {
					t.Errorf("a pack on the exchange: %v", err)
				}
				for _, m := range packed {
					msgs = append(msgs, string(m.body))
				}
			} else {
				msgs = append(msgs, string(d.Body))
			}
			for _, m := range msgs {
				select {
				case bodies <- m:
				case <-t.Context().Done():
					return
				}
			}
		}
	}()
	return bodies
}

// proxy is a TCP proxy between a bridge and its broker that a test can cut
// and restore, as a network would.
type proxy struct {
	ln     net.Listener
	target string

	mu      sync.Mutex // guards up, conns and flowing
	up      bool
	conns   []net.Conn
	flowing chan struct{} // closed while bytes flow; open while stalled
}

// newProxy listens on a loopback port and forwards to target.
func newProxy(t *testing.T, target string) *proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: target, up: true, flowing: make(chan struct{})}
	close(p.flowing)
	go p.serve()
	t.Cleanup(func() { ln.Close(); p.cut() })
	return p
}

// serve accepts connections until the listener closes; while the proxy is
// cut, it hangs up on them at once, like a broker that is down.
func (p *proxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		if !p.up {
			p.mu.Unlock()
			c.Close()
			continue
		}
		up, err := net.Dial("tcp", p.target)
		if err != nil {
			p.mu.Unlock()
			c.Close()
			continue
		}
		p.conns = append(p.conns, c, up)
		p.mu.Unlock()
		go func() { p.copy(up, c); up.Close() }()
		go func() { p.copy(c, up); c.Close() }()
	}
}

// copy forwards src to dst, holding each chunk while the proxy is
// stalled.
func (p *proxy) copy(dst io.Writer, src io.Reader) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			flowing := p.flowing
			p.mu.Unlock()
			<-flowing
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// stall stops forwarding without closing anything, as a broker that stops
// reading its sockets (RabbitMQ does, to blocked connections). The test's
// cleanup lets it flow again.
func (p *proxy) stall(t *testing.T) {
	p.mu.Lock()
	defer p.mu.Unlock()
	flowing := make(chan struct{})
	p.flowing = flowing
	t.Cleanup(func() { close(flowing) })
}

// cut drops every connection and refuses new ones until restore.
func (p *proxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.up = false
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

// restore lets connections through again.
func (p *proxy) restore() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.up = true
}

// viaProxy returns url with its host replaced by the proxy's.
func viaProxy(t *testing.T, rawURL string) (*proxy, string) {
	t.Helper()
	u, err := neturl.Parse(rawURL)
	if err != nil {
		t.Fatal(err)
	}
	p := newProxy(t, u.Host)
	u.Host = p.ln.Addr().String()
	return p, u.String()
}

// healthStatus returns the status code of GET /healthz.
func healthStatus(t *testing.T, tb *testBridge) int {
	t.Helper()
	resp, err := http.Get(tb.server.URL + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// waitHealth polls /healthz until it answers status.
func waitHealth(t *testing.T, tb *testBridge, status int) {
	t.Helper()
	poll(t, fmt.Sprintf("healthz answers %d", status), func() bool { return healthStatus(t, tb) == status })
}

func TestReconnectLosesNothing(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		p, url := viaProxy(t, broker.url)
		tb := startBridge(t, testAMQPConfig(url, testExchange(t, broker)), testWSConfig())
		a, b := tb.dial(t), tb.dial(t)
		if got := healthStatus(t, tb); got != http.StatusOK {
			t.Fatalf("healthz before the cut: %d", got)
		}

		send(t, a, "a:0")
		receive(t, b, 1)

		p.cut()
		waitHealth(t, tb, http.StatusServiceUnavailable)
		// Browsers stay connected, and what they send waits in the outbox.
		const n = 50
		for i := 1; i <= n; i++ {
			send(t, a, fmt.Sprintf("a:%d", i))
		}
		poll(t, "the hub has queued a's messages", func() bool { return len(tb.amqp.outbox) == n })

		p.restore()
		waitHealth(t, tb, http.StatusOK)
		got := append([]string{"a:0"}, receive(t, b, n)...)
		checkStreams(t, "b", got, map[string]int{"a": n + 1})
	})
}
