package main

// The embedded broker. The posts ran against a RabbitMQ server; wsamqp
// carries a small in-memory AMQP 0-9-1 broker of its own, so that `go run .`
// works on a machine with nothing else installed, while every message still
// travels as real AMQP frames through the same amqp.go that talks to
// RabbitMQ. It is written from the AMQP 0-9-1 specification and behaves
// like RabbitMQ where the two differ.
//
// What it speaks: the default exchange and direct, fanout and topic
// exchanges; queues (server-named, exclusive, auto-delete, with a maximum
// length); consumers with prefetch, acks, nacks, rejects and recover;
// basic.get; mandatory returns; publisher confirms; heartbeats. What it
// does not: persistence, transactions, headers exchanges, exchange-to-
// exchange bindings, virtual hosts other than "/", TLS, clustering.
//
// The file has four parts: the wire format (frames, fields, tables), the
// model (exchanges, queues, routing), a connection's life (handshake,
// reading, writing, heartbeats), and the methods it answers.

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"net"
	"slices"
	"strings"
	"sync"
	"time"
)

// ---------------------------------------------------------------------
// Wire format
// ---------------------------------------------------------------------

// Frame types, and the octet that ends every frame.
const (
	frameMethod    = 1
	frameHeader    = 2
	frameBody      = 3
	frameHeartbeat = 8
	frameEnd       = 0xCE
)

// frameMinSize is the largest frame both peers must accept before tuning.
const frameMinSize = 4096

// Reply codes, as RabbitMQ sends them.
const (
	replySuccess            = 200
	replyNoRoute            = 312
	replyConnectionForced   = 320
	replyAccessRefused      = 403
	replyNotFound           = 404
	replyResourceLocked     = 405
	replyPreconditionFailed = 406
	replyFrameError         = 501
	replySyntaxError        = 502
	replyCommandInvalid     = 503
	replyChannelError       = 504
	replyUnexpectedFrame    = 505
	replyNotAllowed         = 530
	replyNotImplemented     = 540
	replyInternalError      = 541
)

// method identifies an AMQP method: its class id in the high 16 bits, its
// method id in the low 16.
type method uint32

func (m method) class() uint16 { return uint16(m >> 16) }
func (m method) id() uint16    { return uint16(m) }

// The methods the broker sends or answers.
const (
	connectionStart   method = 10<<16 | 10
	connectionStartOk method = 10<<16 | 11
	connectionTune    method = 10<<16 | 30
	connectionTuneOk  method = 10<<16 | 31
	connectionOpen    method = 10<<16 | 40
	connectionOpenOk  method = 10<<16 | 41
	connectionClose   method = 10<<16 | 50
	connectionCloseOk method = 10<<16 | 51
	channelOpen       method = 20<<16 | 10
	channelOpenOk     method = 20<<16 | 11
	channelFlow       method = 20<<16 | 20
	channelFlowOk     method = 20<<16 | 21
	channelClose      method = 20<<16 | 40
	channelCloseOk    method = 20<<16 | 41
	exchangeDeclare   method = 40<<16 | 10
	exchangeDeclareOk method = 40<<16 | 11
	exchangeDelete    method = 40<<16 | 20
	exchangeDeleteOk  method = 40<<16 | 21
	queueDeclare      method = 50<<16 | 10
	queueDeclareOk    method = 50<<16 | 11
	queueBind         method = 50<<16 | 20
	queueBindOk       method = 50<<16 | 21
	queuePurge        method = 50<<16 | 30
	queuePurgeOk      method = 50<<16 | 31
	queueDelete       method = 50<<16 | 40
	queueDeleteOk     method = 50<<16 | 41
	queueUnbind       method = 50<<16 | 50
	queueUnbindOk     method = 50<<16 | 51
	basicQos          method = 60<<16 | 10
	basicQosOk        method = 60<<16 | 11
	basicConsume      method = 60<<16 | 20
	basicConsumeOk    method = 60<<16 | 21
	basicCancel       method = 60<<16 | 30
	basicCancelOk     method = 60<<16 | 31
	basicPublish      method = 60<<16 | 40
	basicReturn       method = 60<<16 | 50
	basicDeliver      method = 60<<16 | 60
	basicGet          method = 60<<16 | 70
	basicGetOk        method = 60<<16 | 71
	basicGetEmpty     method = 60<<16 | 72
	basicAck          method = 60<<16 | 80
	basicReject       method = 60<<16 | 90
	basicRecoverAsync method = 60<<16 | 100
	basicRecover      method = 60<<16 | 110
	basicRecoverOk    method = 60<<16 | 111
	basicNack         method = 60<<16 | 120
	confirmSelect     method = 85<<16 | 10
	confirmSelectOk   method = 85<<16 | 11
)

// classBasic is the class of content-carrying methods and headers.
const classBasic = 60

// Table is an AMQP field table.
type Table map[string]any

// maxTableDepth bounds how deeply tables and arrays may nest, so that a
// hostile frame cannot exhaust the stack.
const maxTableDepth = 16

// wireReader decodes method arguments. The first error sticks: later reads
// return zero values, and the caller checks err once.
type wireReader struct {
	b    []byte
	err  error
	bits byte // the octet that packed bits are read from
	nbit int  // bits already read from it; 0 or 8 means read a new one
}

var errShort = errors.New("truncated arguments")

// take returns the next n bytes, or nil once the input runs out.
func (r *wireReader) take(n int) []byte {
	r.nbit = 0 // any non-bit field ends a run of packed bits
	if r.err != nil || n < 0 || n > len(r.b) {
		r.err = firstErr(r.err, errShort)
		return nil
	}
	p := r.b[:n]
	r.b = r.b[n:]
	return p
}

// firstErr returns a if it is an error, else b.
func firstErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

func (r *wireReader) octet() byte {
	if p := r.take(1); p != nil {
		return p[0]
	}
	return 0
}

func (r *wireReader) short() uint16 {
	if p := r.take(2); p != nil {
		return binary.BigEndian.Uint16(p)
	}
	return 0
}

func (r *wireReader) long() uint32 {
	if p := r.take(4); p != nil {
		return binary.BigEndian.Uint32(p)
	}
	return 0
}

func (r *wireReader) longlong() uint64 {
	if p := r.take(8); p != nil {
		return binary.BigEndian.Uint64(p)
	}
	return 0
}

func (r *wireReader) shortstr() string { return string(r.take(int(r.octet()))) }

func (r *wireReader) longstr() []byte {
	n := r.long()
	if n > math.MaxInt32 {
		r.err = firstErr(r.err, errShort)
		return nil
	}
	return r.take(int(n))
}

// bit reads the next of a run of bits packed into octets, lowest bit first.
func (r *wireReader) bit() bool {
	if r.nbit == 0 || r.nbit == 8 {
		r.bits = r.octet()
	}
	v := r.bits&(1<<r.nbit) != 0
	r.nbit++
	return v
}

// table reads a field table.
func (r *wireReader) table() Table { return r.tableDepth(0) }

func (r *wireReader) tableDepth(depth int) Table {
	data := r.longstr()
	if r.err != nil {
		return nil
	}
	if depth > maxTableDepth {
		r.err = errors.New("tables nested too deeply")
		return nil
	}
	t := Table{}
	sub := &wireReader{b: data}
	for len(sub.b) > 0 && sub.err == nil {
		key := sub.shortstr()
		t[key] = sub.field(depth)
	}
	r.err = firstErr(r.err, sub.err)
	return t
}

