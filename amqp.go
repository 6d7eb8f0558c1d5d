package main

// The AMQP plugin from "Plugging AMQP and WebSockets": the post's
// AMQPClient, a SimplePlugin that connects with pika on start and moves
// messages between the broker and the bus with amqp2ws and ws2amqp.

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/url"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// The bus channels between the AMQP plugin and the WebSocket side.
const (
	ChannelAMQP2WS = "amqp2ws" // args: msgs []Message, messages from the stream, in order, for the browsers of their rooms (listeners must not keep the slice)
	ChannelWS2AMQP = "ws2amqp" // args: body []byte, room string, cancel <-chan struct{} (closed when the browser is gone): a message from one browser for the broker
)

// Bus priorities of the AMQP plugin. The broker link comes up before the
// web server so the first browser finds it ready, and goes down after the
// web server so that every message a browser sent can still be published.
const (
	PriorityAMQPStart = 40 // before PriorityWebStart
	PriorityAMQPStop  = 60 // after PriorityWebStop
)

// ErrOutboxFull is the answer to a browser message that arrives while the
// outbox is full: the broker is away or slower than the browsers.
var ErrOutboxFull = errors.New("amqp: outbox full")

// ErrStopped is the answer to a browser message that arrives after the
// plugin has begun to stop.
var ErrStopped = errors.New("amqp: stopped")

// ErrGaveUp is the answer to a browser message that waited for room in the
// outbox until its browser left.
var ErrGaveUp = errors.New("amqp: the browser left while its message waited for the outbox")

// AMQPConfig says where and how the AMQP plugin talks to its broker.
type AMQPConfig struct {
	URL      string // amqp://user:password@host:port/vhost; several, comma-separated, for the nodes of a cluster
	Exchange string // fanout exchange shared by every bridge process

	// Dial opens the connection to the broker; nil dials URL over TCP.
	// The embedded broker sets it to connect in-process.
	Dial func(network, addr string) (net.Conn, error)

	Stream       string        // the stream bound to the exchange, read by every bridge process
	Replicas     int           // the stream's replicas on a cluster (x-initial-cluster-size), when this process declares it
	StreamBytes  int64         // the stream's retention in bytes (x-max-length-bytes), when this process declares it
	StreamAge    string        // the stream's retention in age (x-max-age, "7D"), when this process declares it
	SegmentBytes int64         // the stream's segment size: retention drops whole segments
	Prefetch     int           // deliveries in flight from the broker to this process
	Outbox       int           // browser messages held for the broker
	OutboxBytes  int64         // browser message bytes held for the broker
	StreamWait   time.Duration // how long a read waits for a delivery before it takes the stream to have no more
	MaxBackoff   time.Duration // longest wait between two reconnection attempts
	Timeout      time.Duration // bounds a connection's handshake and the declaration of its topology
	DrainTimeout time.Duration // bounds how long Stop waits for outstanding confirms
}

// maxBatch bounds how many browser messages are published before waiting
// for their confirms: enough to amortize the wait, few enough that a lost
// connection leaves little to publish again.
const maxBatch = 256

