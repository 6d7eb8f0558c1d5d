package main

// Tests of the embedded broker under attack and at its limits: every
// limit holds, no input stalls other clients, and the broker's memory is
// bounded in bytes. Where RabbitMQ behaves the same, the same body runs
// against it too.

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// dialURL connects to a test broker by URL.
func dialURL(t testing.TB, url string) *amqp.Connection {
	t.Helper()
	conn, err := amqp.Dial(url)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// A queue of length 0 delivers to a consumer that is waiting and drops
// the message otherwise, as RabbitMQ does; it used to panic the broker.
func TestBrokerQueueOfLengthZero(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		ch := openChannel(t, dialURL(t, broker.url))
		must(t, ch.Confirm(false))
		q, err := ch.QueueDeclare("", false, true, true, false, amqp.Table{"x-max-length": int32(0)})
		must(t, err)
		dc, err := ch.PublishWithDeferredConfirm("", q.Name, false, false, amqp.Publishing{Body: []byte("nobody waits")})
		must(t, err)
		if !dc.Wait() {
			t.Fatal("publish to a queue of length 0 was nacked")
		}
		if _, ok, err := ch.Get(q.Name, true); err != nil || ok {
			t.Fatalf("get from a queue of length 0: ok=%v err=%v, want empty", ok, err)
		}
		deliveries, err := ch.Consume(q.Name, "", true, false, false, false, nil)
		must(t, err)
		must(t, ch.Publish("", q.Name, false, false, amqp.Publishing{Body: []byte("someone waits")}))
		if got := string(next(t, deliveries).Body); got != "someone waits" {
			t.Fatalf("delivered %q", got)
		}
	})
}

// Topic patterns made of many "#" used to be matched by backtracking,
// exponential in their number and under the broker's lock: one binding
// stalled every client. A pattern of 127 "#" now routes at once. (It runs
// against the embedded broker only: RabbitMQ 3.10.8 does not confirm
// this publish within 20 s either.)
func TestBrokerTopicPatternCannotStallTheBroker(t *testing.T) {
	forEachBroker(t, func(t *testing.T, broker testBroker) {
		if broker.name != "embedded" {
			t.Skip("RabbitMQ's own topic matching backtracks on this pattern")
		}
		conn := dialURL(t, broker.url)
		ch := openChannel(t, conn)
		must(t, ch.Confirm(false))
		ex := testExchange(t, broker)
		must(t, ch.ExchangeDeclare(ex, "topic", false, true, false, false, nil))
		pattern := strings.Repeat("#.", 126) + "x"
		q := declareBound(t, ch, ex, pattern)
		key := strings.Repeat("a.", 126) + "b" // never matches: the worst case for backtracking
		for _, key := range []string{key, strings.Repeat("a.", 126) + "x"} {
			dc, err := ch.PublishWithDeferredConfirm(ex, key, false, false, amqp.Publishing{Body: []byte(key[len(key)-1:])})
			must(t, err)
			ctx, cancel := context.WithTimeout(context.Background(), waitFor)
			ok, err := dc.WaitContext(ctx)
			cancel()
			if !ok || err != nil {
				t.Fatalf("publish with a %d-word key: confirmed=%v err=%v", strings.Count(key, ".")+1, ok, err)
			}
		}
		d, ok, err := ch.Get(q, true)
		if err != nil || !ok || string(d.Body) != "x" {
			t.Fatalf("get: %q ok=%v err=%v, want the matching message only", d.Body, ok, err)
		}
		if _, ok, _ := ch.Get(q, true); ok {
			t.Fatal("the key that does not match was routed")
		}
	})
}

