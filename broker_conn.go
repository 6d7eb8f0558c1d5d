package main

// A connection to the embedded broker: its handshake, its reader, its
// writer, its heartbeats, and how it ends.

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
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

	// Set by serve and the handshake, then read-only.
	frameMax       int
	channelMax     int
	heartbeat      time.Duration
	blockedCapable bool // the client understands connection.blocked
	overLimit      bool // one connection too many: refused at connection.open

	// Guarded by broker.mu.
	channels  map[uint16]*brokerChannel
	closing   bool                // connection.close sent; only close-ok is read now
	exclusive map[*queue]struct{} // the exclusive queues it owns, deleted with it
	partial   int                 // publishes whose content has not all arrived

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
		broker:    b,
		nc:        nc,
		r:         bufio.NewReaderSize(nc, 64<<10),
		frameMax:  frameMinSize,
		channels:  make(map[uint16]*brokerChannel),
		exclusive: make(map[*queue]struct{}),
		wake:      make(chan struct{}, 1),
		done:      make(chan struct{}),
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	// Past the connection limit a client is still answered, at
	// connection.open, with RabbitMQ's 530; past twice the limit it is
	// not even read.
	if b.closed || len(b.conns) >= 2*b.cfg.MaxConns {
		return false
	}
	c.overLimit = len(b.conns) >= b.cfg.MaxConns
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
	if errors.Is(err, errClientClosed) {
		// Close-ok "tells the recipient that it is safe to close the
		// socket": the client closes first, so that it reads the close-ok
		// before it sees the connection end. It gets closeTimeout.
		c.nc.SetReadDeadline(time.Now().Add(closeTimeout))
		io.Copy(io.Discard, c.r)
	}
	c.broker.mu.Lock()
	c.teardown()
	c.broker.mu.Unlock()
	close(c.done)
	helpers.Wait()
	c.nc.Close()
	// Only now does the broker forget it: until then Close may still have
	// to drop a connection whose writer is stuck on a client that does
	// not read.
	c.broker.mu.Lock()
	delete(c.broker.conns, c)
	c.broker.mu.Unlock()
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
			// Clients gate RabbitMQ's extensions on this name (amqp091-go's
			// own tests do); the broker implements those it announces
			// below, and says what it is in "information".
			"product":     "RabbitMQ",
			"version":     "3.10.8",
			"platform":    "Go",
			"information": "wsamqp embedded broker: in memory, one virtual host, RabbitMQ's semantics",
			"capabilities": Table{
				"publisher_confirms":         true,
				"basic.nack":                 true,
				"consumer_cancel_notify":     true,
				"exchange_exchange_bindings": true,
				"per_consumer_qos":           true,
				"connection.blocked":         true,
			},
		})
		w.longstr([]byte("PLAIN"))
		w.longstr([]byte("en_US"))
	})

	r, err := c.expect(connectionStartOk)
	if err != nil {
		return err
	}
	props := r.table()
	mechanism, response := r.shortstr(), r.longstr()
	r.shortstr() // locale
	if r.err != nil {
		return connectionError(replySyntaxError, connectionStartOk, "%v", r.err)
	}
	if mechanism != "PLAIN" {
		return connectionError(replyAccessRefused, connectionStartOk, "mechanism %s not supported", mechanism)
	}
	if caps, ok := props["capabilities"].(Table); ok {
		c.blockedCapable, _ = caps["connection.blocked"].(bool)
	}
	user, password := parsePlain(response)
	if !cfg.login(user, password) {
		return connectionError(replyAccessRefused, connectionStartOk, "Login was refused using authentication mechanism PLAIN")
	}
	if user == "guest" && !fromLoopback(c.nc) {
		return connectionError(replyAccessRefused, connectionStartOk, "User 'guest' can only connect via localhost")
	}

	c.sendMethod(0, connectionTune, func(w *wireWriter) {
		w.short(uint16(cfg.ChannelMax))
		w.long(uint32(cfg.FrameMax))
		w.short(uint16(cfg.Heartbeat / time.Second))
	})
	if r, err = c.expect(connectionTuneOk); err != nil {
		return err
	}
	channelMax := int(r.short())
	frameMax, heartbeat := int(r.long()), time.Duration(r.short())*time.Second
	if r.err != nil {
		return connectionError(replySyntaxError, connectionTuneOk, "%v", r.err)
	}
	if frameMax == 0 || frameMax > cfg.FrameMax {
		frameMax = cfg.FrameMax
	}
	c.frameMax, c.heartbeat = max(frameMax, frameMinSize), heartbeat
	c.channelMax = cfg.ChannelMax
	if channelMax > 0 {
		c.channelMax = min(channelMax, cfg.ChannelMax)
	}

	if r, err = c.expect(connectionOpen); err != nil {
		return err
	}
	if vhost := r.shortstr(); vhost != "/" {
		return connectionError(replyNotAllowed, connectionOpen, "vhost %s not found", vhost)
	}
	if c.overLimit {
		return connectionError(replyNotAllowed, connectionOpen, "access to vhost '/' refused for user '%s': connection limit (%d) is reached", user, cfg.MaxConns)
	}
	c.sendMethod(0, connectionOpenOk, func(w *wireWriter) { w.shortstr("") })
	return nil
}