// AMQPPlugin moves messages between the bus and an AMQP exchange. The
// exchange feeds a stream that every process reads, so every process sees
// every message, each at the same offset; browser messages go out with
// publisher confirms, and wait in a bounded outbox while the broker is
// away.
type AMQPPlugin struct {
	bus  *Bus
	cfg  AMQPConfig
	id   string       // prefix of message ids, unique to this plugin
	urls []string     // the broker nodes, in this process's own random order, so that processes spread over them
	node atomic.Int32 // the index in urls of the node dialed last

	// outbox is buffered to cfg.Outbox: browser messages wait there for
	// the publisher. When it is full, in messages or in bytes, a sender
	// waits while the broker is up, and is refused while it is away.
	outbox chan outgoing
	up     atomic.Bool   // a session is connected and consuming
	seq    atomic.Uint64 // message id counter

	// mu guards the fields below it.
	mu          sync.Mutex
	outboxBytes int64         // bytes of the messages in outbox
	space       chan struct{} // closed and replaced when the outbox has space again or the link changes
	current     *session      // the session up now, for replays; nil while away
	stopped     bool          // ws2amqp refuses new messages
	stopping    chan struct{} // closed by Stop: drain the outbox and leave
	done        chan struct{} // closed when the supervising goroutine returns
	drain       context.Context
	drainStop   context.CancelFunc

	// retry holds taken but unconfirmed messages, to publish first on the
	// next session. Only the supervising goroutine touches it.
	retry []outgoing

	metrics *Metrics // set by newBridge before the bus starts; nil counts nothing

	// seen drops redeliveries of messages already handed to the bus, next
	// is the stream offset to read from after a reconnection, and msgs is
	// the batch for the bus, kept between batches. Only the consuming
	// goroutine touches them, one session at a time.
	seen *dedupe
	next int64 // -1 until the first delivery: then read from "first"
	msgs []Message

	// caughtUp is closed once the consumer has read the stream as far as
	// it reached when the plugin started; until then, what it reads is
	// history.
	caughtUp     chan struct{}
	caughtUpOnce sync.Once

	// replaying holds a token for each replay reading the stream; its
	// capacity, replays, bounds them.
	replaying chan struct{}
}

// Message is a chat line as read from the stream: its offset, the room it
// was sent to (the routing key; empty means the lobby), and its payload.
type Message struct {
	Offset int64
	Room   string
	Body   []byte
	Sent   int64 // when it reached a bridge from a browser, Unix nanoseconds (its x-wsamqp-received header); 0 if unknown

	// The rest of its journey, Unix nanoseconds; 0 if unknown.
	Published int64 // when that bridge published it (x-wsamqp-published)
	Consumed  int64 // when this bridge read it from the stream
}

// outgoing is a browser message on its way to the exchange. Its id is
// given once, so that a message published again after a lost confirm
// keeps it, and consumers can drop the duplicate.
type outgoing struct {
	id       string
	room     string
	body     []byte
	received int64 // when it reached this bridge, Unix nanoseconds
}

// NewAMQPPlugin returns the AMQP plugin for b. Call Subscribe to plug it in.
func NewAMQPPlugin(b *Bus, cfg AMQPConfig) *AMQPPlugin {
	id := strconv.FormatUint(rand.Uint64(), 36)
	urls := splitList(cfg.URL)
	rand.Shuffle(len(urls), func(i, j int) { urls[i], urls[j] = urls[j], urls[i] })
	return &AMQPPlugin{
		bus:       b,
		cfg:       cfg,
		id:        id,
		urls:      urls,
		outbox:    make(chan outgoing, cfg.Outbox),
		space:     make(chan struct{}),
		seen:      newDedupe(),
		next:      -1,
		caughtUp:  make(chan struct{}),
		replaying: make(chan struct{}, replays),
	}
}

// Subscribe plugs the plugin into the bus channels it serves.
func (p *AMQPPlugin) Subscribe() {
	p.bus.Subscribe(ChannelStart, "amqp", PriorityAMQPStart, func(...any) (any, error) { return nil, p.Start() })
	p.bus.Subscribe(ChannelStop, "amqp", PriorityAMQPStop, func(...any) (any, error) { return nil, p.Stop() })
	p.bus.Subscribe(ChannelWS2AMQP, "amqp", DefaultPriority, func(args ...any) (any, error) {
		room, _ := args[1].(string)
		cancel, _ := args[2].(<-chan struct{})
		return nil, p.ws2amqp(args[0].([]byte), room, cancel)
	})
	p.bus.Subscribe(ChannelReplay, "amqp", DefaultPriority, func(args ...any) (any, error) {
		return p.replay(args[0].(ReplayRequest))
	})
}

// Connected reports whether the plugin has a live link to the broker.
func (p *AMQPPlugin) Connected() bool { return p.up.Load() }

// Start connects to the broker, declares the exchange and this process's
// queue, and starts consuming. The first connection must succeed; after
// that, a lost connection is retried in the background.
func (p *AMQPPlugin) Start() error {
	var s *session
	var errs []error
	for range p.urls { // each node once: the first connection must succeed on one of them
		var err error
		if s, err = p.dial(); err == nil {
			break
		}
		errs = append(errs, err)
		p.nextNode()
	}
	if s == nil {
		return errors.Join(errs...)
	}
	p.mu.Lock()
	p.stopped = false
	p.stopping, p.done = make(chan struct{}), make(chan struct{})
	p.drain, p.drainStop = context.WithCancel(context.Background())
	p.mu.Unlock()
	go p.supervise(s)
	return nil
}

