package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// newTestBroker starts an embedded broker that the test closes.
func newTestBroker(t testing.TB, cfg BrokerConfig) *Broker {
	t.Helper()
	b := NewBroker(cfg)
	t.Cleanup(func() { b.Close() })
	return b
}

// dialBroker connects amqp091-go to b in-process.
func dialBroker(t testing.TB, b *Broker, cfg amqp.Config) *amqp.Connection {
	t.Helper()
	cfg.Dial = b.Dial
	conn, err := amqp.DialConfig("amqp://guest:guest@embedded/", cfg)
	if err != nil {
		t.Fatalf("dial embedded broker: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// openChannel opens an AMQP channel on conn.
func openChannel(t testing.TB, conn *amqp.Connection) *amqp.Channel {
	t.Helper()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatalf("channel.open: %v", err)
	}
	return ch
}

// must fails the test on err.
func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// declareBound declares a server-named exclusive queue bound to exchange
// with key, and returns its name.
func declareBound(t testing.TB, ch *amqp.Channel, exchange, key string) string {
	t.Helper()
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	must(t, err)
	must(t, ch.QueueBind(q.Name, key, exchange, false, nil))
	return q.Name
}

// next returns the next delivery or fails the test after waitFor.
func next(t testing.TB, deliveries <-chan amqp.Delivery) amqp.Delivery {
	t.Helper()
	select {
	case d, ok := <-deliveries:
		if !ok {
			t.Fatal("deliveries closed")
		}
		return d
	case <-time.After(waitFor):
		t.Fatal("no delivery")
	}
	panic("unreachable")
}

// amqpCode returns the reply code of an *amqp.Error, or 0.
func amqpCode(err error) int {
	var ae *amqp.Error
	if errors.As(err, &ae) {
		return ae.Code
	}
	return 0
}

func TestBrokerFanoutConfirmed(t *testing.T) {
	b := newTestBroker(t, BrokerConfig{})
	conn := dialBroker(t, b, amqp.Config{})
	ch := openChannel(t, conn)
	must(t, ch.ExchangeDeclare("fan", "fanout", false, true, false, false, nil))
	var deliveries [2]<-chan amqp.Delivery
	for i := range deliveries {
		var err error
		deliveries[i], err = ch.Consume(declareBound(t, ch, "fan", ""), "", true, false, false, false, nil)
		must(t, err)
	}

	pub := openChannel(t, conn)
	must(t, pub.Confirm(false))
	const n = 10_000
	confirms := make([]*amqp.DeferredConfirmation, n)
	for i := range n {
		var err error
		confirms[i], err = pub.PublishWithDeferredConfirm("fan", "", false, false, amqp.Publishing{Body: fmt.Append(nil, i)})
		must(t, err)
	}
	for i, dc := range confirms {
		if !dc.Wait() {
			t.Fatalf("publish %d nacked", i)
		}
	}
	for q, d := range deliveries {
		for i := range n {
			if got := string(next(t, d).Body); got != fmt.Sprint(i) {
				t.Fatalf("queue %d: message %d is %q", q, i, got)
			}
		}
	}
}

func TestBrokerRouting(t *testing.T) {
	b := newTestBroker(t, BrokerConfig{})
	ch := openChannel(t, dialBroker(t, b, amqp.Config{}))
	must(t, ch.ExchangeDeclare("topics", "topic", false, true, false, false, nil))
	must(t, ch.ExchangeDeclare("direct", "direct", false, true, false, false, nil))
	patterns := []string{"a.*", "a.#", "#", "*.b.c", "a.b", "#.c"}
	queues := map[string]string{}
	for _, p := range patterns {
		queues[p] = declareBound(t, ch, "topics", p)
	}
	directQ := declareBound(t, ch, "direct", "red")

	tests := []struct {
		exchange, key string
		want          []string // patterns or queue names that get the message
	}{
		{"topics", "a.b", []string{"a.*", "a.#", "#", "a.b"}},
		{"topics", "a", []string{"a.#", "#"}},
		{"topics", "a.b.c", []string{"a.#", "#", "*.b.c", "#.c"}},
		{"topics", "x.b.c", []string{"#", "*.b.c", "#.c"}},
		{"topics", "c", []string{"#", "#.c"}},
		{"topics", "", []string{"#"}},
		{"direct", "red", []string{"direct:red"}},
		{"direct", "blue", nil},
		{"", directQ, []string{"direct:red"}}, // the default exchange routes by queue name
	}
	for _, tt := range tests {
		must(t, ch.Publish(tt.exchange, tt.key, false, false, amqp.Publishing{Body: []byte(tt.key)}))
		var got []string
		for _, p := range patterns {
			if _, ok, err := ch.Get(queues[p], true); err != nil {
				t.Fatal(err)
			} else if ok {
				got = append(got, p)
			}
		}
		if _, ok, _ := ch.Get(directQ, true); ok {
			got = append(got, "direct:red")
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("%s %q reached %q, want %q", tt.exchange, tt.key, got, tt.want)
		}
	}
}

func TestBrokerTopicMatch(t *testing.T) {
	tests := []struct {
		pattern, key string
		want         bool
	}{
		{"#", "", true}, {"#", "a.b", true}, {"a.#", "a", true}, {"a.#.z", "a.z", true},
		{"a.#.z", "a.b.c.z", true}, {"a.#.z", "a.b.c", false}, {"*", "", true}, {"*", "a.b", false},
		{"*.*", "a.b", true}, {"a.*.#", "a", false}, {"#.#", "a", true}, {"a", "a", true}, {"a", "b", false},
	}
	for _, tt := range tests {
		if got := topicMatch(strings.Split(tt.pattern, "."), strings.Split(tt.key, ".")); got != tt.want {
			t.Errorf("topicMatch(%q, %q) = %v, want %v", tt.pattern, tt.key, got, tt.want)
		}
	}
}

func TestBrokerAcknowledgements(t *testing.T) {
	b := newTestBroker(t, BrokerConfig{})
	ch := openChannel(t, dialBroker(t, b, amqp.Config{}))
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	must(t, err)
	for _, body := range []string{"one", "two", "three"} {
		must(t, ch.Publish("", q.Name, false, false, amqp.Publishing{Body: []byte(body)}))
	}
	must(t, ch.Qos(1, 0, false))
	deliveries, err := ch.Consume(q.Name, "", false, false, false, false, nil)
	must(t, err)

	// With prefetch 1, "one" comes alone; nacked with requeue it comes back.
	d := next(t, deliveries)
	if string(d.Body) != "one" || d.Redelivered {
		t.Fatalf("first delivery %q redelivered=%v", d.Body, d.Redelivered)
	}
	must(t, d.Nack(false, true))
	d = next(t, deliveries)
	if string(d.Body) != "one" || !d.Redelivered {
		t.Fatalf("after nack: %q redelivered=%v, want one redelivered", d.Body, d.Redelivered)
	}
	must(t, d.Reject(false)) // dropped
	d = next(t, deliveries)
	if string(d.Body) != "two" {
		t.Fatalf("after reject: %q, want two", d.Body)
	}
	must(t, d.Ack(false))
	d = next(t, deliveries)
	if string(d.Body) != "three" {
		t.Fatalf("after ack: %q, want three", d.Body)
	}
	// basic.recover puts it back, redelivered. It is deprecated in
	// RabbitMQ, but the broker still answers it, so it is tested.
	//lint:ignore SA1019 the embedded broker's basic.recover is under test
	must(t, ch.Recover(true))
	d = next(t, deliveries)
	if string(d.Body) != "three" || !d.Redelivered {
		t.Fatalf("after recover: %q redelivered=%v", d.Body, d.Redelivered)
	}
	must(t, d.Ack(false))

	// Acking an unknown tag is a channel error.
	closed := ch.NotifyClose(make(chan *amqp.Error, 1))
	must(t, ch.Ack(999, false))
	select {
	case e := <-closed:
		if e == nil || e.Code != amqp.PreconditionFailed {
			t.Errorf("after ack of an unknown tag the channel closed with %v, want 406", e)
		}
	case <-time.After(waitFor):
		t.Error("ack of an unknown tag did not close the channel")
	}
}

func TestBrokerCancel(t *testing.T) {
	b := newTestBroker(t, BrokerConfig{})
	ch := openChannel(t, dialBroker(t, b, amqp.Config{}))
	q, err := ch.QueueDeclare("kept", false, false, false, false, nil)
	must(t, err)
	deliveries, err := ch.Consume(q.Name, "c1", true, false, false, false, nil)
	must(t, err)
	must(t, ch.Publish("", q.Name, false, false, amqp.Publishing{Body: []byte("before")}))
	if got := next(t, deliveries); string(got.Body) != "before" {
		t.Fatalf("got %q", got.Body)
	}
	must(t, ch.Cancel("c1", false))
	if _, ok := <-deliveries; ok {
		t.Fatal("deliveries still open after cancel")
	}
	must(t, ch.Publish("", q.Name, false, false, amqp.Publishing{Body: []byte("after")}))
	if d, ok, err := ch.Get(q.Name, true); err != nil || !ok || string(d.Body) != "after" {
		t.Fatalf("get after cancel: %q %v %v", d.Body, ok, err)
	}

	// Deleting a queue cancels its consumers: the client's deliveries end.
	deliveries, err = ch.Consume(q.Name, "c2", true, false, false, false, nil)
	must(t, err)
	_, err = ch.QueueDelete(q.Name, false, false, false)
	must(t, err)
	if _, ok := <-deliveries; ok {
		t.Fatal("deliveries still open after queue.delete")
	}
}

func TestBrokerMandatoryReturn(t *testing.T) {
	b := newTestBroker(t, BrokerConfig{})
	ch := openChannel(t, dialBroker(t, b, amqp.Config{}))
	must(t, ch.ExchangeDeclare("nowhere", "direct", false, true, false, false, nil))
	returns := ch.NotifyReturn(make(chan amqp.Return, 1))
	must(t, ch.Confirm(false))
	dc, err := ch.PublishWithDeferredConfirm("nowhere", "key", true, false, amqp.Publishing{MessageId: "m1", Body: []byte("lost?")})
	must(t, err)
	select {
	case r := <-returns:
		if r.ReplyCode != 312 || r.ReplyText != "NO_ROUTE" || r.MessageId != "m1" || string(r.Body) != "lost?" {
			t.Errorf("return = %d %s %q %q", r.ReplyCode, r.ReplyText, r.MessageId, r.Body)
		}
	case <-time.After(waitFor):
		t.Fatal("no basic.return")
	}
	if !dc.Wait() {
		t.Error("returned message was nacked; RabbitMQ acks it")
	}
}

func TestBrokerLargeBody(t *testing.T) {
	b := newTestBroker(t, BrokerConfig{})
	ch := openChannel(t, dialBroker(t, b, amqp.Config{}))
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	must(t, err)
	body := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB, split across frames both ways
	must(t, ch.Publish("", q.Name, false, false, amqp.Publishing{
		ContentType: "application/octet-stream",
		Headers:     amqp.Table{"x-n": int32(7)},
		Body:        body,
	}))
	d, ok, err := ch.Get(q.Name, true)
	if err != nil || !ok {
		t.Fatalf("get: %v %v", ok, err)
	}
	if !bytes.Equal(d.Body, body) || d.ContentType != "application/octet-stream" || d.Headers["x-n"] != int32(7) {
		t.Errorf("got %d bytes, content type %q, headers %v", len(d.Body), d.ContentType, d.Headers)
	}
}

func TestBrokerChannelErrorKeepsConnection(t *testing.T) {
	b := newTestBroker(t, BrokerConfig{})
	conn := dialBroker(t, b, amqp.Config{})
	tests := []struct {
		name string
		do   func(ch *amqp.Channel) error
		code int
	}{
		{"passive declare of a missing queue", func(ch *amqp.Channel) error {
			_, err := ch.QueueDeclarePassive("missing", false, false, false, false, nil)
			return err
		}, amqp.NotFound},
		{"exchange redeclared with another type", func(ch *amqp.Channel) error {
			must(t, ch.ExchangeDeclare("typed", "fanout", false, false, false, false, nil))
			return ch.ExchangeDeclare("typed", "topic", false, false, false, false, nil)
		}, amqp.PreconditionFailed},
		{"bind to a missing exchange", func(ch *amqp.Channel) error {
			q, _ := ch.QueueDeclare("", false, true, true, false, nil)
			return ch.QueueBind(q.Name, "", "missing", false, nil)
		}, amqp.NotFound},
		{"reserved exchange name", func(ch *amqp.Channel) error {
			return ch.ExchangeDeclare("amq.mine", "fanout", false, false, false, false, nil)
		}, amqp.AccessRefused},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ch := openChannel(t, conn)
			closed := ch.NotifyClose(make(chan *amqp.Error, 1))
			if err := tt.do(ch); amqpCode(err) != tt.code {
				t.Fatalf("error = %v, want code %d", err, tt.code)
			}
			if e := <-closed; e == nil || e.Code != tt.code {
				t.Errorf("channel closed with %v, want %d", e, tt.code)
			}
			if conn.IsClosed() {
				t.Fatal("a channel error closed the connection")
			}
			ok := openChannel(t, conn)
			if _, err := ok.QueueDeclare("", false, true, true, false, nil); err != nil {
				t.Errorf("a new channel on the same connection fails: %v", err)
			}
		})
	}
}