// field reads one typed value of a table or array.
func (r *wireReader) field(depth int) any {
	switch typ := r.octet(); typ {
	case 't':
		return r.octet() != 0
	case 'b':
		return int8(r.octet())
	case 'B':
		return r.octet()
	case 's':
		return int16(r.short())
	case 'u':
		return r.short()
	case 'I':
		return int32(r.long())
	case 'i':
		return r.long()
	case 'l':
		return int64(r.longlong())
	case 'f':
		return math.Float32frombits(r.long())
	case 'd':
		return math.Float64frombits(r.longlong())
	case 'D':
		scale := r.octet()
		return [2]any{scale, int32(r.long())}
	case 'S':
		return string(r.longstr())
	case 'x':
		return slices.Clone(r.longstr())
	case 'T':
		return time.Unix(int64(r.longlong()), 0)
	case 'F':
		return r.tableDepth(depth + 1)
	case 'A':
		data := r.longstr()
		if depth > maxTableDepth {
			r.err = firstErr(r.err, errors.New("arrays nested too deeply"))
		}
		var a []any
		sub := &wireReader{b: data}
		for r.err == nil && len(sub.b) > 0 && sub.err == nil {
			a = append(a, sub.field(depth+1))
		}
		r.err = firstErr(r.err, sub.err)
		return a
	case 'V':
		return nil
	default:
		r.err = firstErr(r.err, fmt.Errorf("unknown field type %q", typ))
		return nil
	}
}

// wireWriter encodes method arguments.
type wireWriter struct {
	b    []byte
	nbit int // bits packed into the last octet; 0 or 8 means start a new one
}

func (w *wireWriter) octet(v byte)      { w.nbit = 0; w.b = append(w.b, v) }
func (w *wireWriter) short(v uint16)    { w.nbit = 0; w.b = binary.BigEndian.AppendUint16(w.b, v) }
func (w *wireWriter) long(v uint32)     { w.nbit = 0; w.b = binary.BigEndian.AppendUint32(w.b, v) }
func (w *wireWriter) longlong(v uint64) { w.nbit = 0; w.b = binary.BigEndian.AppendUint64(w.b, v) }

// shortstr writes s, cut to the 255 bytes a short string can hold.
func (w *wireWriter) shortstr(s string) {
	s = s[:min(len(s), 255)]
	w.octet(byte(len(s)))
	w.b = append(w.b, s...)
}

func (w *wireWriter) longstr(s []byte) {
	w.long(uint32(len(s)))
	w.b = append(w.b, s...)
}

// bit packs v into the current octet, lowest bit first.
func (w *wireWriter) bit(v bool) {
	if w.nbit == 0 || w.nbit == 8 {
		w.b = append(w.b, 0)
		w.nbit = 0
	}
	if v {
		w.b[len(w.b)-1] |= 1 << w.nbit
	}
	w.nbit++
}

// table writes t, whose values may be strings, bools, integers and tables:
// all the broker ever sends.
func (w *wireWriter) table(t Table) {
	sub := &wireWriter{}
	for _, k := range slices.Sorted(maps.Keys(t)) {
		sub.shortstr(k)
		switch v := t[k].(type) {
		case string:
			sub.octet('S')
			sub.longstr([]byte(v))
		case bool:
			sub.octet('t')
			if v {
				sub.octet(1)
			} else {
				sub.octet(0)
			}
		case int:
			sub.octet('l')
			sub.longlong(uint64(v))
		case Table:
			sub.octet('F')
			sub.table(v)
		default:
			panic(fmt.Sprintf("broker: cannot encode %T in a table", v))
		}
	}
	w.longstr(sub.b)
}

// appendFrame appends one frame to buf.
func appendFrame(buf []byte, typ byte, channel uint16, payload []byte) []byte {
	buf = append(buf, typ)
	buf = binary.BigEndian.AppendUint16(buf, channel)
	buf = binary.BigEndian.AppendUint32(buf, uint32(len(payload)))
	buf = append(buf, payload...)
	return append(buf, frameEnd)
}

// appendMethod appends a method frame whose arguments args writes.
func appendMethod(buf []byte, channel uint16, m method, args func(w *wireWriter)) []byte {
	w := &wireWriter{}
	w.short(m.class())
	w.short(m.id())
	if args != nil {
		args(w)
	}
	return appendFrame(buf, frameMethod, channel, w.b)
}

// appendContent appends a message's header frame and its body split into
// body frames that fit frameMax.
func appendContent(buf []byte, channel uint16, msg *message, frameMax int) []byte {
	w := &wireWriter{}
	w.short(classBasic)
	w.short(0) // weight
	w.longlong(uint64(len(msg.body)))
	w.b = append(w.b, msg.props...)
	buf = appendFrame(buf, frameHeader, channel, w.b)
	for body, chunk := msg.body, frameMax-8; len(body) > 0; {
		n := min(len(body), chunk)
		buf = appendFrame(buf, frameBody, channel, body[:n])
		body = body[n:]
	}
	return buf
}

// frame is one frame read off the wire.
type frame struct {
	typ     byte
	channel uint16
	payload []byte
}

// errBadFrame is a frame larger than the negotiated maximum, or one that
// does not end with frameEnd.
var errBadFrame = errors.New("bad frame")

// readFrame reads one frame of at most frameMax bytes. An oversized frame
// is refused by its header, before anything is allocated for it.
func readFrame(r *bufio.Reader, frameMax int) (frame, error) {
	var head [7]byte
	if _, err := io.ReadFull(r, head[:]); err != nil {
		return frame{}, err
	}
	f := frame{typ: head[0], channel: binary.BigEndian.Uint16(head[1:3])}
	size := binary.BigEndian.Uint32(head[3:7])
	if int64(size) > int64(frameMax-8) {
		return frame{}, fmt.Errorf("%w: %d bytes, larger than the negotiated frame_max %d", errBadFrame, uint64(size)+8, frameMax)
	}
	f.payload = make([]byte, size+1)
	if _, err := io.ReadFull(r, f.payload); err != nil {
		return frame{}, err
	}
	if f.payload[size] != frameEnd {
		return frame{}, fmt.Errorf("%w: bad frame end 0x%02x", errBadFrame, f.payload[size])
	}
	f.payload = f.payload[:size]
	return f, nil
}

// amqpError is a failure the broker reports to its client: a channel error
// closes the AMQP channel, a connection error the whole connection.
type amqpError struct {
	code       uint16
	text       string
	cause      method // the method that failed, 0 if none
	connection bool
}

func (e *amqpError) Error() string { return fmt.Sprintf("%d %s", e.code, e.text) }

// channelError returns a channel error with RabbitMQ's wording, which
// prefixes the text with the code's name.
func channelError(code uint16, cause method, format string, args ...any) *amqpError {
	return &amqpError{code: code, text: replyName(code) + " - " + fmt.Sprintf(format, args...), cause: cause}
}

// connectionError is like channelError, for errors that end the connection.
func connectionError(code uint16, cause method, format string, args ...any) *amqpError {
	e := channelError(code, cause, format, args...)
	e.connection = true
	return e
}

// replyName returns the constant name of a reply code.
func replyName(code uint16) string {
	switch code {
	case replyConnectionForced:
		return "CONNECTION_FORCED"
	case replyAccessRefused:
		return "ACCESS_REFUSED"
	case replyNotFound:
		return "NOT_FOUND"
	case replyResourceLocked:
		return "RESOURCE_LOCKED"
	case replyPreconditionFailed:
		return "PRECONDITION_FAILED"
	case replyFrameError:
		return "FRAME_ERROR"
	case replySyntaxError:
		return "SYNTAX_ERROR"
	case replyCommandInvalid:
		return "COMMAND_INVALID"
	case replyChannelError:
		return "CHANNEL_ERROR"
	case replyUnexpectedFrame:
		return "UNEXPECTED_FRAME"
	case replyNotAllowed:
		return "NOT_ALLOWED"
	case replyNotImplemented:
		return "NOT_IMPLEMENTED"
	}
	return "INTERNAL_ERROR"
}

// ---------------------------------------------------------------------
// The model: exchanges, queues, routing
// ---------------------------------------------------------------------