func TestTopicMatchManyHashes(t *testing.T) {
	for _, tc := range []struct {
		pattern, key string
		want         bool
	}{
		{"#.#.#", "", true},
		{"#.#.#", "a.b.c.d", true},
		{"#.a.#", "x.y.a", true},
		{"#.a.#.b", "a.b", true},
		{"#.a.#.b", "b.a", false},
		{"*.#.*", "a", false},
		{"*.#.*", "a.b", true},
		{"#.*.#.*.#", "a.b.c", true},
		{strings.Repeat("#.", 100) + "z", strings.Repeat("y.", 100) + "y", false},
		{strings.Repeat("*.", 99) + "*", strings.Repeat("y.", 99) + "y", true},
	} {
		if got := topicMatch(strings.Split(tc.pattern, "."), strings.Split(tc.key, ".")); got != tc.want {
			t.Errorf("topicMatch(%.30q, %.30q) = %v, want %v", tc.pattern, tc.key, got, tc.want)
		}
	}
}

// guest may connect only from this machine, as in RabbitMQ (its
// loopback_users): a client from another address is refused at login.
func TestBrokerGuestOnlyFromLoopback(t *testing.T) {
	b := newTestBroker(t, BrokerConfig{})
	from := func(ip string) error {
		client, server := net.Pipe()
		defer client.Close()
		remote := &net.TCPAddr{IP: net.ParseIP(ip), Port: 40000}
		if !b.serve(remoteConn{server, remote}) {
			t.Fatal("broker refused to serve")
		}
		conn, err := amqp.DialConfig("amqp://guest:guest@test/", amqp.Config{Dial: func(string, string) (net.Conn, error) { return client, nil }})
		if err == nil {
			conn.Close()
		}
		return err
	}
	if err := from("127.0.0.1"); err != nil {
		t.Errorf("guest from 127.0.0.1: %v", err)
	}
	if err := from("::1"); err != nil {
		t.Errorf("guest from ::1: %v", err)
	}
	if err := from("192.0.2.7"); amqpCode(err) != amqp.AccessRefused || !strings.Contains(err.Error(), "only connect via localhost") {
		t.Errorf("guest from 192.0.2.7: %v, want 403 ACCESS_REFUSED", err)
	}

	// Another account may connect from anywhere.
	b = newTestBroker(t, BrokerConfig{User: "alice", Password: "s3cret"})
	client, server := net.Pipe()
	defer client.Close()
	b.serve(remoteConn{server, &net.TCPAddr{IP: net.ParseIP("192.0.2.7"), Port: 40000}})
	conn, err := amqp.DialConfig("amqp://alice:s3cret@test/", amqp.Config{Dial: func(string, string) (net.Conn, error) { return client, nil }})
	must(t, err)
	conn.Close()
}

// remoteConn is a real in-process connection that reports another remote
// address, so that the broker's loopback rule can be tested without
// traffic to any other address.
type remoteConn struct {
	net.Conn
	remote net.Addr
}

func (c remoteConn) RemoteAddr() net.Addr { return c.remote }

func TestBrokerLogin(t *testing.T) {
	cfg := BrokerConfig{User: "alice", Password: "s3cret"}.withDefaults()
	for _, tc := range []struct {
		user, password string
		want           bool
	}{
		{"alice", "s3cret", true},
		{"alice", "s3cre", false},
		{"alice", "s3cretx", false},
		{"alic", "s3cret", false},
		{"", "", false},
		{"guest", "guest", false},
	} {
		if got := cfg.login(tc.user, tc.password); got != tc.want {
			t.Errorf("login(%q, %q) = %v, want %v", tc.user, tc.password, got, tc.want)
		}
	}
}

// A channel number over the negotiated channel_max closes the connection
// with 530, as RabbitMQ does.
func TestBrokerChannelMax(t *testing.T) {
	b := newTestBroker(t, BrokerConfig{ChannelMax: 16})
	c, err := b.Dial("pipe", "")
	must(t, err)
	defer c.Close()
	r := bufio.NewReader(c)
	rawHandshake(t, c, r, 0)
	go c.Write(appendMethod(nil, 17, channelOpen, func(w *wireWriter) { w.shortstr("") }))
	if code := awaitConnectionClose(t, r); code != replyNotAllowed {
		t.Fatalf("channel 17 of 16: connection.close %d, want 530", code)
	}
}