func TestBrokerWrongPassword(t *testing.T) {
	b := newTestBroker(t, BrokerConfig{User: "alice", Password: "right"})
	_, err := amqp.DialConfig("amqp://alice:wrong@embedded/", amqp.Config{Dial: b.Dial})
	if amqpCode(err) != amqp.AccessRefused {
		t.Fatalf("dial with a wrong password: %v, want 403 ACCESS_REFUSED", err)
	}
	conn, err := amqp.DialConfig("amqp://alice:right@embedded/", amqp.Config{Dial: b.Dial})
	must(t, err)
	conn.Close()
}

func TestBrokerExclusiveQueueGoesWithItsConnection(t *testing.T) {
	b := newTestBroker(t, BrokerConfig{})
	owner := dialBroker(t, b, amqp.Config{})
	_, err := openChannel(t, owner).QueueDeclare("mine", false, false, true, false, nil)
	must(t, err)

	other := dialBroker(t, b, amqp.Config{})
	if _, err := openChannel(t, other).QueueDeclarePassive("mine", false, false, true, false, nil); amqpCode(err) != amqp.ResourceLocked {
		t.Fatalf("other connection declares the exclusive queue: %v, want 405", err)
	}
	must(t, owner.Close())
	poll(t, "the exclusive queue is deleted", func() bool {
		_, err := openChannel(t, other).QueueDeclarePassive("mine", false, false, true, false, nil)
		return amqpCode(err) == amqp.NotFound
	})
}