// Stop refuses new browser messages, publishes what the outbox holds and
// waits for its confirms (up to cfg.DrainTimeout), cancels the consumer and
// closes the AMQP channels and connection. It reports messages it could
// not get confirmed.
func (p *AMQPPlugin) Stop() error {
	p.mu.Lock()
	if p.stopped || p.stopping == nil {
		p.mu.Unlock()
		return nil
	}
	p.stopped = true
	close(p.stopping)
	p.mu.Unlock()

	deadline := time.AfterFunc(p.cfg.DrainTimeout, p.drainStop)
	defer deadline.Stop()
	<-p.done
	p.drainStop()

	if lost := len(p.retry) + len(p.outbox); lost > 0 {
		p.retry = nil
		var dropped []outgoing
		for len(p.outbox) > 0 {
			dropped = append(dropped, <-p.outbox)
		}
		p.took(dropped)
		return fmt.Errorf("amqp: %d browser messages not confirmed by the broker before the drain timeout", lost)
	}
	return nil
}

// ws2amqp queues a browser message for the exchange; it runs on the
// browser's reader goroutine. While the outbox is full and the broker is
// up, it waits for room, so that a browser sending faster than the broker
// takes is slowed down (its reader stops reading) rather than anyone
// being cut off; while the broker is away it refuses at once with
// ErrOutboxFull. cancel (nil for none) ends the wait with ErrGaveUp.
func (p *AMQPPlugin) ws2amqp(body []byte, room string, cancel <-chan struct{}) error {
	size := int64(len(body))
	p.mu.Lock()
	for {
		if p.stopped {
			p.mu.Unlock()
			return ErrStopped
		}
		if len(p.outbox) < cap(p.outbox) && p.outboxBytes+size <= p.cfg.OutboxBytes {
			break
		}
		if !p.up.Load() {
			p.mu.Unlock()
			return ErrOutboxFull
		}
		space, stopping := p.space, p.stopping
		p.mu.Unlock()
		select {
		case <-space:
		case <-stopping:
		case <-cancel:
			return ErrGaveUp
		}
		p.mu.Lock()
	}
	defer p.mu.Unlock()
	p.outboxBytes += size
	p.outbox <- outgoing{id: p.id + "-" + strconv.FormatUint(p.seq.Add(1), 36), room: room, body: body, received: time.Now().UnixNano()} // never blocks: there is room, under p.mu
	return nil
}

// took notes that the publisher took msgs from the outbox, and wakes the
// senders waiting for room.
func (p *AMQPPlugin) took(msgs []outgoing) {
	var size int64
	for _, m := range msgs {
		size += int64(len(m.body))
	}
	p.mu.Lock()
	p.outboxBytes -= size
	p.wakeSenders()
	p.mu.Unlock()
}

// wakeSenders wakes the senders waiting for room, to look again. p.mu is
// held.
func (p *AMQPPlugin) wakeSenders() {
	close(p.space)
	p.space = make(chan struct{})
}

// setUp records whether the link is up; senders waiting for room look
// again, since while the broker is away they are refused.
func (p *AMQPPlugin) setUp(up bool) {
	p.up.Store(up)
	p.mu.Lock()
	p.wakeSenders()
	p.mu.Unlock()
}