// awaitConnectionClose reads frames until connection.close and returns its
// reply code.
func awaitConnectionClose(t testing.TB, r *bufio.Reader) uint16 {
	t.Helper()
	for {
		f, err := readFrame(r, 1<<20)
		if err != nil {
			t.Fatalf("connection ended without connection.close: %v", err)
		}
		pr := &wireReader{b: f.payload}
		if f.typ == frameMethod && method(pr.long()) == connectionClose {
			return pr.short()
		}
	}
}

func TestBrokerCaps(t *testing.T) {
	b := newTestBroker(t, BrokerConfig{MaxConns: 2, MaxQueues: 2, MaxConsumers: 1})
	conn := dialBroker(t, b, amqp.Config{})
	dialBroker(t, b, amqp.Config{})
	if _, err := amqp.DialConfig("amqp://guest:guest@embedded/", amqp.Config{Dial: b.Dial}); amqpCode(err) != amqp.NotAllowed {
		t.Errorf("third connection of 2: %v, want 530 NOT_ALLOWED", err)
	}

	ch := openChannel(t, conn)
	for i := range 2 {
		_, err := ch.QueueDeclare(fmt.Sprint("q", i), false, true, false, false, nil)
		must(t, err)
	}
	if _, err := ch.QueueDeclare("q2", false, true, false, false, nil); amqpCode(err) != amqp.PreconditionFailed {
		t.Errorf("third queue of 2: %v, want 406", err)
	}

	ch = openChannel(t, conn)
	_, err := ch.Consume("q0", "", true, false, false, false, nil)
	must(t, err)
	if _, err := ch.Consume("q1", "", true, false, false, false, nil); amqpCode(err) != amqp.PreconditionFailed {
		t.Errorf("second consumer of 1: %v, want 406", err)
	}
}

// A queue holds at most its bytes (x-max-length-bytes, or the broker's
// MaxQueueBytes), dropping the oldest: 64 messages of 1 MiB under a 4 MiB
// limit keep the last four.
func TestBrokerQueueBytes(t *testing.T) {
	b := newTestBroker(t, BrokerConfig{MaxQueueBytes: 4 << 20, MaxMemory: 1 << 30})
	ch := openChannel(t, dialBroker(t, b, amqp.Config{}))
	must(t, ch.Confirm(false))
	for _, args := range []amqp.Table{nil, {"x-max-length-bytes": int32(2 << 20)}} {
		q, err := ch.QueueDeclare("", false, true, true, false, args)
		must(t, err)
		body := make([]byte, 1<<20-100)
		for i := range 64 {
			body[0] = byte(i)
			dc, err := ch.PublishWithDeferredConfirm("", q.Name, false, false, amqp.Publishing{Body: body})
			must(t, err)
			dc.Wait()
		}
		want := 4
		if args != nil {
			want = 2
		}
		q, err = ch.QueueDeclarePassive(q.Name, false, true, true, false, args)
		must(t, err)
		if q.Messages != want {
			t.Errorf("args %v: queue keeps %d messages of 1 MiB, want %d", args, q.Messages, want)
		}
		d, _, err := ch.Get(q.Name, true)
		must(t, err)
		if int(d.Body[0]) != 64-want {
			t.Errorf("args %v: the oldest kept is %d, want %d", args, d.Body[0], 64-want)
		}
	}
}