// BrokerConfig sets the embedded broker's credentials and limits.
type BrokerConfig struct {
	User, Password string        // the one account; guest/guest if empty
	MaxQueueLength int           // ready messages a queue holds; 0 means 100,000
	FrameMax       int           // largest frame offered to clients; 0 means 128 KiB
	MaxMessage     int           // largest message body accepted; 0 means 16 MiB
	Heartbeat      time.Duration // heartbeat offered to clients; 0 means 60s
	Logger         *slog.Logger  // nil logs nothing
}

// withDefaults fills in what cfg leaves zero.
func (cfg BrokerConfig) withDefaults() BrokerConfig {
	if cfg.User == "" && cfg.Password == "" {
		cfg.User, cfg.Password = "guest", "guest"
	}
	if cfg.MaxQueueLength <= 0 {
		cfg.MaxQueueLength = 100_000
	}
	if cfg.FrameMax <= 0 {
		cfg.FrameMax = 128 << 10
	}
	cfg.FrameMax = max(cfg.FrameMax, frameMinSize)
	if cfg.MaxMessage <= 0 {
		cfg.MaxMessage = 16 << 20
	}
	if cfg.Heartbeat <= 0 {
		cfg.Heartbeat = 60 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return cfg
}

// Broker is an in-memory AMQP 0-9-1 broker with one virtual host, "/".
// Clients reach it in-process through Dial, or over TCP after Listen.
type Broker struct {
	cfg BrokerConfig

	// mu guards the model, and every connection's channels, consumers and
	// unacknowledged deliveries: the broker is small enough that one lock
	// is both simplest and fast enough.
	mu        sync.Mutex
	exchanges map[string]*exchange
	queues    map[string]*queue
	conns     map[*brokerConn]struct{}
	listeners []net.Listener
	closed    bool

	wg sync.WaitGroup // one count per connection and per accept loop
}

// NewBroker returns a running broker with the default exchange and the
// standard amq.* exchanges declared.
func NewBroker(cfg BrokerConfig) *Broker {
	b := &Broker{
		cfg:       cfg.withDefaults(),
		exchanges: make(map[string]*exchange),
		queues:    make(map[string]*queue),
		conns:     make(map[*brokerConn]struct{}),
	}
	for name, kind := range map[string]string{"": "direct", "amq.direct": "direct", "amq.fanout": "fanout", "amq.topic": "topic"} {
		b.exchanges[name] = &exchange{name: name, kind: kind, durable: true}
	}
	return b
}

// Dial connects a client in-process: it returns one end of a net.Pipe and
// serves the other. Its signature fits amqp.Config.Dial.
func (b *Broker) Dial(network, addr string) (net.Conn, error) {
	client, server := net.Pipe()
	if !b.serve(server) {
		client.Close()
		return nil, errors.New("broker: closed")
	}
	return client, nil
}

// Listen serves AMQP clients on a TCP address, such as "127.0.0.1:5673".
// It returns the address it listens on.
func (b *Broker) Listen(addr string) (net.Addr, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("broker listen: %w", err)
	}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		ln.Close()
		return nil, errors.New("broker: closed")
	}
	b.listeners = append(b.listeners, ln)
	b.wg.Add(1)
	b.mu.Unlock()
	go func() {
		defer b.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if !b.serve(c) {
				c.Close()
			}
		}
	}()
	return ln.Addr(), nil
}

// Close tells every client the broker is going away (320 CONNECTION_FORCED,
// as RabbitMQ does on shutdown), drops all messages, and returns once every
// connection has ended.
func (b *Broker) Close() error {
	b.mu.Lock()
	b.closed = true
	for _, ln := range b.listeners {
		ln.Close()
	}
	for c := range b.conns {
		c.fail(connectionError(replyConnectionForced, 0, "broker shutdown"))
	}
	b.mu.Unlock()
	b.wg.Wait()
	return nil
}

// exchange routes published messages to the queues bound to it.
type exchange struct {
	name       string
	kind       string // direct, fanout or topic
	durable    bool
	autoDelete bool
	internal   bool
	bindings   []binding
	wasBound   bool // auto-delete exchanges go when their last binding does
}

// binding ties a queue to an exchange under a routing key.
type binding struct {
	queue *queue
	key   string
}

// route returns the queues that a message with key reaches, each once.
func (b *Broker) route(e *exchange, key string) []*queue {
	if e.name == "" {
		if q, ok := b.queues[key]; ok {
			return []*queue{q}
		}
		return nil
	}
	var qs []*queue
	for _, bd := range e.bindings {
		if slices.Contains(qs, bd.queue) {
			continue
		}
		switch e.kind {
		case "fanout":
			qs = append(qs, bd.queue)
		case "direct":
			if bd.key == key {
				qs = append(qs, bd.queue)
			}
		case "topic":
			if topicMatch(strings.Split(bd.key, "."), strings.Split(key, ".")) {
				qs = append(qs, bd.queue)
			}
		}
	}
	return qs
}

// topicMatch matches routing key words against a binding pattern, where
// "*" stands for one word and "#" for zero or more.
func topicMatch(pattern, words []string) bool {
	for len(pattern) > 0 {
		switch p := pattern[0]; p {
		case "#":
			for i := 0; i <= len(words); i++ {
				if topicMatch(pattern[1:], words[i:]) {
					return true
				}
			}
			return false
		default:
			if len(words) == 0 || (p != "*" && p != words[0]) {
				return false
			}
			pattern, words = pattern[1:], words[1:]
		}
	}
	return len(words) == 0
}

// message is one published message. Its properties are kept as the raw
// bytes of the content header, since the broker only passes them on.
type message struct {
	exchange   string
	routingKey string
	props      []byte
	body       []byte
}

// ready is a message waiting in a queue.
type ready struct {
	msg         *message
	redelivered bool
}

// queue holds messages until a consumer takes them.
type queue struct {
	name       string
	durable    bool
	exclusive  *brokerConn // the owner of an exclusive queue, else nil
	autoDelete bool
	maxLength  int
	rejectNew  bool          // x-overflow reject-publish: refuse new messages when full, else drop the oldest
	expires    time.Duration // x-expires: delete the queue once unused for this long; 0 never
	used       uint64        // counts uses, so that an expiry timer knows whether it is stale

	messages  []ready
	consumers []*consumer
	next      int  // round-robin position among consumers
	consumed  bool // auto-delete queues go when their last consumer does
}

// consumer is a subscription of an AMQP channel to a queue.
type consumer struct {
	tag       string
	ch        *brokerChannel
	queue     *queue
	noAck     bool
	exclusive bool
}

// enqueue adds msg to q, dropping the oldest message or refusing msg when
// q is full. It reports whether msg was taken.
func (q *queue) enqueue(msg *message) bool {
	if len(q.messages) >= q.maxLength {
		if q.rejectNew {
			return false
		}
		q.messages = q.messages[1:]
	}
	q.messages = append(q.messages, ready{msg: msg})
	return true
}

// requeue puts deliveries back at the head of q, in their original order,
// marked redelivered.
func (q *queue) requeue(msgs []*message) {
	back := make([]ready, 0, len(msgs)+len(q.messages))
	for _, m := range msgs {
		back = append(back, ready{msg: m, redelivered: true})
	}
	q.messages = append(back, q.messages...)
}

// dispatch hands ready messages to consumers that can take them, round
// robin, until it runs out of one or the other.
func (q *queue) dispatch() {
	for len(q.messages) > 0 && len(q.consumers) > 0 {
		var c *consumer
		for i := range q.consumers {
			candidate := q.consumers[(q.next+i)%len(q.consumers)]
			if candidate.ch.canTake() {
				c = candidate
				q.next = (q.next + i + 1) % len(q.consumers)
				break
			}
		}
		if c == nil {
			return
		}
		r := q.messages[0]
		q.messages[0] = ready{}
		q.messages = q.messages[1:]
		c.ch.deliver(c, q, r)
	}
}