func TestBrokerMaxLength(t *testing.T) {
	b := newTestBroker(t, BrokerConfig{MaxQueueLength: 1000})
	ch := openChannel(t, dialBroker(t, b, amqp.Config{}))
	must(t, ch.Confirm(false))
	for _, overflow := range []string{"drop-head", "reject-publish"} {
		q, err := ch.QueueDeclare("", false, true, true, false, amqp.Table{"x-max-length": int32(3), "x-overflow": overflow})
		must(t, err)
		var acked []bool
		for i := range 5 {
			dc, err := ch.PublishWithDeferredConfirm("", q.Name, false, false, amqp.Publishing{Body: fmt.Append(nil, i)})
			must(t, err)
			acked = append(acked, dc.Wait())
		}
		var kept []string
		for {
			d, ok, err := ch.Get(q.Name, true)
			must(t, err)
			if !ok {
				break
			}
			kept = append(kept, string(d.Body))
		}
		want, wantAcks := []string{"2", "3", "4"}, []bool{true, true, true, true, true}
		if overflow == "reject-publish" {
			want, wantAcks = []string{"0", "1", "2"}, []bool{true, true, true, false, false}
		}
		if !slices.Equal(kept, want) || !slices.Equal(acked, wantAcks) {
			t.Errorf("%s: kept %q acked %v, want %q %v", overflow, kept, acked, want, wantAcks)
		}
	}
}