// login reports whether user and password are the account's. The
// comparison takes the same time whatever the guess, so that it tells an
// attacker nothing of how close it came: both sides are hashed first, since
// subtle.ConstantTimeCompare takes time by length.
func (cfg BrokerConfig) login(user, password string) bool {
	hash := func(s string) []byte { h := sha256.Sum256([]byte(s)); return h[:] }
	userOK := subtle.ConstantTimeCompare(hash(user), hash(cfg.User))
	passwordOK := subtle.ConstantTimeCompare(hash(password), hash(cfg.Password))
	return userOK&passwordOK == 1
}

// fromLoopback reports whether a client connected from this machine: over
// TCP from a loopback address, or in-process through Dial.
func fromLoopback(nc net.Conn) bool {
	addr, ok := nc.RemoteAddr().(*net.TCPAddr)
	if !ok {
		return nc.RemoteAddr().Network() == "pipe"
	}
	return addr.IP.IsLoopback()
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
	var content time.Time // when the oldest unfinished publish must be whole; zero for none
	for closing := false; ; {
		var deadline time.Time
		if c.heartbeat > 0 && !closing {
			// Two missed heartbeats and the client is taken for dead.
			deadline = time.Now().Add(2 * c.heartbeat)
		}
		if !content.IsZero() && !closing && (deadline.IsZero() || content.Before(deadline)) {
			deadline = content
		}
		if !closing {
			c.nc.SetReadDeadline(deadline)
		}
		f, err := readFrame(c.r, c.frameMax)
		if err != nil {
			if !content.IsZero() && !time.Now().Before(content) {
				return c.contentTimedOut()
			}
			return frameErr(err)
		}
		c.broker.mu.Lock()
		err = c.handleFrame(f)
		closing = c.closing // fail set a deadline for the close-ok
		content = c.contentDeadline()
		c.broker.checkBudget()
		c.broker.mu.Unlock()
		if err != nil {
			return err
		}
		if !content.IsZero() && !time.Now().Before(content) {
			return c.contentTimedOut()
		}
	}
}

// contentDeadline returns when the oldest unfinished publish must be
// whole, or zero if none is under way. broker.mu is held.
func (c *brokerConn) contentDeadline() time.Time {
	var first time.Time
	if c.partial == 0 {
		return first
	}
	for _, ch := range c.channels {
		if in := ch.incoming; in != nil && (first.IsZero() || in.deadline.Before(first)) {
			first = in.deadline
		}
	}
	return first
}

// contentTimedOut is the error for a client that began a publish and did
// not finish it in time: what it sent so far cannot be held for ever.
func (c *brokerConn) contentTimedOut() error {
	return connectionError(replyFrameError, basicPublish, "message content did not arrive whole within %v", c.broker.cfg.ContentTimeout)
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
	for q := range c.exclusive {
		c.broker.deleteQueue(q)
	}
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