// amqp2ws hands messages from the stream to the bus for the browsers of
// their rooms, as few publishes as the bounds on a batch allow, leaving out
// those that repeat one already handed over (a republished copy); it runs
// on the consuming goroutine.
func (p *AMQPPlugin) amqp2ws(ds []amqp.Delivery) {
	msgs, size := p.msgs[:0], 0
	flush := func() {
		if len(msgs) > 0 {
			p.bus.Publish(ChannelAMQP2WS, msgs)
		}
		clear(msgs) // let the bodies go
		msgs, size = msgs[:0], 0
	}
	now := time.Now().UnixNano()
	for _, d := range ds {
		offset, ok := streamOffset(d)
		if !ok {
			p.bus.Log("amqp delivery without a stream offset dropped", slog.LevelWarn, "exchange", d.Exchange)
			continue
		}
		p.next = offset + 1
		var dups int
		var err error
		if msgs, dups, err = appendMessages(msgs, d, offset, p.seen, now); err != nil {
			p.metrics.droppedMessage("malformed")
			p.bus.Log("amqp delivery dropped", slog.LevelWarn, "offset", offset, "err", err)
		}
		for range dups {
			p.metrics.droppedMessage("duplicate")
		}
		if size += len(d.Body); len(msgs) >= maxBusBatch || size >= maxBusBatchBytes {
			flush()
		}
	}
	flush()
	if cap(msgs) > 2*maxBusBatch {
		msgs = nil // a burst of packs' worth is let go
	}
	p.msgs = msgs
}

// Bounds on one publish on amqp2ws: a batch is framed once and queued
// whole for each browser of its room, so it must fit well within a
// browser's send queue (-send-queue, -send-queue-bytes), however many
// packs the stream delivered at once.
const (
	maxBusBatch      = 1024
	maxBusBatchBytes = 256 << 10
)

// appendMessages appends to msgs the browser messages that d, read from
// the stream at offset, holds: d itself, or the messages of its pack,
// each at its line offset. It leaves out those that seen has seen, and
// says how many.
func appendMessages(msgs []Message, d amqp.Delivery, offset int64, seen *dedupe, now int64) ([]Message, int, error) {
	room := cmp.Or(d.RoutingKey, LobbyRoom)
	published, _ := d.Headers[publishedHeader].(int64)
	ours := d.AppId == "wsamqp" // its ids are wsamqp's, worth checking for copies
	if d.ContentType != packContentType {
		if ours && seen.duplicate(d.MessageId, d.Body) {
			return msgs, 1, nil
		}
		sent, _ := d.Headers[receivedHeader].(int64)
		return append(msgs, Message{
			Offset: lineOffset(offset, 0), Room: room, Body: d.Body,
			Sent: sent, Published: published, Consumed: now,
		}), 0, nil
	}
	recs, err := unpack(d.Body)
	if err != nil {
		return msgs, 0, err
	}
	dups := 0
	for i, r := range recs {
		if ours && seen.duplicate(r.id, r.body) {
			dups++
			continue
		}
		msgs = append(msgs, Message{
			Offset: lineOffset(offset, i), Room: room, Body: r.body,
			Sent: r.received, Published: published, Consumed: now,
		})
	}
	return msgs, dups, nil
}

// gather adds to batch the deliveries that are already waiting, up to
// max, without waiting for more; it reports false if the deliveries
// ended. amqp091-go hands deliveries over one at a time from a goroutine
// of its own, so before giving up on the next one, gather lets that
// goroutine run once.
func gather(batch []amqp.Delivery, deliveries <-chan amqp.Delivery, max int) ([]amqp.Delivery, bool) {
	for yielded := false; len(batch) < max; {
		select {
		case d, ok := <-deliveries:
			if !ok {
				return batch, false
			}
			batch, yielded = append(batch, d), false
		default:
			if yielded {
				return batch, true
			}
			runtime.Gosched()
			yielded = true
		}
	}
	return batch, true
}

// The headers that carry a browser message's journey, in Unix
// nanoseconds: when it reached its bridge (the start, for the latency
// metric), and when that bridge published it.
const (
	receivedHeader  = "x-wsamqp-received"
	publishedHeader = "x-wsamqp-published"
)

// streamOffset returns a delivery's offset in its stream.
func streamOffset(d amqp.Delivery) (int64, bool) {
	switch v := d.Headers["x-stream-offset"].(type) {
	case int64:
		return v, true
	case int32:
		return int64(v), true
	}
	return 0, false
}