func TestBrokerHeartbeats(t *testing.T) {
	b := newTestBroker(t, BrokerConfig{Heartbeat: time.Second})

	// An idle but live client stays connected: amqp091-go heartbeats.
	live := dialBroker(t, b, amqp.Config{Heartbeat: time.Second})
	closed := live.NotifyClose(make(chan *amqp.Error, 1))

	// A client that goes silent after the handshake is dropped after two
	// missed heartbeats.
	dead, err := b.Dial("pipe", "")
	must(t, err)
	defer dead.Close()
	r := bufio.NewReader(dead)
	rawHandshake(t, dead, r, 1)
	dropped := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, r) // heartbeats from the broker, then EOF
		dropped <- err
	}()
	select {
	case <-dropped:
	case <-time.After(waitFor):
		t.Fatal("silent client still connected")
	}

	// Three heartbeat intervals have passed by now; the live client is fine.
	select {
	case err := <-closed:
		t.Fatalf("idle client was dropped: %v", err)
	default:
	}
	if _, err := openChannel(t, live).QueueDeclare("", false, true, true, false, nil); err != nil {
		t.Fatalf("idle client cannot work: %v", err)
	}
}

// rawHandshake opens an AMQP connection by hand, asking for heartbeat
// seconds, and returns once connection.open-ok has arrived.
func rawHandshake(t testing.TB, w io.Writer, r *bufio.Reader, heartbeat uint16) {
	t.Helper()
	go w.Write(handshakeBytes(heartbeat)) // net.Pipe writes wait for the broker to read
	for _, want := range []method{connectionStart, connectionTune, connectionOpenOk} {
		for {
			f, err := readFrame(r, 1<<20)
			if err != nil {
				t.Fatalf("waiting for method %d.%d: %v", want.class(), want.id(), err)
			}
			if f.typ == frameMethod && method((&wireReader{b: f.payload}).long()) == want {
				break
			}
		}
	}
}

