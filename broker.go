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
// It is in six files: broker.go (the Broker and its life),
// broker_wire.go (frames, fields, tables), broker_model.go (exchanges,
// queues, routing), broker_conn.go (a connection's handshake, reading,
// writing, heartbeats), broker_channel.go (channels, deliveries, acks)
// and broker_methods.go (the methods a channel answers).

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"
)

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