// session is one connection to the broker with its two AMQP channels: one
// consumes, one publishes in confirm mode, so that waiting for confirms
// never holds up deliveries.
type session struct {
	conn       *amqp.Connection
	raw        net.Conn // conn's network connection, to cut when a drain runs out of time
	consumer   *amqp.Channel
	publisher  *amqp.Channel
	tag        string
	deliveries <-chan amqp.Delivery
	consumed   chan struct{} // closed when deliveries is closed and drained
	lastAtDial int64         // the stream's last offset when the first session began; -1 if empty or unknown
}

// dial connects and declares the topology: the fanout exchange, the stream
// bound to it, and a consumer that reads the stream from where this
// process left off (from the first message kept, the first time).
func (p *AMQPPlugin) dial() (*session, error) {
	cfg := amqp.Config{
		Dial:       p.cfg.Dial,
		Properties: amqp.Table{"connection_name": "wsamqp " + p.id},
		Heartbeat:  10 * time.Second,
	}
	if cfg.Dial == nil {
		cfg.Dial = amqp.DefaultDial(p.cfg.Timeout)
	}
	var raw net.Conn
	dial := cfg.Dial
	cfg.Dial = func(network, addr string) (net.Conn, error) {
		c, err := dial(network, addr)
		raw = c
		return c, err
	}
	conn, err := amqp.DialConfig(p.url(), cfg)
	if err != nil {
		return nil, fmt.Errorf("amqp dial %s: %w", RedactURL(p.url()), err)
	}
	s := &session{conn: conn, raw: raw, tag: "wsamqp-" + p.id, consumed: make(chan struct{}), lastAtDial: -1}
	// A node that has just lost a peer may not answer a declaration or a
	// consume for a long while (RabbitMQ waits 30 s on its stream
	// coordinator before it answers 541): past cfg.Timeout the connection
	// is cut (the socket: a polite connection.close would wait for an
	// answer too), and the next node tried.
	stuck := time.AfterFunc(p.cfg.Timeout, func() { raw.Close() })
	err = p.declare(s)
	if !stuck.Stop() {
		err = fmt.Errorf("amqp declare on %s: no answer within %v", nodeOf(p.url()), p.cfg.Timeout)
	}
	if err != nil {
		conn.Close()
		return nil, err
	}
	p.mu.Lock()
	p.current = s
	p.mu.Unlock()
	p.setUp(true)
	p.metrics.connectedTo(nodeOf(p.url()))
	p.bus.Log("amqp connected", slog.LevelInfo, "url", RedactURL(p.url()), "exchange", p.cfg.Exchange, "stream", p.cfg.Stream, "from", p.startOffset())
	return s, nil
}

// url returns the URL of the node dialed last.
func (p *AMQPPlugin) url() string { return p.urls[int(p.node.Load())%len(p.urls)] }

// nextNode moves on to the next node.
func (p *AMQPPlugin) nextNode() { p.node.Store((p.node.Load() + 1) % int32(len(p.urls))) }

// Node returns the broker node the plugin is on (or was on last), as
// host:port, never with credentials.
func (p *AMQPPlugin) Node() string { return nodeOf(p.url()) }

// startOffset is where the consumer starts reading the stream: after the
// last message this process handled, or the first message kept.
func (p *AMQPPlugin) startOffset() any {
	if p.next >= 0 {
		return p.next
	}
	return "first"
}

// supervise serves one session after another until Stop; it runs on its
// own goroutine from Start.
func (p *AMQPPlugin) supervise(s *session) {
	defer close(p.done)
	for {
		err := p.serve(s)
		p.setUp(false)
		if err == nil {
			return
		}
		p.bus.Log("amqp connection lost; reconnecting", slog.LevelWarn, "err", err)
		if s = p.reconnect(); s == nil {
			return
		}
	}
}

// reconnect dials with capped exponential backoff and full jitter until it
// succeeds, or returns nil once Stop's drain deadline passes.
func (p *AMQPPlugin) reconnect() *session {
	backoff := 100 * time.Millisecond
	for attempt := 1; ; attempt++ {
		wait := time.NewTimer(rand.N(backoff) + time.Millisecond)
		select {
		case <-p.drain.Done():
			wait.Stop()
			return nil
		case <-wait.C:
		}
		p.nextNode() // the node that was lost is tried last
		s, err := p.dial()
		if err == nil {
			p.metrics.reconnected()
			p.bus.Log("amqp reconnected", slog.LevelInfo, "attempts", attempt, "republishing", len(p.retry), "node", nodeOf(p.url()))
			return s
		}
		p.bus.Log("amqp reconnect failed", slog.LevelWarn, "attempt", attempt, "err", err)
		backoff = min(2*backoff, p.cfg.MaxBackoff)
	}
}