// handshakeBytes is what a client sends to open a connection as guest.
func handshakeBytes(heartbeat uint16) []byte {
	buf := slices.Clone(protocolHeader)
	buf = appendMethod(buf, 0, connectionStartOk, func(w *wireWriter) {
		w.table(Table{"product": "test"})
		w.shortstr("PLAIN")
		w.longstr([]byte("\x00guest\x00guest"))
		w.shortstr("en_US")
	})
	buf = appendMethod(buf, 0, connectionTuneOk, func(w *wireWriter) {
		w.short(2047)
		w.long(frameMinSize)
		w.short(heartbeat)
	})
	return appendMethod(buf, 0, connectionOpen, func(w *wireWriter) {
		w.shortstr("/")
		w.shortstr("")
		w.bit(false)
	})
}

func TestBrokerRefusesOversizedFrame(t *testing.T) {
	b := newTestBroker(t, BrokerConfig{})
	c, err := b.Dial("pipe", "")
	must(t, err)
	defer c.Close()
	r := bufio.NewReader(c)
	rawHandshake(t, c, r, 0)
	// A frame header announcing 1 GiB: refused by its header, never read.
	go c.Write([]byte{frameMethod, 0, 1, 0x40, 0, 0, 0})
	for {
		f, err := readFrame(r, 1<<20)
		if err != nil {
			t.Fatalf("connection ended without connection.close: %v", err)
		}
		pr := &wireReader{b: f.payload}
		if f.typ == frameMethod && method(pr.long()) == connectionClose {
			if code := pr.short(); code != replyFrameError {
				t.Fatalf("connection.close %d %s, want 501", code, pr.shortstr())
			}
			return
		}
	}
}

func TestBrokerConcurrentPublishers(t *testing.T) {
	b := newTestBroker(t, BrokerConfig{})
	conn := dialBroker(t, b, amqp.Config{})
	ch := openChannel(t, conn)
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	must(t, err)
	deliveries, err := ch.Consume(q.Name, "", true, false, false, false, nil)
	must(t, err)

	const publishers, each = 8, 500
	var wg sync.WaitGroup
	for p := range publishers {
		wg.Go(func() {
			// Half share the consumer's connection, half have their own.
			c := conn
			if p%2 == 1 {
				c = dialBroker(t, b, amqp.Config{})
			}
			pub := openChannel(t, c)
			must(t, pub.Confirm(false))
			for i := range each {
				dc, err := pub.PublishWithDeferredConfirm("", q.Name, false, false, amqp.Publishing{Body: fmt.Appendf(nil, "%d:%d", p, i)})
				if err != nil {
					t.Error(err)
					return
				}
				if i == each-1 && !dc.Wait() {
					t.Error("nacked")
				}
			}
		})
	}
	got := make([]string, 0, publishers*each)
	for range publishers * each {
		got = append(got, string(next(t, deliveries).Body))
	}
	wg.Wait()
	checkStreams(t, "consumer", got, func() map[string]int {
		m := map[string]int{}
		for p := range publishers {
			m[fmt.Sprint(p)] = each
		}
		return m
	}())
}