// removeConsumer takes c off its queue, and deletes an auto-delete queue
// whose last consumer it was.
func (b *Broker) removeConsumer(c *consumer) {
	q := c.queue
	q.consumers = slices.DeleteFunc(q.consumers, func(x *consumer) bool { return x == c })
	q.next = 0
	if q.autoDelete && q.consumed && len(q.consumers) == 0 {
		b.deleteQueue(q)
	}
	b.use(q)
}

// use notes that q was used and, if it has an expiry and no consumers,
// deletes it once it has gone unused for that long, as RabbitMQ's
// x-expires does.
func (b *Broker) use(q *queue) {
	q.used++
	if q.expires == 0 || len(q.consumers) > 0 {
		return
	}
	used := q.used
	time.AfterFunc(q.expires, func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		if q.used == used && len(q.consumers) == 0 {
			b.deleteQueue(q)
		}
	})
}

// deleteQueue removes q and its bindings, cancelling its consumers with a
// basic.cancel (consumer_cancel_notify). It returns how many messages it
// dropped.
func (b *Broker) deleteQueue(q *queue) int {
	if b.queues[q.name] != q {
		return 0
	}
	delete(b.queues, q.name)
	for _, c := range q.consumers {
		delete(c.ch.consumers, c.tag)
		c.ch.conn.sendMethod(c.ch.id, basicCancel, func(w *wireWriter) {
			w.shortstr(c.tag)
			w.bit(true) // no-wait
		})
	}
	q.consumers = nil
	for _, e := range b.exchanges {
		if slices.ContainsFunc(e.bindings, func(bd binding) bool { return bd.queue == q }) {
			e.bindings = slices.DeleteFunc(e.bindings, func(bd binding) bool { return bd.queue == q })
			b.exchangeUnbound(e)
		}
	}
	n := len(q.messages)
	q.messages = nil
	return n
}

// exchangeUnbound deletes an auto-delete exchange that has lost its last
// binding.
func (b *Broker) exchangeUnbound(e *exchange) {
	if e.autoDelete && e.wasBound && len(e.bindings) == 0 {
		delete(b.exchanges, e.name)
	}
}

// newName returns prefix followed by a random URL-safe string, as
// RabbitMQ names queues ("amq.gen-…") and consumers ("amq.ctag-…").
func newName(prefix string) string {
	b := make([]byte, 16)
	rand.Read(b)
	return prefix + base64.RawURLEncoding.EncodeToString(b)
}

// ---------------------------------------------------------------------
// A connection's life
// ---------------------------------------------------------------------

// protocolHeader opens every AMQP 0-9-1 connection.
var protocolHeader = []byte("AMQP\x00\x00\x09\x01")

// Limits on one connection.
const (
	// maxPending is how many bytes may wait to be written to a client
	// before the broker stops delivering to it until they drain: the
	// socket's own pressure, passed back to the queues.
	maxPending = 1 << 20
	// maxBacklog is how many bytes of replies may wait for a client that
	// does not read, before it is disconnected: it bounds the memory a
	// client can pin by publishing without reading its confirms.
	maxBacklog = 64 << 20
	// handshakeTimeout bounds the handshake, and closeTimeout the wait for
	// a client's connection.close-ok.
	handshakeTimeout = 10 * time.Second
	closeTimeout     = time.Second
	// writeTimeout bounds one write: a client that reads nothing for
	// this long is gone.
	writeTimeout = time.Minute
)

// brokerConn is one client connection.
type brokerConn struct {
	broker *Broker
	nc     net.Conn
	r      *bufio.Reader

	// Set by the handshake, then read-only.
	frameMax  int
	heartbeat time.Duration

	// Guarded by broker.mu.
	channels map[uint16]*brokerChannel
	closing  bool // connection.close sent; only close-ok is read now

	// mu guards the fields below it.
	mu        sync.Mutex
	out       []byte        // encoded frames waiting for the writer
	throttled bool          // deliveries held back until out drains
	wrote     bool          // something was written since the last heartbeat tick
	dead      bool          // the writer has given up; out is dropped
	wake      chan struct{} // capacity 1: one pending wake-up is enough for any number of frames
	done      chan struct{} // closed by run when the writer must flush and stop
}

// serve starts serving nc, unless the broker is closed.
func (b *Broker) serve(nc net.Conn) bool {
	c := &brokerConn{
		broker:   b,
		nc:       nc,
		r:        bufio.NewReaderSize(nc, 64<<10),
		frameMax: frameMinSize,
		channels: make(map[uint16]*brokerChannel),
		wake:     make(chan struct{}, 1),
		done:     make(chan struct{}),
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return false
	}
	b.conns[c] = struct{}{}
	b.wg.Add(1)
	go c.run()
	return true
}

// run is the connection's reader; it runs on its own goroutine from serve
// and cleans up when the connection ends.
func (c *brokerConn) run() {
	var helpers sync.WaitGroup // the writer and the heartbeat sender
	helpers.Go(c.writeLoop)
	err := c.handshake()
	if err == nil {
		if c.heartbeat > 0 {
			helpers.Go(c.heartbeatLoop)
		}
		err = c.readLoop()
	}
	var ae *amqpError
	if errors.As(err, &ae) {
		c.broker.cfg.Logger.Info("broker: closing connection", "remote", c.nc.RemoteAddr().String(), "err", ae.text)
		c.broker.mu.Lock()
		c.fail(ae)
		c.broker.mu.Unlock()
		c.awaitCloseOk()
	}
	c.broker.mu.Lock()
	c.teardown()
	c.broker.mu.Unlock()
	close(c.done)
	helpers.Wait()
	c.nc.Close()
	c.broker.wg.Done()
}

// handshake runs the connection's opening: protocol header, start,
// start-ok (PLAIN), tune, tune-ok, open.
func (c *brokerConn) handshake() error {
	c.nc.SetReadDeadline(time.Now().Add(handshakeTimeout))
	defer c.nc.SetReadDeadline(time.Time{})
	head := make([]byte, len(protocolHeader))
	if _, err := io.ReadFull(c.r, head); err != nil {
		return err
	}
	if !bytes.Equal(head, protocolHeader) {
		c.send(protocolHeader) // the spec's answer to a protocol we do not speak
		return errors.New("broker: bad protocol header")
	}
	cfg := c.broker.cfg
	c.sendMethod(0, connectionStart, func(w *wireWriter) {
		w.octet(0)
		w.octet(9)
		w.table(Table{
			"product":  "wsamqp embedded broker",
			"platform": "Go",
			"capabilities": Table{
				"publisher_confirms":         true,
				"basic.nack":                 true,
				"consumer_cancel_notify":     true,
				"exchange_exchange_bindings": false,
				"per_consumer_qos":           false,
			},
		})
		w.longstr([]byte("PLAIN"))
		w.longstr([]byte("en_US"))
	})

	r, err := c.expect(connectionStartOk)
	if err != nil {
		return err
	}
	r.table() // client properties
	mechanism, response := r.shortstr(), r.longstr()
	r.shortstr() // locale
	if r.err != nil {
		return connectionError(replySyntaxError, connectionStartOk, "%v", r.err)
	}
	if mechanism != "PLAIN" {
		return connectionError(replyAccessRefused, connectionStartOk, "mechanism %s not supported", mechanism)
	}
	user, password := parsePlain(response)
	if user != cfg.User || password != cfg.Password {
		return connectionError(replyAccessRefused, connectionStartOk, "Login was refused using authentication mechanism PLAIN")
	}

	c.sendMethod(0, connectionTune, func(w *wireWriter) {
		w.short(2047)
		w.long(uint32(cfg.FrameMax))
		w.short(uint16(cfg.Heartbeat / time.Second))
	})
	if r, err = c.expect(connectionTuneOk); err != nil {
		return err
	}
	r.short() // channel-max: the client's own limit
	frameMax, heartbeat := int(r.long()), time.Duration(r.short())*time.Second
	if r.err != nil {
		return connectionError(replySyntaxError, connectionTuneOk, "%v", r.err)
	}
	if frameMax == 0 || frameMax > cfg.FrameMax {
		frameMax = cfg.FrameMax
	}
	c.frameMax, c.heartbeat = max(frameMax, frameMinSize), heartbeat

	if r, err = c.expect(connectionOpen); err != nil {
		return err
	}
	if vhost := r.shortstr(); vhost != "/" {
		return connectionError(replyNotAllowed, connectionOpen, "vhost %s not found", vhost)
	}
	c.sendMethod(0, connectionOpenOk, func(w *wireWriter) { w.shortstr("") })
	return nil
}

