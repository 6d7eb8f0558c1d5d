package main

// A connection to the embedded broker: its handshake, its reader, its
// writer, its heartbeats, and how it ends.

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"time"
)

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