// Over its memory budget the broker refuses publishes (basic.nack) and
// says so with connection.blocked; when memory is freed it unblocks. A
// consumer that never acknowledges, with no prefetch limit, cannot make it
// hold more than the budget.
func TestBrokerMemoryBudget(t *testing.T) {
	const budget = 1 << 20
	b := newTestBroker(t, BrokerConfig{MaxMemory: budget})
	conn := dialBroker(t, b, amqp.Config{})
	blocked := conn.NotifyBlocked(make(chan amqp.Blocking, 4))
	ch := openChannel(t, conn)
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	must(t, err)
	hog := openChannel(t, conn)
	deliveries, err := hog.Consume(q.Name, "", false, false, false, false, nil) // prefetch 0, never acks
	must(t, err)
	must(t, ch.Confirm(false))

	body := make([]byte, 64<<10)
	acked, nacked := 0, 0
	for range 64 {
		dc, err := ch.PublishWithDeferredConfirm("", q.Name, false, false, amqp.Publishing{Body: body})
		must(t, err)
		if dc.Wait() {
			acked++
		} else {
			nacked++
		}
	}
	b.mu.Lock()
	held := b.held
	b.mu.Unlock()
	t.Logf("64 publishes of 64 KiB under a 1 MiB budget: %d acked, %d nacked, %d bytes held", acked, nacked, held)
	if nacked == 0 || held > budget+int64(len(body))+1024 {
		t.Fatalf("%d nacked, %d bytes held: want publishes refused and at most the budget held", nacked, held)
	}
	if s := <-blocked; !s.Active || s.Reason == "" {
		t.Fatalf("blocking notification %+v, want active with a reason", s)
	}

	var last amqp.Delivery
	for range acked {
		last = next(t, deliveries)
	}
	must(t, last.Ack(true))
	select {
	case s := <-blocked:
		if s.Active {
			t.Fatalf("after the acks: %+v, want unblocked", s)
		}
	case <-time.After(waitFor):
		t.Fatal("not unblocked after the acks freed the memory")
	}
	dc, err := ch.PublishWithDeferredConfirm("", q.Name, false, false, amqp.Publishing{Body: body})
	must(t, err)
	if !dc.Wait() {
		t.Fatal("publish refused after memory was freed")
	}
}

// A publish whose content never arrives whole cannot hold the broker's
// memory: past ContentTimeout the connection is closed with 501.
func TestBrokerUnfinishedContentTimesOut(t *testing.T) {
	b := newTestBroker(t, BrokerConfig{ContentTimeout: 200 * time.Millisecond})
	c, err := b.Dial("pipe", "")
	must(t, err)
	defer c.Close()
	r := bufio.NewReader(c)
	rawHandshake(t, c, r, 0)
	half := appendMethod(nil, 1, channelOpen, func(w *wireWriter) { w.shortstr("") })
	half = appendMethod(half, 1, basicPublish, func(w *wireWriter) {
		w.short(0)
		w.shortstr("")
		w.shortstr("q")
		w.bit(false)
		w.bit(false)
	})
	header := &wireWriter{}
	header.short(classBasic)
	header.short(0)
	header.longlong(1 << 20) // a megabyte announced, a kilobyte sent
	header.short(0)
	half = appendFrame(half, frameHeader, 1, header.b)
	half = appendFrame(half, frameBody, 1, make([]byte, 1024))
	go c.Write(half)
	if code := awaitConnectionClose(t, r); code != replyFrameError {
		t.Fatalf("connection.close %d, want 501", code)
	}
}

// An x-expires queue has one expiry timer however often it is used, and
// still expires once it is left alone.
func TestBrokerQueueExpiresAfterManyUses(t *testing.T) {
	b := newTestBroker(t, BrokerConfig{})
	ch := openChannel(t, dialBroker(t, b, amqp.Config{}))
	args := amqp.Table{"x-expires": int32(300)}
	_, err := ch.QueueDeclare("short-lived", false, false, false, false, args)
	must(t, err)
	for range 10_000 {
		_, err := ch.QueueDeclarePassive("short-lived", false, false, false, false, args)
		must(t, err)
	}
	poll(t, "the queue expires after its last use", func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		_, ok := b.queues["short-lived"]
		return !ok
	})
}