// serve consumes and publishes on s until the session fails (it returns
// the failure) or Stop has drained the outbox (it returns nil).
func (p *AMQPPlugin) serve(s *session) error {
	go func() {
		defer close(s.consumed)
		// On a stream an acknowledgement only gives back credit.
		// Acknowledging a quarter of the prefetch at a time (multiple=true)
		// saves a frame per message and never stalls the broker; when the
		// flow pauses, what was taken is acknowledged at once, so that in a
		// quiet room nothing stays unacknowledged (RabbitMQ's
		// consumer_timeout, 30 minutes by default, would close the
		// channel).
		//
		// Until the consumer reaches the offset that was last when the
		// plugin started (or the stream goes quiet first), what it reads is
		// history; then it tells the bus it has caught up.
		ackEvery, unacked := max(1, p.cfg.Prefetch/4), 0
		var last amqp.Delivery
		var batch []amqp.Delivery
		paused := time.NewTimer(ackPause)
		paused.Stop()
		defer paused.Stop()
		catchingUp := time.NewTimer(p.cfg.StreamWait)
		defer catchingUp.Stop()
		caught := s.lastAtDial < 0
		if caught {
			p.markCaughtUp()
		}
		for {
			select {
			case d, ok := <-s.deliveries:
				if !ok {
					return
				}
				batch, ok = gather(append(batch[:0], d), s.deliveries, p.cfg.Prefetch)
				p.amqp2ws(batch)
				if !ok {
					return
				}
				if !caught && p.next > s.lastAtDial {
					p.markCaughtUp()
					caught = true
				} else if !caught {
					catchingUp.Reset(p.cfg.StreamWait)
				}
				last = batch[len(batch)-1]
				clear(batch)
				if unacked == 0 {
					paused.Reset(ackPause)
				}
				if unacked += len(batch); unacked < ackEvery {
					continue
				}
			case <-catchingUp.C:
				p.markCaughtUp() // the last offset was dropped meanwhile: nothing more to catch up on
				caught = true
				continue
			case <-paused.C:
				if unacked == 0 {
					continue
				}
			}
			last.Ack(true) // an error means the AMQP channel is gone, and this loop ends next
			unacked = 0
			paused.Stop()
		}
	}()
	// At the drain deadline the connection is cut under whatever is
	// blocked on it: a broker that stops reading (RabbitMQ does, to a
	// blocked connection) must not hold the shutdown past -drain-timeout.
	cut := context.AfterFunc(p.drain, func() { s.raw.Close() })
	defer cut()
	defer func() {
		p.mu.Lock()
		p.current = nil
		p.mu.Unlock()
	}()
	err := p.publish(s)
	if err != nil {
		s.conn.Close()
		<-s.consumed
		return err
	}
	// Stopping: cancel the consumer, let what was delivered reach the
	// browsers, then close the AMQP channels and the connection. The
	// stream stays: other processes read it, and so will this one's
	// browsers when they come back.
	if err := s.consumer.Cancel(s.tag, false); err == nil {
		<-s.consumed
	}
	s.publisher.Close()
	s.consumer.Close()
	s.conn.Close()
	<-s.consumed
	return nil
}

// ackPause is how long deliveries may wait for their acknowledgement once
// the flow pauses: long enough that a steady flow is acknowledged in
// groups, short enough that a quiet room leaves nothing unacknowledged.
const ackPause = 200 * time.Millisecond

// errConsumerGone says the broker closed the consuming AMQP channel.
var errConsumerGone = errors.New("amqp: consumer channel closed")