// parsePlain splits a SASL PLAIN response, "\x00user\x00password".
func parsePlain(response []byte) (user, password string) {
	parts := strings.SplitN(string(response), "\x00", 3)
	if len(parts) != 3 {
		return "", ""
	}
	return parts[1], parts[2]
}

// expect reads the next frame, which must be method m on channel 0, and
// returns a reader over its arguments.
func (c *brokerConn) expect(m method) (*wireReader, error) {
	f, err := readFrame(c.r, c.frameMax)
	if err != nil {
		return nil, frameErr(err)
	}
	if f.typ != frameMethod || f.channel != 0 {
		return nil, connectionError(replyUnexpectedFrame, m, "expected method %d.%d", m.class(), m.id())
	}
	r := &wireReader{b: f.payload}
	got := method(uint32(r.short())<<16 | uint32(r.short()))
	if r.err != nil || got != m {
		return nil, connectionError(replyCommandInvalid, m, "expected method %d.%d, got %d.%d", m.class(), m.id(), got.class(), got.id())
	}
	return r, nil
}

// frameErr turns a malformed frame into a connection error; an I/O error
// is passed on as it is.
func frameErr(err error) error {
	if errors.Is(err, errBadFrame) {
		return connectionError(replyFrameError, 0, "%v", err)
	}
	return err
}

// readLoop reads and handles frames until the connection ends.
func (c *brokerConn) readLoop() error {
	for closing := false; ; {
		if c.heartbeat > 0 && !closing {
			// Two missed heartbeats and the client is taken for dead.
			c.nc.SetReadDeadline(time.Now().Add(2 * c.heartbeat))
		}
		f, err := readFrame(c.r, c.frameMax)
		if err != nil {
			return frameErr(err)
		}
		c.broker.mu.Lock()
		err = c.handleFrame(f)
		closing = c.closing // fail set a deadline for the close-ok
		c.broker.mu.Unlock()
		if err != nil {
			return err
		}
	}
}

// awaitCloseOk sends a connection error's connection.close and waits a
// little for the client's close-ok, discarding anything else.
func (c *brokerConn) awaitCloseOk() {
	c.nc.SetReadDeadline(time.Now().Add(closeTimeout))
	for {
		f, err := readFrame(c.r, max(c.frameMax, frameMinSize))
		if err != nil {
			return
		}
		if f.typ == frameMethod && f.channel == 0 && len(f.payload) >= 4 &&
			method(binary.BigEndian.Uint32(f.payload)) == connectionCloseOk {
			return
		}
	}
}

// teardown releases what the connection held: its channels' consumers and
// unacknowledged deliveries, and its exclusive queues. broker.mu is held.
func (c *brokerConn) teardown() {
	for _, ch := range c.channels {
		ch.close()
	}
	c.channels = nil
	for _, q := range c.broker.queues {
		if q.exclusive == c {
			c.broker.deleteQueue(q)
		}
	}
	delete(c.broker.conns, c)
}

// fail reports err to the client: a connection.close for a connection
// error, a channel.close for a channel error. broker.mu is held.
func (c *brokerConn) fail(err *amqpError) {
	if c.closing {
		return
	}
	c.closing = true
	c.sendMethod(0, connectionClose, func(w *wireWriter) {
		w.short(err.code)
		w.shortstr(err.text)
		w.short(err.cause.class())
		w.short(err.cause.id())
	})
	// Unblock the reader: it answers with its own error, then awaits
	// the close-ok.
	c.nc.SetReadDeadline(time.Now().Add(closeTimeout))
}

// send queues encoded frames for the writer. A client that lets more
// than maxBacklog bytes pile up is dropped.
func (c *brokerConn) send(frames []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.dead {
		return
	}
	if len(c.out)+len(frames) > maxBacklog {
		c.dead = true
		c.out = nil
		c.nc.Close()
		return
	}
	c.out = append(c.out, frames...)
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// sendMethod queues one method frame.
func (c *brokerConn) sendMethod(channel uint16, m method, args func(w *wireWriter)) {
	c.send(appendMethod(nil, channel, m, args))
}

// writeLoop writes queued frames to the client in batches; it is the
// connection's only writer, and runs on its own goroutine from run.
func (c *brokerConn) writeLoop() {
	var buf []byte
	for {
		var stop bool
		select {
		case <-c.wake:
		case <-c.done:
			stop = true
		}
		c.mu.Lock()
		buf, c.out = c.out, buf[:0]
		c.mu.Unlock()
		if len(buf) > 0 {
			c.nc.SetWriteDeadline(time.Now().Add(writeTimeout))
			if _, err := c.nc.Write(buf); err != nil {
				c.mu.Lock()
				c.dead, c.out = true, nil
				c.mu.Unlock()
				c.nc.Close() // the reader sees it and tears down
				return
			}
		}
		c.mu.Lock()
		c.wrote = c.wrote || len(buf) > 0
		resume := c.throttled && len(c.out) < maxPending
		if resume {
			c.throttled = false
		}
		pending := len(c.out)
		c.mu.Unlock()
		if resume {
			c.broker.mu.Lock()
			for _, ch := range c.channels {
				ch.redispatch()
			}
			c.broker.mu.Unlock()
		}
		if stop && pending == 0 {
			return
		}
	}
}

// heartbeatLoop sends a heartbeat whenever a heartbeat interval passes
// with nothing written; it runs on its own goroutine until the writer stops.
func (c *brokerConn) heartbeatLoop() {
	tick := time.NewTicker(c.heartbeat / 2)
	defer tick.Stop()
	for {
		select {
		case <-c.done:
			return
		case <-tick.C:
			c.mu.Lock()
			idle := !c.wrote
			c.wrote = false
			c.mu.Unlock()
			if idle {
				c.send(appendFrame(nil, frameHeartbeat, 0, nil))
			}
		}
	}
}

// pendingFull reports whether deliveries to this connection should wait,
// and marks it so the writer resumes them once it has drained.
func (c *brokerConn) pendingFull() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.out) >= maxPending {
		c.throttled = true
	}
	return c.throttled
}

// ---------------------------------------------------------------------
// Channels and the methods they answer
// ---------------------------------------------------------------------

// brokerChannel is one AMQP channel of a connection. All of its fields are
// guarded by broker.mu.
type brokerChannel struct {
	id        uint16
	conn      *brokerConn
	closing   bool // channel.close sent; waiting for close-ok
	active    bool // channel.flow
	prefetch  int  // 0: no limit
	consumers map[string]*consumer
	unacked   []delivery // in delivery tag order
	nextTag   uint64
	confirm   bool
	published uint64 // publish sequence number in confirm mode
	lastQueue string // the queue an empty queue name stands for
	incoming  *incoming
}

// delivery is a message delivered and not yet acknowledged.
type delivery struct {
	tag   uint64
	msg   *message
	queue *queue
}

// incoming is a message being received: its basic.publish arrived, its
// header and body frames are on their way.
type incoming struct {
	msg       message
	mandatory bool
	size      uint64
	haveHead  bool
}

// canTake reports whether the channel may receive another delivery.
func (ch *brokerChannel) canTake() bool {
	return ch.active && !ch.closing &&
		(ch.prefetch == 0 || len(ch.unacked) < ch.prefetch) && !ch.conn.pendingFull()
}