func TestBrokerCloseForcesClients(t *testing.T) {
	b := NewBroker(BrokerConfig{})
	conn := dialBroker(t, b, amqp.Config{})
	closed := conn.NotifyClose(make(chan *amqp.Error, 1))
	must(t, b.Close())
	if e := <-closed; e == nil || e.Code != amqp.ConnectionForced {
		t.Errorf("client closed with %v, want 320 CONNECTION_FORCED", e)
	}
	if _, err := b.Dial("pipe", ""); err == nil {
		t.Error("a closed broker accepts connections")
	}
}

// FuzzBrokerConn feeds arbitrary bytes to a broker connection after the
// protocol header. The broker must never panic, never allocate past its
// frame limit, and always end the connection.
func FuzzBrokerConn(f *testing.F) {
	f.Add(handshakeBytes(0)[len(protocolHeader):])
	withChannel := appendMethod(handshakeBytes(0)[len(protocolHeader):], 1, channelOpen, func(w *wireWriter) { w.shortstr("") })
	f.Add(withChannel)
	f.Add(appendMethod(slices.Clone(withChannel), 1, basicPublish, func(w *wireWriter) {
		w.short(0)
		w.shortstr("")
		w.shortstr("q")
		w.bit(true)
		w.bit(false)
	}))
	f.Add([]byte{frameMethod, 0, 0, 0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{frameHeartbeat, 0, 1, 0, 0, 0, 0, frameEnd})

	b := NewBroker(BrokerConfig{})
	defer b.Close()
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := b.Dial("pipe", "")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		ended := make(chan struct{})
		go func() {
			io.Copy(io.Discard, c)
			close(ended)
		}()
		c.SetWriteDeadline(time.Now().Add(5 * time.Second))
		c.Write(protocolHeader)
		c.Write(data)
		// Whatever the broker made of it, hanging up must end it.
		c.Close()
		select {
		case <-ended:
		case <-time.After(5 * time.Second):
			t.Fatal("connection did not end")
		}
	})
}

// FuzzTable feeds arbitrary bytes to the field table decoder.
func FuzzTable(f *testing.F) {
	w := &wireWriter{}
	w.table(Table{"s": "x", "b": true, "n": 7, "t": Table{"deep": "er"}})
	f.Add(w.b)
	f.Add([]byte{0, 0, 0, 5, 1, 'k', 'A', 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		r := &wireReader{b: data}
		table := r.table()
		if r.err == nil && table == nil {
			t.Error("no table and no error")
		}
	})
}

// BenchmarkBrokerPublish measures confirmed publish throughput and
// publish-to-deliver latency through the embedded broker and, when
// AMQP_URL is set, through RabbitMQ, side by side.
func BenchmarkBrokerPublish(b *testing.B) {
	for _, broker := range testBrokers(b) {
		b.Run(broker.name, func(b *testing.B) {
			if broker.why != "" {
				b.Fatal(broker.why)
			}
			conn, err := amqp.Dial(broker.url)
			must(b, err)
			defer conn.Close()
			ch := openChannel(b, conn)
			q, err := ch.QueueDeclare("", false, true, true, false, nil)
			must(b, err)
			deliveries, err := ch.Consume(q.Name, "", true, false, false, false, nil)
			must(b, err)
			pub := openChannel(b, conn)
			must(b, pub.Confirm(false))

			latencies := make([]time.Duration, 0, b.N)
			received := make(chan struct{})
			go func() {
				defer close(received)
				for range b.N {
					d := <-deliveries
					sent := time.Unix(0, int64(binary.BigEndian.Uint64(d.Body)))
					latencies = append(latencies, time.Since(sent))
				}
			}()
			b.ResetTimer()
			confirms := make([]*amqp.DeferredConfirmation, 0, maxBatch)
			for i := range b.N {
				body := binary.BigEndian.AppendUint64(make([]byte, 0, 64), uint64(time.Now().UnixNano()))
				dc, err := pub.PublishWithDeferredConfirm("", q.Name, false, false, amqp.Publishing{Body: body[:64]})
				must(b, err)
				confirms = append(confirms, dc)
				if len(confirms) == maxBatch || i == b.N-1 {
					for _, dc := range confirms {
						dc.Wait()
					}
					confirms = confirms[:0]
				}
			}
			<-received
			b.StopTimer()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
			sort.Slice(latencies, func(i, j int) bool { return latencies[i] < latencies[j] })
			b.ReportMetric(float64(latencies[len(latencies)/2].Microseconds()), "p50-µs")
			b.ReportMetric(float64(latencies[len(latencies)*99/100].Microseconds()), "p99-µs")
		})
	}
}