// publish sends browser messages to the exchange in batches and waits for
// each batch's confirms. It returns nil once Stop has begun and the outbox
// is empty, or an error when the session fails; unconfirmed messages are
// then kept in p.retry.
func (p *AMQPPlugin) publish(s *session) error {
	for {
		batch := p.retry
		p.retry = nil
		retried := len(batch) // the rest comes from the outbox
		if len(batch) == 0 {
			select {
			case msg := <-p.outbox:
				batch = append(batch, msg)
			case <-s.consumed:
				return errConsumerGone
			case <-p.stopping:
				select {
				case msg := <-p.outbox:
					batch = append(batch, msg)
				default:
					return nil // Stop has begun and the outbox is empty
				}
			}
		}
		for len(batch) < maxBatch && len(p.outbox) > 0 {
			batch = append(batch, <-p.outbox)
		}
		p.took(batch[retried:])
		if err := p.publishBatch(s, batch); err != nil {
			return err
		}
	}
}

// publishBatch publishes batch and waits for its confirms; whatever is not
// confirmed goes to p.retry. The messages of each room go out in order,
// several at once in a pack.
func (p *AMQPPlugin) publishBatch(s *session, batch []outgoing) error {
	var units [][]outgoing // what goes out as one AMQP message each
	for _, msgs := range byRoom(batch) {
		units = append(units, packs(msgs)...)
	}
	confirms := make([]*amqp.DeferredConfirmation, 0, len(units))
	for i, u := range units {
		now := time.Now()
		msg := amqp.Publishing{
			Headers:     amqp.Table{publishedHeader: now.UnixNano()},
			ContentType: packContentType,
			Timestamp:   now,
			AppId:       "wsamqp",
		}
		if len(u) == 1 {
			msg.Headers[receivedHeader] = u[0].received
			msg.ContentType, msg.MessageId, msg.Body = "text/plain; charset=utf-8", u[0].id, u[0].body
		} else {
			msg.Body = appendPack(nil, u)
		}
		dc, err := s.publisher.PublishWithDeferredConfirm(p.cfg.Exchange, u[0].room, false, false, msg)
		if err != nil {
			for _, rest := range units[i:] {
				p.retry = append(p.retry, rest...)
			}
			p.keepUnconfirmed(units[:i], confirms)
			return fmt.Errorf("basic.publish %s: %w", p.cfg.Exchange, err)
		}
		confirms = append(confirms, dc)
	}
	if lost := p.keepUnconfirmed(units, confirms); lost > 0 {
		return fmt.Errorf("basic.publish %s: %d of %d messages not confirmed", p.cfg.Exchange, lost, len(batch))
	}
	return nil
}

// byRoom splits batch by room, keeping the order within each.
func byRoom(batch []outgoing) [][]outgoing {
	index := make(map[string]int)
	var rooms [][]outgoing
	for _, m := range batch {
		i, ok := index[m.room]
		if !ok {
			i = len(rooms)
			index[m.room] = i
			rooms = append(rooms, nil)
		}
		rooms[i] = append(rooms[i], m)
	}
	return rooms
}

// keepUnconfirmed waits for each confirm (a closing AMQP channel nacks them
// all) and moves the messages of what was nacked to p.retry, in order. It
// returns how many messages.
func (p *AMQPPlugin) keepUnconfirmed(units [][]outgoing, confirms []*amqp.DeferredConfirmation) int {
	var nacked []outgoing
	published := 0
	for i, dc := range confirms {
		published += len(units[i])
		if ok, err := dc.WaitContext(p.drain); !ok || err != nil {
			nacked = append(nacked, units[i]...)
		}
	}
	p.retry = append(nacked, p.retry...)
	p.metrics.publishedMessages(published)
	p.metrics.confirmedMessages(published - len(nacked))
	return len(nacked)
}

// nodeOf names the broker node of a URL: its host and port, never its
// credentials.
func nodeOf(u string) string {
	parsed, err := url.Parse(u)
	if err != nil {
		return "(unparsable)"
	}
	return parsed.Host
}

// RedactURL returns u with its password replaced by "xxxxx", so that it
// can be logged. A URL that does not parse is never shown.
func RedactURL(u string) string {
	parsed, err := url.Parse(u)
	if err != nil {
		return "(unparsable AMQP URL, not shown)"
	}
	return parsed.Redacted()
}