// deliver sends r to consumer c as basic.deliver.
func (ch *brokerChannel) deliver(c *consumer, q *queue, r ready) {
	ch.nextTag++
	tag := ch.nextTag
	if !c.noAck {
		ch.unacked = append(ch.unacked, delivery{tag: tag, msg: r.msg, queue: q})
	}
	buf := appendMethod(nil, ch.id, basicDeliver, func(w *wireWriter) {
		w.shortstr(c.tag)
		w.longlong(tag)
		w.bit(r.redelivered)
		w.shortstr(r.msg.exchange)
		w.shortstr(r.msg.routingKey)
	})
	ch.conn.send(appendContent(buf, ch.id, r.msg, ch.conn.frameMax))
}

// redispatch offers messages to this channel's consumers again, once the
// channel can take more.
func (ch *brokerChannel) redispatch() {
	for _, c := range ch.consumers {
		c.queue.dispatch()
	}
}

// close cancels the channel's consumers and requeues its unacknowledged
// deliveries. broker.mu is held.
func (ch *brokerChannel) close() {
	b := ch.conn.broker
	for _, c := range ch.consumers {
		b.removeConsumer(c)
	}
	ch.consumers = nil
	ch.incoming = nil
	unacked := ch.unacked
	ch.unacked = nil
	ch.requeue(unacked)
}

// requeue returns deliveries to their queues and dispatches them again.
func (ch *brokerChannel) requeue(ds []delivery) {
	byQueue := map[*queue][]*message{}
	var order []*queue
	for _, d := range ds {
		if _, ok := byQueue[d.queue]; !ok {
			order = append(order, d.queue)
		}
		byQueue[d.queue] = append(byQueue[d.queue], d.msg)
	}
	for _, q := range order {
		if ch.conn.broker.queues[q.name] == q {
			q.requeue(byQueue[q])
		}
	}
	for _, q := range order {
		q.dispatch()
	}
}

// handleFrame handles one frame after the handshake. A channel error
// closes the channel and returns nil; a connection error is returned.
// broker.mu is held.
func (c *brokerConn) handleFrame(f frame) error {
	if c.closing {
		if f.typ == frameMethod && f.channel == 0 && len(f.payload) >= 4 &&
			method(binary.BigEndian.Uint32(f.payload)) == connectionCloseOk {
			return io.EOF
		}
		return nil // everything else is ignored until close-ok
	}
	if f.typ == frameHeartbeat {
		if f.channel != 0 {
			return connectionError(replyFrameError, 0, "heartbeat on channel %d", f.channel)
		}
		return nil
	}
	if f.channel == 0 {
		if f.typ != frameMethod {
			return connectionError(replyUnexpectedFrame, 0, "content frame on channel 0")
		}
		return c.handleConnectionMethod(f.payload)
	}
	ch := c.channels[f.channel]
	var err *amqpError
	switch {
	case ch == nil && f.typ == frameMethod:
		err = c.openChannel(f.channel, f.payload)
	case ch == nil:
		err = connectionError(replyChannelError, 0, "channel %d is not open", f.channel)
	case ch.closing:
		if f.typ == frameMethod && len(f.payload) >= 4 {
			if m := method(binary.BigEndian.Uint32(f.payload)); m == channelCloseOk || m == channelClose {
				delete(c.channels, ch.id)
				if m == channelClose {
					c.sendMethod(ch.id, channelCloseOk, nil)
				}
			}
		}
	case f.typ == frameMethod:
		err = ch.handleMethod(f.payload)
	case f.typ == frameHeader || f.typ == frameBody:
		err = ch.handleContent(f)
	default:
		err = connectionError(replyFrameError, 0, "unknown frame type %d", f.typ)
	}
	if err == nil {
		return nil
	}
	if err.connection {
		return err
	}
	// A channel error: close the channel, keep the connection.
	ch = c.channels[f.channel]
	ch.close()
	ch.closing = true
	c.sendMethod(ch.id, channelClose, func(w *wireWriter) {
		w.short(err.code)
		w.shortstr(err.text)
		w.short(err.cause.class())
		w.short(err.cause.id())
	})
	return nil
}

// handleConnectionMethod handles methods on channel 0 after the handshake.
func (c *brokerConn) handleConnectionMethod(payload []byte) error {
	r := &wireReader{b: payload}
	m := method(r.long())
	switch m {
	case connectionClose:
		c.sendMethod(0, connectionCloseOk, nil)
		return io.EOF
	case connectionCloseOk:
		return io.EOF
	}
	return connectionError(replyCommandInvalid, m, "unexpected method %d.%d on channel 0", m.class(), m.id())
}

// openChannel handles the first frame on a channel that is not open,
// which must be channel.open.
func (c *brokerConn) openChannel(id uint16, payload []byte) *amqpError {
	r := &wireReader{b: payload}
	if m := method(r.long()); m != channelOpen {
		return connectionError(replyChannelError, m, "channel %d is not open", id)
	}
	c.channels[id] = &brokerChannel{id: id, conn: c, active: true, consumers: make(map[string]*consumer)}
	c.sendMethod(id, channelOpenOk, func(w *wireWriter) { w.longstr(nil) })
	return nil
}