// Close ends within closeGrace even when a client stops reading while the
// broker has much to write to it.
func TestBrokerCloseDoesNotWaitForAStuckClient(t *testing.T) {
	b := NewBroker(BrokerConfig{})
	stuck, err := b.Dial("pipe", "")
	must(t, err)
	defer stuck.Close()
	r := bufio.NewReader(stuck)
	rawHandshake(t, stuck, r, 0)
	go stuck.Write(appendMethod(nil, 1, channelOpen, func(w *wireWriter) { w.shortstr("") }))
	// Stop reading: the broker's writer blocks on its first write.

	closed := make(chan struct{})
	go func() {
		b.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(waitFor):
		t.Fatal("Close waits for a client that does not read")
	}
}

// BenchmarkBrokerAtScale prints what used to be quadratic or exponential:
// a publish to a fanout exchange with 40,000 bound queues, 80,000
// consumers leaving at once, and a publish through a topic binding of 16
// "#" segments.
func BenchmarkBrokerAtScale(b *testing.B) {
	b.Run("fanout-40k-queues", func(b *testing.B) {
		br := newTestBroker(b, BrokerConfig{MaxQueues: 50_000})
		ch := openChannel(b, dialBroker(b, br, amqp.Config{}))
		must(b, ch.ExchangeDeclare("fan", "fanout", false, true, false, false, nil))
		for i := range 40_000 {
			q, err := ch.QueueDeclare(fmt.Sprint("fan-", i), false, true, false, false, amqp.Table{"x-max-length": int32(1)})
			must(b, err)
			must(b, ch.QueueBind(q.Name, "", "fan", true, nil))
		}
		must(b, ch.Confirm(false))
		b.ResetTimer()
		for range b.N {
			dc, err := ch.PublishWithDeferredConfirm("fan", "", false, false, amqp.Publishing{Body: []byte("x")})
			must(b, err)
			dc.Wait()
		}
		b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N), "µs/publish")
	})
	b.Run("80k-consumers-leave", func(b *testing.B) {
		for range b.N {
			br := newTestBroker(b, BrokerConfig{})
			conn := dialBroker(b, br, amqp.Config{})
			ch := openChannel(b, conn)
			q, err := ch.QueueDeclare("", false, true, true, false, nil)
			must(b, err)
			for i := range 80_000 {
				_, err := ch.Consume(q.Name, fmt.Sprint("c", i), true, false, false, true, nil)
				must(b, err)
			}
			start := time.Now()
			must(b, ch.Close())
			b.ReportMetric(float64(time.Since(start).Milliseconds()), "ms/teardown")
		}
	})
	b.Run("topic-16-hashes", func(b *testing.B) {
		br := newTestBroker(b, BrokerConfig{})
		ch := openChannel(b, dialBroker(b, br, amqp.Config{}))
		must(b, ch.ExchangeDeclare("t", "topic", false, true, false, false, nil))
		declareBound(b, ch, "t", strings.Repeat("#.", 16)+"x")
		must(b, ch.Confirm(false))
		key := strings.Repeat("a.", 15) + "b"
		b.ResetTimer()
		for range b.N {
			dc, err := ch.PublishWithDeferredConfirm("t", key, false, false, amqp.Publishing{Body: []byte("x")})
			must(b, err)
			dc.Wait()
		}
		b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N), "µs/publish")
	})
	b.Run("heap-after-64x16MiB", func(b *testing.B) {
		for range b.N {
			br := newTestBroker(b, BrokerConfig{MaxQueueLength: 1000})
			ch := openChannel(b, dialBroker(b, br, amqp.Config{}))
			q, err := ch.QueueDeclare("", false, true, true, false, nil)
			must(b, err)
			must(b, ch.Confirm(false))
			body := make([]byte, 16<<20-4096)
			for range 64 {
				dc, err := ch.PublishWithDeferredConfirm("", q.Name, false, false, amqp.Publishing{Body: body})
				must(b, err)
				dc.Wait()
			}
			runtime.GC()
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			b.ReportMetric(float64(ms.HeapInuse)/(1<<20), "MiB-heap")
		}
	})
}
