package main

// The AMQP plugin from "Plugging AMQP and WebSockets": the post's
// AMQPClient, a SimplePlugin that connects with pika on start and moves
// messages between the broker and the bus with amqp2ws and ws2amqp.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// The bus channels between the AMQP plugin and the WebSocket side.
const (
	ChannelAMQP2WS = "amqp2ws" // args: body []byte, a message from the broker for every browser
	ChannelWS2AMQP = "ws2amqp" // args: body []byte, a message from one browser for the broker; cancel <-chan struct{}, closed when the browser is gone
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
	URL      string // amqp://user:password@host:port/vhost
	Exchange string // fanout exchange shared by every bridge process

	// Dial opens the connection to the broker; nil dials URL over TCP.
	// The embedded broker sets it to connect in-process.
	Dial func(network, addr string) (net.Conn, error)

	Prefetch     int           // deliveries in flight from the broker to this process
	Outbox       int           // browser messages held for the broker
	OutboxBytes  int64         // browser message bytes held for the broker
	QueueExpires time.Duration // how long this process's queue outlives a lost connection
	QueueLength  int           // messages this process's queue holds while it is away
	MaxBackoff   time.Duration // longest wait between two reconnection attempts
	DrainTimeout time.Duration // bounds how long Stop waits for outstanding confirms
}

// maxBatch bounds how many browser messages are published before waiting
// for their confirms: enough to amortize the wait, few enough that a lost
// connection leaves little to publish again.
const maxBatch = 256

// AMQPPlugin moves messages between the bus and an AMQP exchange. Each
// process has its own queue bound to the exchange, so every process sees
// every message; browser messages go out with publisher confirms, and wait
// in a bounded outbox while the broker is away.
type AMQPPlugin struct {
	bus   *Bus
	cfg   AMQPConfig
	id    string // prefix of message ids, unique to this plugin
	queue string // this process's queue, the same across reconnections

	// outbox is buffered to cfg.Outbox: browser messages wait there for
	// the publisher. When it is full, in messages or in bytes, a sender
	// waits while the broker is up, and is refused while it is away.
	outbox chan outgoing
	up     atomic.Bool   // a session is connected and consuming
	seq    atomic.Uint64 // message id counter

	// mu guards the fields below it.
	mu          sync.Mutex
	outboxBytes int64         // bytes of the messages in outbox
	room        chan struct{} // closed and replaced when the outbox has room again or the link changes
	stopped     bool          // ws2amqp refuses new messages
	stopping    chan struct{} // closed by Stop: drain the outbox and leave
	done        chan struct{} // closed when the supervising goroutine returns
	drain       context.Context
	drainStop   context.CancelFunc

	// retry holds taken but unconfirmed messages, to publish first on the
	// next session. Only the supervising goroutine touches it.
	retry []outgoing

	// seen drops redeliveries of messages already handed to the bus.
	// Only the consuming goroutine touches it.
	seen *dedupe
}

// outgoing is a browser message on its way to the exchange. Its id is
// given once, so that a message published again after a lost confirm
// keeps it, and consumers can drop the duplicate.
type outgoing struct {
	id   string
	body []byte
}

// NewAMQPPlugin returns the AMQP plugin for b. Call Subscribe to plug it in.
func NewAMQPPlugin(b *Bus, cfg AMQPConfig) *AMQPPlugin {
	id := strconv.FormatUint(rand.Uint64(), 36)
	return &AMQPPlugin{
		bus:    b,
		cfg:    cfg,
		id:     id,
		queue:  "wsamqp-" + id,
		outbox: make(chan outgoing, cfg.Outbox),
		room:   make(chan struct{}),
		seen:   newDedupe(),
	}
}

// Subscribe plugs the plugin into the bus channels it serves.
func (p *AMQPPlugin) Subscribe() {
	p.bus.Subscribe(ChannelStart, "amqp", PriorityAMQPStart, func(...any) (any, error) { return nil, p.Start() })
	p.bus.Subscribe(ChannelStop, "amqp", PriorityAMQPStop, func(...any) (any, error) { return nil, p.Stop() })
	p.bus.Subscribe(ChannelWS2AMQP, "amqp", DefaultPriority, func(args ...any) (any, error) {
		var cancel <-chan struct{}
		if len(args) > 1 {
			cancel, _ = args[1].(<-chan struct{})
		}
		return nil, p.ws2amqp(args[0].([]byte), cancel)
	})
}