// handleMethod handles a method frame on an open channel.
func (ch *brokerChannel) handleMethod(payload []byte) *amqpError {
	r := &wireReader{b: payload}
	m := method(r.long())
	if ch.incoming != nil {
		return connectionError(replyUnexpectedFrame, m, "method %d.%d inside content", m.class(), m.id())
	}
	b, c := ch.conn.broker, ch.conn
	// reply sends m's answer unless the client asked for none.
	reply := func(noWait bool, ok method, args func(w *wireWriter)) {
		if !noWait {
			c.sendMethod(ch.id, ok, args)
		}
	}
	// syntax reports arguments that did not parse.
	syntax := func() *amqpError {
		if r.err != nil {
			return connectionError(replySyntaxError, m, "%v", r.err)
		}
		return nil
	}

	switch m {
	case channelOpen:
		return connectionError(replyChannelError, m, "channel %d is already open", ch.id)

	case channelClose:
		ch.close()
		delete(c.channels, ch.id)
		c.sendMethod(ch.id, channelCloseOk, nil)
		return nil

	case channelFlow:
		ch.active = r.bit()
		reply(false, channelFlowOk, func(w *wireWriter) { w.bit(ch.active) })
		ch.redispatch()
		return syntax()

	case exchangeDeclare:
		r.short()
		name, kind := r.shortstr(), r.shortstr()
		passive, durable, autoDelete, internal, noWait := r.bit(), r.bit(), r.bit(), r.bit(), r.bit()
		r.table()
		if err := syntax(); err != nil {
			return err
		}
		e, exists := b.exchanges[name]
		switch {
		case passive && !exists:
			return channelError(replyNotFound, m, "no exchange '%s' in vhost '/'", name)
		case passive:
		case name == "" || (strings.HasPrefix(name, "amq.") && !exists):
			return channelError(replyAccessRefused, m, "exchange name '%s' contains reserved prefix 'amq.*'", name)
		case kind != "direct" && kind != "fanout" && kind != "topic":
			return connectionError(replyCommandInvalid, m, "invalid exchange type '%s'", kind)
		case exists && e.kind != kind:
			return channelError(replyPreconditionFailed, m, "inequivalent arg 'type' for exchange '%s' in vhost '/': received '%s' but current is '%s'", name, kind, e.kind)
		case exists && e.durable != durable:
			return channelError(replyPreconditionFailed, m, "inequivalent arg 'durable' for exchange '%s' in vhost '/': received '%t' but current is '%t'", name, durable, e.durable)
		case !exists:
			b.exchanges[name] = &exchange{name: name, kind: kind, durable: durable, autoDelete: autoDelete, internal: internal}
		}
		reply(noWait, exchangeDeclareOk, nil)
		return nil

	case exchangeDelete:
		r.short()
		name, ifUnused, noWait := r.shortstr(), r.bit(), r.bit()
		if err := syntax(); err != nil {
			return err
		}
		e, exists := b.exchanges[name]
		switch {
		case name == "" || strings.HasPrefix(name, "amq."):
			return channelError(replyAccessRefused, m, "operation not permitted on the default exchange or 'amq.*' exchanges")
		case exists && ifUnused && len(e.bindings) > 0:
			return channelError(replyPreconditionFailed, m, "exchange '%s' in vhost '/' in use", name)
		}
		delete(b.exchanges, name)
		reply(noWait, exchangeDeleteOk, nil)
		return nil

	case queueDeclare:
		r.short()
		name := r.shortstr()
		passive, durable, exclusive, autoDelete, noWait := r.bit(), r.bit(), r.bit(), r.bit(), r.bit()
		args := r.table()
		if err := syntax(); err != nil {
			return err
		}
		if name == "" && !passive {
			name = newName("amq.gen-")
		}
		q, exists := b.queues[name]
		switch {
		case passive && !exists:
			return channelError(replyNotFound, m, "no queue '%s' in vhost '/'", name)
		case exists && q.exclusive != nil && q.exclusive != c:
			return channelError(replyResourceLocked, m, "cannot obtain exclusive access to locked queue '%s' in vhost '/'", name)
		case passive:
		case !exists && strings.HasPrefix(name, "amq.") && !strings.HasPrefix(name, "amq.gen-"):
			return channelError(replyAccessRefused, m, "queue name '%s' contains reserved prefix 'amq.*'", name)
		case exists && (q.durable != durable || (q.exclusive != nil) != exclusive || q.autoDelete != autoDelete):
			return channelError(replyPreconditionFailed, m, "inequivalent arg 'durable', 'exclusive' or 'auto_delete' for queue '%s' in vhost '/'", name)
		case !exists:
			q = &queue{name: name, durable: durable, autoDelete: autoDelete, maxLength: b.cfg.MaxQueueLength}
			if exclusive {
				q.exclusive = c
			}
			if err := q.applyArguments(args, m); err != nil {
				return err
			}
			b.queues[name] = q
		}
		b.use(q)
		ch.lastQueue = name
		reply(noWait, queueDeclareOk, func(w *wireWriter) {
			w.shortstr(name)
			w.long(uint32(len(q.messages)))
			w.long(uint32(len(q.consumers)))
		})
		return nil

	case queueBind, queueUnbind:
		r.short()
		qname, ename, key := r.shortstr(), r.shortstr(), r.shortstr()
		noWait := m == queueBind && r.bit()
		r.table()
		if err := syntax(); err != nil {
			return err
		}
		q, e, err := ch.queueAndExchange(m, qname, ename)
		if err != nil {
			return err
		}
		bd := binding{queue: q, key: key}
		if m == queueBind {
			if !slices.Contains(e.bindings, bd) {
				e.bindings = append(e.bindings, bd)
				e.wasBound = true
			}
			reply(noWait, queueBindOk, nil)
			return nil
		}
		e.bindings = slices.DeleteFunc(e.bindings, func(x binding) bool { return x == bd })
		b.exchangeUnbound(e)
		reply(false, queueUnbindOk, nil)
		return nil

	case queuePurge:
		r.short()
		qname, noWait := r.shortstr(), r.bit()
		if err := syntax(); err != nil {
			return err
		}
		q, err := ch.findQueue(m, qname)
		if err != nil {
			return err
		}
		n := len(q.messages)
		q.messages = nil
		reply(noWait, queuePurgeOk, func(w *wireWriter) { w.long(uint32(n)) })
		return nil

	case queueDelete:
		r.short()
		qname, ifUnused, ifEmpty, noWait := r.shortstr(), r.bit(), r.bit(), r.bit()
		if err := syntax(); err != nil {
			return err
		}
		if qname == "" {
			qname = ch.lastQueue
		}
		q, exists := b.queues[qname]
		n := 0
		switch {
		case !exists: // deleting what is not there succeeds, as in RabbitMQ
		case q.exclusive != nil && q.exclusive != c:
			return channelError(replyResourceLocked, m, "cannot obtain exclusive access to locked queue '%s' in vhost '/'", qname)
		case ifUnused && len(q.consumers) > 0:
			return channelError(replyPreconditionFailed, m, "queue '%s' in vhost '/' in use", qname)
		case ifEmpty && len(q.messages) > 0:
			return channelError(replyPreconditionFailed, m, "queue '%s' in vhost '/' is not empty", qname)
		default:
			n = b.deleteQueue(q)
		}
		reply(noWait, queueDeleteOk, func(w *wireWriter) { w.long(uint32(n)) })
		return nil

	case basicQos:
		size, count := r.long(), r.short()
		r.bit() // global: the limit is per channel either way
		if err := syntax(); err != nil {
			return err
		}
		if size != 0 {
			return connectionError(replyNotImplemented, m, "prefetch_size!=0 (%d)", size)
		}
		ch.prefetch = int(count)
		reply(false, basicQosOk, nil)
		ch.redispatch()
		return nil

	case basicConsume:
		r.short()
		qname, tag := r.shortstr(), r.shortstr()
		r.bit() // no-local: RabbitMQ ignores it too
		noAck, exclusive, noWait := r.bit(), r.bit(), r.bit()
		r.table()
		if err := syntax(); err != nil {
			return err
		}
		q, err := ch.findQueue(m, qname)
		if err != nil {
			return err
		}
		if tag == "" {
			tag = newName("amq.ctag-")
		}
		if _, dup := ch.consumers[tag]; dup {
			return connectionError(replyNotAllowed, m, "attempt to reuse consumer tag '%s'", tag)
		}
		if len(q.consumers) > 0 && (exclusive || q.consumers[0].exclusive) {
			return channelError(replyAccessRefused, m, "queue '%s' in vhost '/' in exclusive use", q.name)
		}
		cons := &consumer{tag: tag, ch: ch, queue: q, noAck: noAck, exclusive: exclusive}
		ch.consumers[tag] = cons
		q.consumers = append(q.consumers, cons)
		q.consumed = true
		q.used++ // stops any expiry timer
		reply(noWait, basicConsumeOk, func(w *wireWriter) { w.shortstr(tag) })
		q.dispatch()
		return nil

	case basicCancel:
		tag, noWait := r.shortstr(), r.bit()
		if err := syntax(); err != nil {
			return err
		}
		if cons, ok := ch.consumers[tag]; ok {
			delete(ch.consumers, tag)
			b.removeConsumer(cons)
		}
		reply(noWait, basicCancelOk, func(w *wireWriter) { w.shortstr(tag) })
		return nil

	case basicPublish:
		r.short()
		ename, key, mandatory, immediate := r.shortstr(), r.shortstr(), r.bit(), r.bit()
		if err := syntax(); err != nil {
			return err
		}
		if immediate {
			return connectionError(replyNotImplemented, m, "immediate=true")
		}
		e, ok := b.exchanges[ename]
		if !ok {
			return channelError(replyNotFound, m, "no exchange '%s' in vhost '/'", ename)
		}
		if e.internal {
			return channelError(replyAccessRefused, m, "cannot publish to internal exchange '%s' in vhost '/'", ename)
		}
		ch.incoming = &incoming{msg: message{exchange: ename, routingKey: key}, mandatory: mandatory}
		return nil

	case basicGet:
		r.short()
		qname, noAck := r.shortstr(), r.bit()
		if err := syntax(); err != nil {
			return err
		}
		q, err := ch.findQueue(m, qname)
		if err != nil {
			return err
		}
		if len(q.messages) == 0 {
			c.sendMethod(ch.id, basicGetEmpty, func(w *wireWriter) { w.shortstr("") })
			return nil
		}
		rd := q.messages[0]
		q.messages = q.messages[1:]
		b.use(q)
		ch.nextTag++
		if !noAck {
			ch.unacked = append(ch.unacked, delivery{tag: ch.nextTag, msg: rd.msg, queue: q})
		}
		buf := appendMethod(nil, ch.id, basicGetOk, func(w *wireWriter) {
			w.longlong(ch.nextTag)
			w.bit(rd.redelivered)
			w.shortstr(rd.msg.exchange)
			w.shortstr(rd.msg.routingKey)
			w.long(uint32(len(q.messages)))
		})
		c.send(appendContent(buf, ch.id, rd.msg, c.frameMax))
		return nil

	case basicAck, basicNack, basicReject:
		tag := r.longlong()
		multiple := m != basicReject && r.bit()
		requeue := m != basicAck && r.bit()
		if err := syntax(); err != nil {
			return err
		}
		return ch.settle(m, tag, multiple, requeue)

	case basicRecover, basicRecoverAsync:
		if requeue := r.bit(); !requeue {
			return connectionError(replyNotImplemented, m, "requeue=false")
		}
		unacked := ch.unacked
		ch.unacked = nil
		ch.requeue(unacked)
		if m == basicRecover {
			reply(false, basicRecoverOk, nil)
		}
		return syntax()

	case confirmSelect:
		noWait := r.bit()
		if err := syntax(); err != nil {
			return err
		}
		ch.confirm = true
		reply(noWait, confirmSelectOk, nil)
		return nil
	}
	return connectionError(replyNotImplemented, m, "method %d.%d is not implemented by the embedded broker", m.class(), m.id())
}

