package main

// The embedded broker. The posts ran against a RabbitMQ server; wsamqp
// carries a small in-memory AMQP 0-9-1 broker of its own, so that `go run .`
// works on a machine with nothing else installed, while every message still
// travels as real AMQP frames through the same amqp.go that talks to
// RabbitMQ. It is written from the AMQP 0-9-1 specification and behaves
// like RabbitMQ where the two differ.
//
// What it speaks: the default exchange and direct, fanout and topic
// exchanges, and bindings between exchanges; queues (server-named,
// exclusive, auto-delete, x-expires, x-max-length and x-max-length-bytes
// with drop-head or reject-publish, x-message-ttl and per-message
// expiration, dead-letter exchanges with x-death); consumers with prefetch
// per consumer or per channel, acks, nacks, rejects and recover;
// basic.get; mandatory returns; publisher confirms; transactions;
// connection.blocked; heartbeats. What it does not: persistence, headers
// exchanges, priorities, streams and quorum queues, virtual hosts other
// than "/", TLS, clustering. What it does not implement it refuses with
// RabbitMQ's error (540 NOT_IMPLEMENTED), never accepts and ignores, so
// that code tried against it behaves the same on RabbitMQ.
//
// It is built to be exposed: guest may connect only from loopback, as in
// RabbitMQ; connections, channels, queues, exchanges, consumers and
// bindings are capped; the bytes of messages it holds are bounded, per
// queue and in all; and nothing it does under its one lock takes longer
// than the size of what it touches (topic matching included).
//
// It is in eight files: broker.go (the Broker and its life),
// broker_wire.go (frames, fields, tables), broker_model.go (exchanges,
// queues, routing), broker_stream.go (stream queues), broker_conn.go (a
// connection's handshake, reading, writing, heartbeats), broker_channel.go
// (channels, deliveries), broker_methods.go (the methods a channel
// answers) and broker_publish.go (content, routing, confirms, acks and
// dead-lettering).

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"sync"
	"time"
)

// BrokerConfig sets the embedded broker's credentials and limits. Every
// limit bounds what clients can make the broker hold, so that its memory
// is bounded in bytes whatever they send.
type BrokerConfig struct {
	User, Password string        // the one account; guest/guest if both are empty (guest may connect only from loopback)
	MaxQueueLength int           // ready messages a queue holds; 0 means 100,000
	MaxQueueBytes  int64         // bytes of ready messages a queue holds; 0 means 64 MiB
	MaxMemory      int64         // bytes of messages the broker holds before it refuses publishes; 0 means 256 MiB
	MaxConns       int           // client connections at once; 0 means 1,000
	ChannelMax     int           // channels per connection; 0 means 2,047
	MaxQueues      int           // queues at once; 0 means 10,000
	MaxExchanges   int           // exchanges at once; 0 means 10,000
	MaxConsumers   int           // consumers at once; 0 means 100,000
	FrameMax       int           // largest frame offered to clients; 0 means 128 KiB
	MaxMessage     int           // largest message body accepted; 0 means 16 MiB
	ContentTimeout time.Duration // how long a publish's content may take to arrive whole; 0 means 30s
	Heartbeat      time.Duration // heartbeat offered to clients; 0 means 60s
	Logger         *slog.Logger  // nil logs nothing
}

// withDefaults fills in what cfg leaves zero.
func (cfg BrokerConfig) withDefaults() BrokerConfig {
	if cfg.User == "" && cfg.Password == "" {
		cfg.User, cfg.Password = "guest", "guest"
	}
	orDefault := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	orDefault(&cfg.MaxQueueLength, 100_000)
	orDefault(&cfg.MaxConns, 1000)
	orDefault(&cfg.ChannelMax, 2047)
	orDefault(&cfg.MaxQueues, 10_000)
	orDefault(&cfg.MaxExchanges, 10_000)
	orDefault(&cfg.MaxConsumers, 100_000)
	orDefault(&cfg.FrameMax, 128<<10)
	orDefault(&cfg.MaxMessage, 16<<20)
	cfg.FrameMax = max(cfg.FrameMax, frameMinSize)
	cfg.ChannelMax = min(cfg.ChannelMax, math.MaxUint16)
	if cfg.MaxQueueBytes <= 0 {
		cfg.MaxQueueBytes = 64 << 20
	}
	if cfg.MaxMemory <= 0 {
		cfg.MaxMemory = 256 << 20
	}
	if cfg.ContentTimeout <= 0 {
		cfg.ContentTimeout = 30 * time.Second
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
	// is both simplest and fast enough, since nothing done under it takes
	// longer than the size of what it touches.
	mu        sync.Mutex
	exchanges map[string]*exchange
	queues    map[string]*queue
	conns     map[*brokerConn]struct{}
	listeners []net.Listener
	closed    bool

	held          int64  // bytes of messages held: ready, unacknowledged, arriving, in transactions
	blocked       bool   // over budget: connection.blocked was sent, publishes are refused
	gen           uint64 // counts publishes, to stamp what routing visits
	consumers     int    // consumers on all queues
	nbindings     int    // bindings on all exchanges
	deadLettering int    // depth of dead-lettering under way, to bound chains of it

	wg sync.WaitGroup // one count per connection and per accept loop
}

// overBudget reports whether the broker holds more message bytes than
// cfg.MaxMemory, and tells clients when that changes.
func (b *Broker) overBudget() bool {
	b.checkBudget()
	return b.blocked
}

// checkBudget sends connection.blocked to every client that understands it
// when the broker goes over its memory budget, and connection.unblocked
// once it is back under three quarters of it (so that a client hovering
// at the line does not make it flap). RabbitMQ, at its memory alarm, stops
// reading from publishing connections; this broker refuses their publishes
// instead (basic.nack in confirm mode), since a client that publishes and
// consumes on one connection, as wsamqp does, would then never read the
// acks that free memory.
func (b *Broker) checkBudget() {
	var change method
	switch {
	case !b.blocked && b.held > b.cfg.MaxMemory:
		b.blocked, change = true, connectionBlocked
		b.cfg.Logger.Warn("broker: over its memory budget; refusing publishes", "held", b.held, "budget", b.cfg.MaxMemory)
	case b.blocked && b.held <= b.cfg.MaxMemory/4*3:
		b.blocked, change = false, connectionUnblocked
		b.cfg.Logger.Info("broker: back under its memory budget", "held", b.held, "budget", b.cfg.MaxMemory)
	default:
		return
	}
	for c := range b.conns {
		if c.blockedCapable {
			c.sendMethod(0, change, func(w *wireWriter) {
				if change == connectionBlocked {
					w.shortstr("low on memory")
				}
			})
		}
	}
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

// closeGrace bounds how long Close waits for clients to take their
// connection.close before it drops their connections.
const closeGrace = 2 * time.Second

// Close tells every client the broker is going away (320 CONNECTION_FORCED,
// as RabbitMQ does on shutdown), drops all messages, and returns once every
// connection has ended: within closeGrace for a client that does not read.
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
	ended := make(chan struct{})
	go func() {
		b.wg.Wait()
		close(ended)
	}()
	t := time.NewTimer(closeGrace)
	defer t.Stop()
	select {
	case <-ended:
		return nil
	case <-t.C:
	}
	b.mu.Lock()
	for c := range b.conns {
		c.nc.Close() // its writer's next write fails, and its reader's next read
	}
	b.mu.Unlock()
	<-ended
	return nil
}