// Connected reports whether the plugin has a live link to the broker.
func (p *AMQPPlugin) Connected() bool { return p.up.Load() }

// Start connects to the broker, declares the exchange and this process's
// queue, and starts consuming. The first connection must succeed; after
// that, a lost connection is retried in the background.
func (p *AMQPPlugin) Start() error {
	s, err := p.dial()
	if err != nil {
		return err
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
func (p *AMQPPlugin) ws2amqp(body []byte, cancel <-chan struct{}) error {
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
		room, stopping := p.room, p.stopping
		p.mu.Unlock()
		select {
		case <-room:
		case <-stopping:
		case <-cancel:
			return ErrGaveUp
		}
		p.mu.Lock()
	}
	defer p.mu.Unlock()
	p.outboxBytes += size
	p.outbox <- outgoing{id: p.id + "-" + strconv.FormatUint(p.seq.Add(1), 36), body: body} // never blocks: there is room, under p.mu
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
	close(p.room)
	p.room = make(chan struct{})
}

// setUp records whether the link is up; senders waiting for room look
// again, since while the broker is away they are refused.
func (p *AMQPPlugin) setUp(up bool) {
	p.up.Store(up)
	p.mu.Lock()
	p.wakeSenders()
	p.mu.Unlock()
}

// amqp2ws hands a broker message to the bus for every browser, unless it
// is a redelivery of one already handed over; it runs on the consuming
// goroutine.
func (p *AMQPPlugin) amqp2ws(d amqp.Delivery) {
	if d.AppId == "wsamqp" && p.seen.duplicate(d.MessageId, d.Body) {
		return
	}
	p.bus.Publish(ChannelAMQP2WS, d.Body)
}

// session is one connection to the broker with its two AMQP channels: one
// consumes, one publishes in confirm mode, so that waiting for confirms
// never holds up deliveries.
type session struct {
	conn       *amqp.Connection
	raw        net.Conn // conn's network connection, to cut when a drain runs out of time
	consumer   *amqp.Channel
	publisher  *amqp.Channel
	queue      string
	tag        string
	deliveries <-chan amqp.Delivery
	consumed   chan struct{} // closed when deliveries is closed and drained
}

// dial connects and declares the topology: the fanout exchange, this
// process's queue bound to it, and a consumer.
func (p *AMQPPlugin) dial() (*session, error) {
	cfg := amqp.Config{
		Dial:       p.cfg.Dial,
		Properties: amqp.Table{"connection_name": "wsamqp " + p.id},
		Heartbeat:  10 * time.Second,
	}
	if cfg.Dial == nil {
		cfg.Dial = amqp.DefaultDial(5 * time.Second)
	}
	var raw net.Conn
	dial := cfg.Dial
	cfg.Dial = func(network, addr string) (net.Conn, error) {
		c, err := dial(network, addr)
		raw = c
		return c, err
	}
	conn, err := amqp.DialConfig(p.cfg.URL, cfg)
	if err != nil {
		return nil, fmt.Errorf("amqp dial %s: %w", RedactURL(p.cfg.URL), err)
	}
	s := &session{conn: conn, raw: raw, queue: p.queue, tag: "wsamqp-" + p.id, consumed: make(chan struct{})}
	if err := s.declare(p.cfg); err != nil {
		conn.Close()
		return nil, err
	}
	p.setUp(true)
	p.bus.Log("amqp connected", slog.LevelInfo, "url", RedactURL(p.cfg.URL), "exchange", p.cfg.Exchange, "queue", s.queue)
	return s, nil
}

// declare opens the session's AMQP channels and declares its topology.
//
// The queue is not exclusive: an exclusive queue goes with its connection,
// and with it every message routed to it but not yet delivered. This one
// outlives a lost connection by cfg.QueueExpires (RabbitMQ's x-expires),
// so a reconnection finds what was sent meanwhile, up to cfg.QueueLength
// messages; Stop deletes it.
func (s *session) declare(cfg AMQPConfig) error {
	var err error
	if s.consumer, err = s.conn.Channel(); err != nil {
		return fmt.Errorf("channel.open: %w", err)
	}
	if s.publisher, err = s.conn.Channel(); err != nil {
		return fmt.Errorf("channel.open: %w", err)
	}
	if err := s.publisher.Confirm(false); err != nil {
		return fmt.Errorf("confirm.select: %w", err)
	}
	if err := s.consumer.ExchangeDeclare(cfg.Exchange, amqp.ExchangeFanout, true, false, false, false, nil); err != nil {
		return fmt.Errorf("exchange.declare %s: %w", cfg.Exchange, err)
	}
	args := amqp.Table{
		"x-expires":    int32(cfg.QueueExpires.Milliseconds()),
		"x-max-length": int32(cfg.QueueLength),
		"x-overflow":   "drop-head",
	}
	if _, err := s.consumer.QueueDeclare(s.queue, false, false, false, false, args); err != nil {
		return fmt.Errorf("queue.declare %s: %w", s.queue, err)
	}
	if err := s.consumer.QueueBind(s.queue, "", cfg.Exchange, false, nil); err != nil {
		return fmt.Errorf("queue.bind %s: %w", s.queue, err)
	}
	if err := s.consumer.Qos(cfg.Prefetch, 0, false); err != nil {
		return fmt.Errorf("basic.qos: %w", err)
	}
	if s.deliveries, err = s.consumer.Consume(s.queue, s.tag, false, true, false, false, nil); err != nil {
		return fmt.Errorf("basic.consume %s: %w", s.queue, err)
	}
	return nil
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
		s, err := p.dial()
		if err == nil {
			p.bus.Log("amqp reconnected", slog.LevelInfo, "attempts", attempt, "republishing", len(p.retry))
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
		// Acknowledging a quarter of the prefetch at a time (multiple=true)
		// saves a frame per message and never stalls the broker. What is
		// left unacknowledged when the flow stops is harmless: if the
		// connection goes, it comes back as redeliveries, which amqp2ws drops.
		//
		// When the flow pauses (nothing more is waiting), what was taken is
		// acknowledged at once: in a quiet room nothing may stay
		// unacknowledged, or RabbitMQ's consumer_timeout (30 minutes by
		// default) closes the channel.
		ackEvery, unacked := max(1, p.cfg.Prefetch/4), 0
		var last amqp.Delivery
		paused := time.NewTimer(ackPause)
		paused.Stop()
		defer paused.Stop()
		for {
			select {
			case d, ok := <-s.deliveries:
				if !ok {
					return
				}
				p.amqp2ws(d)
				last = d
				if unacked++; unacked == 1 {
					paused.Reset(ackPause)
				}
				if unacked < ackEvery {
					continue
				}
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
	err := p.publish(s)
	if err != nil {
		s.conn.Close()
		<-s.consumed
		return err
	}
	// Stopping: cancel the consumer, let what was delivered reach the
	// browsers, delete the queue, then close the AMQP channels and the
	// connection.
	if err := s.consumer.Cancel(s.tag, false); err == nil {
		<-s.consumed
	}
	if _, err := s.consumer.QueueDelete(s.queue, false, false, false); err != nil {
		p.bus.Log("amqp queue.delete failed; the broker expires it", slog.LevelWarn, "queue", s.queue, "err", err)
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
// confirmed goes to p.retry.
func (p *AMQPPlugin) publishBatch(s *session, batch []outgoing) error {
	confirms := make([]*amqp.DeferredConfirmation, 0, len(batch))
	for i, msg := range batch {
		dc, err := s.publisher.PublishWithDeferredConfirm(p.cfg.Exchange, "", false, false, amqp.Publishing{
			ContentType: "text/plain; charset=utf-8",
			Timestamp:   time.Now(),
			MessageId:   msg.id,
			AppId:       "wsamqp",
			Body:        msg.body,
		})
		if err != nil {
			p.retry = append(p.retry, batch[i:]...)
			p.keepUnconfirmed(batch[:i], confirms)
			return fmt.Errorf("basic.publish %s: %w", p.cfg.Exchange, err)
		}
		confirms = append(confirms, dc)
	}
	if lost := p.keepUnconfirmed(batch, confirms); lost > 0 {
		return fmt.Errorf("basic.publish %s: %d of %d messages not confirmed", p.cfg.Exchange, lost, len(batch))
	}
	return nil
}

// keepUnconfirmed waits for each confirm (a closing AMQP channel nacks them
// all) and moves nacked messages to p.retry, in order. It returns how many.
func (p *AMQPPlugin) keepUnconfirmed(batch []outgoing, confirms []*amqp.DeferredConfirmation) int {
	var nacked []outgoing
	for i, dc := range confirms {
		if ok, err := dc.WaitContext(p.drain); !ok || err != nil {
			nacked = append(nacked, batch[i])
		}
	}
	p.retry = append(nacked, p.retry...)
	return len(nacked)
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