// applyArguments reads the queue arguments the broker understands:
// x-max-length and x-overflow.
func (q *queue) applyArguments(args Table, m method) *amqpError {
	if v, ok := args["x-max-length"]; ok {
		n, ok := asInt(v)
		if !ok || n < 0 {
			return channelError(replyPreconditionFailed, m, "invalid arg 'x-max-length' for queue '%s' in vhost '/'", q.name)
		}
		q.maxLength = min(q.maxLength, n)
	}
	if v, ok := args["x-expires"]; ok {
		n, ok := asInt(v)
		if !ok || n <= 0 {
			return channelError(replyPreconditionFailed, m, "invalid arg 'x-expires' for queue '%s' in vhost '/'", q.name)
		}
		q.expires = time.Duration(n) * time.Millisecond
	}
	if v, ok := args["x-overflow"]; ok {
		switch v {
		case "drop-head":
		case "reject-publish":
			q.rejectNew = true
		default:
			return channelError(replyPreconditionFailed, m, "invalid arg 'x-overflow' for queue '%s' in vhost '/'", q.name)
		}
	}
	return nil
}

// asInt converts an integer table value to int.
func asInt(v any) (int, bool) {
	switch n := v.(type) {
	case int8:
		return int(n), true
	case uint8:
		return int(n), true
	case int16:
		return int(n), true
	case uint16:
		return int(n), true
	case int32:
		return int(n), true
	case uint32:
		return int(n), true
	case int64:
		return int(n), true
	}
	return 0, false
}

// findQueue returns the queue called name (the channel's last declared
// queue if name is empty), checking exclusive ownership.
func (ch *brokerChannel) findQueue(m method, name string) (*queue, *amqpError) {
	if name == "" {
		name = ch.lastQueue
	}
	q, ok := ch.conn.broker.queues[name]
	if !ok {
		return nil, channelError(replyNotFound, m, "no queue '%s' in vhost '/'", name)
	}
	if q.exclusive != nil && q.exclusive != ch.conn {
		return nil, channelError(replyResourceLocked, m, "cannot obtain exclusive access to locked queue '%s' in vhost '/'", name)
	}
	return q, nil
}

// queueAndExchange looks up both ends of a binding.
func (ch *brokerChannel) queueAndExchange(m method, qname, ename string) (*queue, *exchange, *amqpError) {
	q, err := ch.findQueue(m, qname)
	if err != nil {
		return nil, nil, err
	}
	if ename == "" {
		return nil, nil, channelError(replyAccessRefused, m, "operation not permitted on the default exchange")
	}
	e, ok := ch.conn.broker.exchanges[ename]
	if !ok {
		return nil, nil, channelError(replyNotFound, m, "no exchange '%s' in vhost '/'", ename)
	}
	return q, e, nil
}

// settle handles basic.ack, basic.nack and basic.reject.
func (ch *brokerChannel) settle(m method, tag uint64, multiple, requeue bool) *amqpError {
	var done []delivery
	switch {
	case multiple:
		i := 0
		for i < len(ch.unacked) && (tag == 0 || ch.unacked[i].tag <= tag) {
			i++
		}
		if i == 0 && tag != 0 {
			return channelError(replyPreconditionFailed, m, "unknown delivery tag %d", tag)
		}
		done = slices.Clone(ch.unacked[:i])
		ch.unacked = slices.Delete(ch.unacked, 0, i)
	default:
		i := slices.IndexFunc(ch.unacked, func(d delivery) bool { return d.tag == tag })
		if i < 0 {
			return channelError(replyPreconditionFailed, m, "unknown delivery tag %d", tag)
		}
		done = []delivery{ch.unacked[i]}
		ch.unacked = slices.Delete(ch.unacked, i, i+1)
	}
	if requeue {
		ch.requeue(done)
	}
	ch.redispatch() // the channel has room for more
	return nil
}

// handleContent handles the header and body frames of a publish.
func (ch *brokerChannel) handleContent(f frame) *amqpError {
	in := ch.incoming
	if in == nil {
		return connectionError(replyUnexpectedFrame, 0, "content frame without basic.publish on channel %d", ch.id)
	}
	if f.typ == frameHeader {
		if in.haveHead {
			return connectionError(replyUnexpectedFrame, basicPublish, "second content header")
		}
		r := &wireReader{b: f.payload}
		class := r.short()
		r.short() // weight
		in.size = r.longlong()
		if r.err != nil || class != classBasic {
			return connectionError(replyFrameError, basicPublish, "malformed content header")
		}
		if in.size > uint64(ch.conn.broker.cfg.MaxMessage) {
			ch.incoming = nil
			return channelError(replyPreconditionFailed, basicPublish, "message size %d is larger than configured max size %d", in.size, ch.conn.broker.cfg.MaxMessage)
		}
		in.msg.props = slices.Clone(r.b)
		in.haveHead = true
		// Grow the body as it arrives rather than trusting the header.
		in.msg.body = make([]byte, 0, min(in.size, 64<<10))
	} else {
		if !in.haveHead {
			return connectionError(replyUnexpectedFrame, basicPublish, "body frame before content header")
		}
		if uint64(len(in.msg.body)+len(f.payload)) > in.size {
			return connectionError(replyFrameError, basicPublish, "body larger than its header said")
		}
		in.msg.body = append(in.msg.body, f.payload...)
	}
	if uint64(len(in.msg.body)) == in.size {
		ch.incoming = nil
		ch.publish(in)
	}
	return nil
}

// publish routes a complete message, returns it if it is mandatory and
// reached no queue, and confirms it in confirm mode.
func (ch *brokerChannel) publish(in *incoming) {
	b := ch.conn.broker
	msg := &in.msg
	accepted := true
	if e, ok := b.exchanges[msg.exchange]; ok {
		qs := b.route(e, msg.routingKey)
		if len(qs) == 0 && in.mandatory {
			buf := appendMethod(nil, ch.id, basicReturn, func(w *wireWriter) {
				w.short(replyNoRoute)
				w.shortstr("NO_ROUTE")
				w.shortstr(msg.exchange)
				w.shortstr(msg.routingKey)
			})
			ch.conn.send(appendContent(buf, ch.id, msg, ch.conn.frameMax))
		}
		for _, q := range qs {
			if !q.enqueue(msg) {
				accepted = false
			}
			q.dispatch()
		}
	}
	if ch.confirm {
		ch.published++
		ack := basicAck
		if !accepted {
			ack = basicNack
		}
		ch.conn.sendMethod(ch.id, ack, func(w *wireWriter) {
			w.longlong(ch.published)
			w.bit(false) // multiple
			if ack == basicNack {
				w.bit(false) // requeue
			}
		})
	}
}
